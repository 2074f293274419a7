"""Text data modules: windows, resumable stream, validation windows, errors."""

import pytest
import torch

from lowbit.data.text import ByteWindows, RandomWindows, TextFiles
from lowbit.errors import LowbitError


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(256)) * 40)
    return TextFiles(
        path=str(path),
        seq_len=16,
        batch_size=4,
        val_windows=5,
        val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
        seed=3,
    )


def test_windows_are_shifted_by_one_and_seeded(data):
    ds = RandomWindows(data.corpus.train, 16, seed=3)
    x, y = ds[7]
    assert x.shape == y.shape == (16,) and x.dtype == torch.int64
    assert torch.equal(x[1:], y[:-1])
    assert torch.equal(ds[7][0], RandomWindows(data.corpus.train, 16, seed=3)[7][0])
    assert not all(torch.equal(ds[i][0], ds[i + 1][0]) for i in range(5))


def test_validation_windows_are_fixed_and_span_the_split(data):
    ds = ByteWindows(data.corpus.val, 16, 5)
    assert len(ds) == 5 and ds.offsets[0] == 0 and ds.offsets[-1] == len(data.corpus.val) - 17
    x, y = ds[4]
    assert torch.equal(x[1:], y[:-1])


def test_loader_without_trainer_starts_at_zero(data):
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 16)
    assert torch.equal(x[0], RandomWindows(data.corpus.train, 16, seed=3)[0][0])


def test_too_little_text_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abc")
    with pytest.raises(LowbitError, match="fewer than data.seq_len"):
        TextFiles(path=str(path), seq_len=16, cache_dir=str(tmp_path)).corpus  # noqa: B018
