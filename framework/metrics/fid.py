"""FID on small image data sets: torchmetrics' Fréchet distance with a feature network trained on the data itself.

FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½) between Gaussians fitted to features of real and
generated images (Heusel et al. 2017, eq. 6). Inception-v3 features mean little on 8×8 digits and
need a download, so the features come from ``FeatureNet``, a small CNN classifier:

    conv3×3(C→32) ReLU, conv3×3(32→32) ReLU, avg-pool 2×2,
    conv3×3(32→64) ReLU, conv3×3(64→64) ReLU, global average pool → **64 features** → Linear(64 → classes)

The features are the 64-d global-average-pooled activations (non-negative, the analogue of Inception's
pool3 layer). It is trained once per data configuration on the training split (the same images, in the
same standardised space, the diffusion model learns): AdamW (lr 2e-3, weight decay 1e-4), batch 64,
``EPOCHS`` epochs, on CPU in float32 from ``torch.manual_seed(SEED)`` with a seeded shuffle, so the
same data gives the same network. It is cached as ``<cache>/fid/<key>.pt`` (cache = ``$LOWBIT_CACHE``
or ``~/.cache/lowbit``; key = a hash of the data module's class and its data options, and of this
recipe's version), with its validation accuracy in ``<key>.json``. ``FrechetInceptionDistance``
(torchmetrics) receives it as its custom ``feature`` module and does the statistics in float64.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data.corpus import cache_root
from lowbit.errors import LowbitError

__all__ = [
    "EPOCHS",
    "SEED",
    "FeatureNet",
    "data_key",
    "stack_dataset",
    "feature_net",
    "frechet_distance",
    "train_feature_net",
]

SEED = 0
EPOCHS = 12
_VERSION = 2  # bump when the architecture or the training recipe changes: old caches are then ignored
_DATA_OPTIONS = (
    "image_size",
    "in_chans",
    "num_classes",
    "interpolation",
    "val_fraction",
    "seed",
    "root",
    "mean",
    "std",
)


class FeatureNet(nn.Module):
    """The FID feature extractor: ``forward`` gives the (B, 64) pooled features, ``logits`` the class scores."""

    num_features = 64  # torchmetrics reads this instead of probing with a dummy image

    def __init__(self, in_chans: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, self.num_features, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W), standardised as the data module gives them → features (B, 64).

        Always float32, whatever autocast the caller runs under (a sampler inside a precision
        plugin's context): the network is trained and used in one precision, so features and FID
        do not depend on the run's precision."""
        with torch.autocast(images.device.type, enabled=False):
            return self.convs(images.float()).mean(dim=(2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        features = self(images)
        with torch.autocast(features.device.type, enabled=False):
            return self.classifier(features)


def stack_dataset(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """All (image, label) pairs of a dataset as (N, C, H, W) and (N,) tensors."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:  # a TensorDataset (digits): no per-item loop
        return tensors[0].float(), tensors[1].long()
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images).float(), torch.as_tensor(labels).long()


def train_feature_net(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = EPOCHS, seed: int = SEED
) -> FeatureNet:
    """Train a ``FeatureNet`` classifier on (N, C, H, W) images, deterministically from ``seed`` (CPU, float32).

    Works when called from inside validation (Lightning's inference mode): it trains with grad enabled.
    """
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.random.fork_rng(devices=[]),
        torch.autocast("cpu", enabled=False),  # float32 whatever precision context the caller is in
    ):
        images, labels = (
            images.detach().cpu().float().clone(),
            labels.cpu().clone(),
        )  # normal tensors, not inference ones
        torch.manual_seed(seed)
        net = FeatureNet(images.shape[1], num_classes)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        order = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=order).split(64):
                loss = F.cross_entropy(net.logits(images[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.eval().requires_grad_(False)


def data_key(datamodule: Any) -> dict[str, Any]:
    """What identifies the training images of a data module: its class and data options (not batch sizes)."""
    options = {}
    for name in _DATA_OPTIONS:
        value = getattr(datamodule, name, None)
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, (tuple, list)):
            value = [float(v) for v in value]
        options[name] = value
    return {"data": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}", "version": _VERSION, **options}


def feature_net(datamodule: Any, cache_dir: str | Path | None = None, echo=None) -> FeatureNet:
    """The feature network for this data module's training split: loaded from the cache, or trained and cached."""
    splits = datamodule.splits  # builds them (and sets data statistics such as digits' mean/std) first
    key = data_key(datamodule)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / "fid"
    path = folder / f"{digest}.pt"
    in_chans, num_classes = int(datamodule.in_chans), int(datamodule.num_classes)
    if path.is_file():
        net = FeatureNet(in_chans, num_classes)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval().requires_grad_(False)
    train_images, train_labels = stack_dataset(splits[0])
    if echo is not None:
        echo(f"training the FID feature network on {len(train_images)} images (once; cached at {path})")
    net = train_feature_net(train_images, train_labels, num_classes)
    val_images, val_labels = stack_dataset(splits[1])
    with torch.no_grad():
        accuracy = float((net.logits(val_images).argmax(-1) == val_labels).float().mean())
    if accuracy < 0.5:
        warnings.warn(
            f"the FID feature network reached {accuracy:.1%} validation accuracy (chance: {1 / num_classes:.1%}); "
            "FID in its feature space says little about image quality",
            stacklevel=2,
        )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # one per process: concurrent runs may train it at once
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)  # atomic: a concurrent run never reads half a file
    path.with_suffix(".json").write_text(json.dumps({**key, "val_accuracy": accuracy, "epochs": EPOCHS}, indent=1))
    return net


def frechet_distance(
    real: Iterable[torch.Tensor] | torch.Tensor, fake: Iterable[torch.Tensor] | torch.Tensor, net: nn.Module
) -> float:
    """FID between two image sets (tensors (N, C, H, W) or iterables of batches) in ``net``'s feature space.

    torchmetrics' ``FrechetInceptionDistance`` with ``net`` as its custom feature extractor (float64 statistics).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=net, normalize=True)
    device = next(net.parameters()).device
    for is_real, images in ((True, real), (False, fake)):
        batches = images.split(256) if isinstance(images, torch.Tensor) else images
        for batch in batches:
            metric.update(batch.to(device, torch.float32), real=is_real)
    if int(metric.real_features_num_samples) < 2 or int(metric.fake_features_num_samples) < 2:
        raise LowbitError("FID needs at least 2 real and 2 generated images")
    return float(metric.compute())
