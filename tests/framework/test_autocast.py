"""AutocastPrecision's device: given, or left unset and taken from the model when Lightning connects it."""

import lightning as L
import pytest
import torch
from torch import nn

from lowbit.autocast import AutocastPrecision, bf16_is_fast
from lowbit.errors import LowbitError
from lowbit.plugins.precision.nvfp4 import NVFP4Precision


def test_unset_device_type_guesses_cuda_only_where_one_is_visible():
    precision = AutocastPrecision(mode="bf16")
    assert precision.device_type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert precision.precision == "32-true"  # FP32 master weights: what Lightning's model summary sizes by


def test_unset_device_type_follows_the_model_on_connect():
    precision = AutocastPrecision(mode="auto")
    precision._set_device_type("cuda")  # as on a GPU machine, before the Trainer put the model on the CPU
    model = nn.Linear(4, 4)
    precision.connect(model, [], [])
    assert precision.device_type == "cpu"
    assert precision.enabled == bf16_is_fast("cpu") and precision.compute.startswith(
        ("BF16 autocast on cpu", "FP32 on cpu")
    )


def test_meta_parameters_leave_the_device_alone():
    precision = AutocastPrecision()
    before = precision.device_type
    precision.connect(nn.Linear(4, 4, device="meta"), [], [])
    assert precision.device_type == before


def test_a_given_device_type_that_misses_the_model_is_an_error():
    precision = AutocastPrecision(device_type="cuda")
    with pytest.raises(LowbitError, match=r"device_type='cuda' but the model is on cpu.*leave device_type unset"):
        precision.connect(nn.Linear(4, 4), [], [])


class _Probe(L.LightningModule):
    """One Linear; records whether autocast was on for the model's device inside training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(32, 32)
        self.autocast: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.autocast.append(torch.is_autocast_enabled(self.device.type))
        return self.layer(batch[0]).float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_plugin_built_without_device_type_autocasts_on_the_gpu(tmp_path):
    precision = NVFP4Precision(mode="bf16")
    data = torch.utils.data.TensorDataset(torch.randn(16, 32))
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        plugins=[precision],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = _Probe()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert precision.device_type == "cuda" and module.autocast == [True, True]
