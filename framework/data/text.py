"""Byte-level language-modelling data: the embedded stdlib corpus, or any text file or folder.

Training batches are a pure function of (seed, sample index): sample ``i`` is the window at a
pseudo-random offset drawn from ``np.random.default_rng([seed, i])``. The loader starts at the
sample after the last one the restored trainer consumed, so a resumed run sees exactly the
batches an uninterrupted run would have. Validation is a fixed set of evenly spaced windows.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lowbit.data.corpus import (
    Corpus,
    check_cache_dir,
    check_readable,
    corpus_dir,
    load_corpus,
    split_sizes,
    stdlib_files,
    text_files,
    unigram_bits_per_byte,
)
from lowbit.data.sampling import GlobalBatchStream, rank_and_world, samples_consumed, val_indices
from lowbit.errors import LowbitError

__all__ = ["ByteWindows", "RandomWindows", "StdlibText", "TextFiles", "check_sizes", "check_workers"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sizes(**sizes: int | None) -> None:
    """Each ``data.<name>`` is an integer >= 1; ``val_batch_size`` may be None (then ``batch_size``)."""
    for name, value in sizes.items():
        if not (value is None and name == "val_batch_size") and not (_is_int(value) and value >= 1):
            raise LowbitError(f"data.{name} must be an integer of at least 1, got {value!r}")


def check_workers(num_workers: int) -> None:
    """``data.num_workers`` is an integer >= 0 (0: load in the main process)."""
    if not (_is_int(num_workers) and num_workers >= 0):
        raise LowbitError(f"data.num_workers must be an integer of at least 0, got {num_workers!r}")


class RandomWindows(Dataset):
    """Sample ``i`` → (x, y) windows of ``seq_len`` bytes, y shifted by one, offset seeded by (seed, i)."""

    def __init__(self, data: np.ndarray, seq_len: int, seed: int) -> None:
        self.data, self.seq_len, self.seed = data, seq_len, seed

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        offset = int(np.random.default_rng([self.seed, i]).integers(0, len(self.data) - self.seq_len - 1))
        chunk = torch.from_numpy(self.data[offset : offset + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class ByteWindows(Dataset):
    """``count`` evenly spaced, fixed (x, y) windows (validation)."""

    def __init__(self, data: np.ndarray, seq_len: int, count: int) -> None:
        span = len(data) - seq_len - 1
        self.data, self.seq_len = data, seq_len
        self.offsets = np.linspace(0, span, num=min(count, max(span, 1)), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        offset = int(self.offsets[i])
        chunk = torch.from_numpy(self.data[offset : offset + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class _ByteLM(L.LightningDataModule):
    """Shared machinery: corpus loading, resumable training stream, validation windows."""

    vocab_size = 256
    shards_by_rank = True  # each rank reads its slice itself (lowbit.data.sampling): no DistributedSampler

    def __init__(
        self,
        *,
        seq_len: int = 256,
        batch_size: int = 16,
        val_windows: int = 128,
        val_batch_size: int | None = None,
        val_fraction: float = 0.05,
        cache_dir: str | None = None,
        seed: int = 1337,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_sizes(seq_len=seq_len, batch_size=batch_size, val_windows=val_windows, val_batch_size=val_batch_size)
        check_workers(num_workers)
        if not 0 < val_fraction < 1:
            raise LowbitError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.val_windows, self.val_batch_size = val_windows, val_batch_size or batch_size
        self.val_fraction, self.cache_dir, self.num_workers = val_fraction, cache_dir, num_workers
        self._corpus: Corpus | None = None
        self._listing: tuple[Path, list[Path]] | None = None
        self._check_input()

    def _check_input(self) -> None:
        """What ``corpus`` would fail on, found now (the text is listed and sized, not read): too few
        bytes for one window in either split, a cache folder the corpus cannot be written to."""
        root, files = self._listing = self._files()
        for split, size in split_sizes(root, files, self.val_fraction).items():
            if size < self.seq_len + 2:
                raise LowbitError(
                    f"the {split} split has {size} bytes, fewer than data.seq_len+2 = {self.seq_len + 2}; use more text or a shorter seq_len"
                )
        if not (corpus_dir(root, files, self.val_fraction, self.cache_dir) / "meta.json").is_file():
            check_cache_dir(self.cache_dir)  # to be built: the cache must be writable (a built one may be read-only)

    @abc.abstractmethod
    def _files(self) -> tuple[Path, list[Path]]:
        """(root, files) of the text this data module reads."""

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            root, files = self._listing or self._files()
            corpus = load_corpus(root, files, self.val_fraction, self.cache_dir)
            for split in ("train", "val"):
                if len(getattr(corpus, split)) < self.seq_len + 2:
                    raise LowbitError(
                        f"the {split} split has {len(getattr(corpus, split))} bytes, fewer than data.seq_len+2 = {self.seq_len + 2}; use more text or a shorter seq_len"
                    )
            self._corpus = corpus
        return self._corpus

    def prepare_data(self) -> None:
        self.corpus  # noqa: B018 — build the cache once, before any loader needs it

    def unigram_bits_per_byte(self) -> float:
        """The unigram baseline every model must beat: val cross-entropy under train byte frequencies."""
        return unigram_bits_per_byte(self.corpus.train, self.corpus.val)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = rank_and_world(trainer)
        sampler = GlobalBatchStream(samples_consumed(trainer, self.batch_size), self.batch_size, rank, world)
        dataset = RandomWindows(self.corpus.train, self.seq_len, self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        dataset = ByteWindows(self.corpus.val, self.seq_len, self.val_windows)
        sampler = val_indices(len(dataset), *rank_and_world(getattr(self, "trainer", None)))
        return DataLoader(dataset, batch_size=self.val_batch_size, sampler=sampler, num_workers=self.num_workers)


class StdlibText(_ByteLM):
    """The embedded default: the running interpreter's standard-library sources, as bytes."""

    lowbit_plugin_api = 1

    def _files(self) -> tuple[Path, list[Path]]:
        return stdlib_files()


class TextFiles(_ByteLM):
    """Any text file, or a folder of text files (``data=text data.path=...``)."""

    lowbit_plugin_api = 1

    def __init__(self, *, path: str, **kwargs) -> None:
        check_readable(path, text_files(path)[1])  # a missing, unreadable or empty path: one line now, not mid-run
        self.path = os.fspath(path)  # before the base's checks, which list the files
        super().__init__(**kwargs)

    def _files(self) -> tuple[Path, list[Path]]:
        return text_files(self.path)
