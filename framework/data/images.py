"""Image-classification data: scikit-learn's embedded digits, or any ImageFolder tree.

Both modules expose ``num_classes``, ``image_size`` and ``in_chans`` (the data YAML holds them, so
the model YAML interpolates ``${data.num_classes}``). As with text, the training stream is a pure
function of (seed, sample index): sample ``i`` is item ``perm_e[i mod n]`` of the training split,
``perm_e`` the permutation of epoch ``e = i // n`` drawn from ``np.random.default_rng([seed, e])``,
with augmentation (if on, torchvision v2) seeded by ``[seed, i]``; the train/val split is scikit-learn's
stratified ``train_test_split`` with ``random_state=seed``. The loader starts after the last sample the
restored trainer consumed, so a resumed run sees the batches an uninterrupted run would have.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lowbit.data.sampling import GlobalBatchStream, rank_and_world, samples_consumed, val_indices
from lowbit.data.text import check_sizes, check_workers
from lowbit.errors import LowbitError

__all__ = ["Digits", "ImageFolderData", "SeededImageStream", "augmentation", "load_digits_tensors", "stratified_split"]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


# ---- functions -----------------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices, both sorted: scikit-learn's ``train_test_split(stratify=labels)`` with
    ``random_state=seed`` (ceil(val_fraction · n) to val, each class's share within one of val_fraction · n_c)."""
    from sklearn.model_selection import train_test_split

    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=seed % 2**32
        )
    except ValueError as err:  # a class with one image, or fewer val images than classes
        raise LowbitError(
            f"cannot split {len(labels)} images of {len(np.unique(labels))} classes by data.val_fraction={val_fraction}: {err}"
        ) from err
    return np.sort(train_idx), np.sort(val_idx)


def load_digits_tensors(image_size: int, interpolation: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as (N, 1, size, size) float32 in [0, 1] (pixel / 16, then resized) and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 16.0  # (N, 1, 8, 8)
    if image_size != images.shape[-1]:
        smooth = interpolation != "nearest"
        images = F.interpolate(
            images,
            size=(image_size, image_size),
            mode=interpolation,
            align_corners=False if smooth else None,
            antialias=smooth and image_size < images.shape[-1],  # only shrinking needs a low-pass
        )
    return images, torch.from_numpy(digits.target).long()


def augmentation(image_size: tuple[int, int], max_shift: int, flip: bool = False, fill: float = 0.0):
    """torchvision v2: a random shift by up to ``max_shift`` pixels (``RandomCrop`` of the image padded by
    ``max_shift`` with ``fill``), then, with ``flip``, a random horizontal flip."""
    from torchvision.transforms import v2

    shift = v2.RandomCrop(list(image_size), padding=max_shift, fill=fill)
    return v2.Compose([shift, v2.RandomHorizontalFlip(0.5)] if flip else [shift])


# ---- datasets ------------------------------------------------------------------------------------


class SeededImageStream(Dataset):
    """Sample ``i`` → (image, label): item ``perm_e[i mod n]`` of ``base``, e = i // n, optionally augmented.

    Augmentation (light, ``augmentation``: torchvision v2): a random shift by up to ``max_shift`` pixels
    (border = ``fill``) and, with ``flip``, a random horizontal flip; torch's generator seeded by (seed, i).
    """

    def __init__(
        self, base: Dataset, seed: int, augment: bool = False, max_shift: int = 1, flip: bool = False, fill: float = 0.0
    ) -> None:
        self.base, self.seed, self.augment = base, seed, augment
        self.max_shift, self.flip, self.fill = max_shift, flip, fill
        self.n = len(base)
        self._epoch, self._perm = -1, np.arange(0)
        self._transform = None  # torchvision's, built for the first image's size

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # one permutation per epoch, kept while the stream is inside it
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        epoch, j = divmod(int(i), self.n)
        image, label = self.base[int(self.permutation(epoch)[j])]
        if self.augment:
            if self._transform is None:
                self._transform = augmentation(tuple(image.shape[-2:]), self.max_shift, self.flip, self.fill)
            with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's generator: seed it by (seed, i)
                torch.manual_seed(int(np.random.SeedSequence([self.seed, int(i)]).generate_state(1)[0]))
                image = self._transform(image)
        return image, int(label)


class _ImageFiles(Dataset):
    """(path, label) pairs → (normalised (C, size, size) float32 image, label), decoded with PIL on access."""

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int, in_chans: int, mean, std) -> None:
        self.samples, self.image_size, self.mode = list(samples), image_size, "L" if in_chans == 1 else "RGB"
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]  # (C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert(self.mode).resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # (H, W) or (H, W, C)
        image = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)  # (C, H, W)
        return (image - self.mean) / self.std, label


# ---- data modules --------------------------------------------------------------------------------


class _ImageData(L.LightningDataModule):
    """Shared machinery: the resumable seeded training stream and the fixed validation split."""

    shards_by_rank = True  # each rank reads its slice itself (lowbit.data.sampling): no DistributedSampler

    def __init__(
        self,
        *,
        image_size: int,
        in_chans: int,
        num_classes: int,
        batch_size: int,
        val_batch_size: int | None,
        val_fraction: float,
        augment: bool,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        check_sizes(image_size=image_size, batch_size=batch_size, val_batch_size=val_batch_size)
        check_workers(num_workers)
        if not 0 < val_fraction < 1:
            raise LowbitError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.image_size, self.in_chans, self.num_classes = image_size, in_chans, num_classes
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.val_fraction, self.augment, self.seed, self.num_workers = val_fraction, augment, seed, num_workers
        self._splits: tuple[Dataset, Dataset] | None = None

    def _build_splits(self) -> tuple[Dataset, Dataset]:
        """(train, val) datasets of (image (C, H, W), label)."""
        raise NotImplementedError

    def _stream(self, train: Dataset) -> SeededImageStream:
        return SeededImageStream(train, self.seed, self.augment, max_shift=max(1, self.image_size // 8))

    @property
    def train_set(self) -> Dataset:
        return self.splits[0]

    @property
    def val_set(self) -> Dataset:
        return self.splits[1]

    @property
    def splits(self) -> tuple[Dataset, Dataset]:
        if self._splits is None:
            self._splits = self._build_splits()
        return self._splits

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = rank_and_world(trainer)
        sampler = GlobalBatchStream(samples_consumed(trainer, self.batch_size), self.batch_size, rank, world)
        return DataLoader(
            self._stream(self.train_set), batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        sampler = val_indices(len(self.val_set), *rank_and_world(getattr(self, "trainer", None)))
        return DataLoader(self.val_set, batch_size=self.val_batch_size, sampler=sampler, num_workers=self.num_workers)


class Digits(_ImageData):
    """scikit-learn's embedded 8×8 digits (1797 images, 10 classes), resized to ``image_size``; no download.

    Pixels are scaled to [0, 1], resized, then standardised by the training split's mean and std.
    The train/val split is stratified and a pure function of ``seed``. ``in_chans: 3`` repeats the
    grey channel (for models built for RGB). Augmentation: shifts by up to image_size/8 pixels.
    """

    lowbit_plugin_api = 1

    def __init__(
        self,
        *,
        image_size: int = 16,
        interpolation: str = "bilinear",
        in_chans: int = 1,
        num_classes: int = 10,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        val_fraction: float = 0.2,
        augment: bool = False,
        seed: int = 1337,
        num_workers: int = 0,
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise LowbitError(f"unknown data.interpolation '{interpolation}'; valid: {', '.join(INTERPOLATIONS)}")
        if num_classes != 10:
            raise LowbitError(f"the digits data has 10 classes; data.num_classes must be 10, got {num_classes}")
        if in_chans not in (1, 3):
            raise LowbitError(f"digits are grey: data.in_chans must be 1 (or 3 to repeat the channel), got {in_chans}")
        super().__init__(
            image_size=image_size,
            in_chans=in_chans,
            num_classes=num_classes,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            val_fraction=val_fraction,
            augment=augment,
            seed=seed,
            num_workers=num_workers,
        )
        self.interpolation = interpolation
        self._stats: tuple[float, float] | None = None  # (mean, std) of the training split, set with the splits

    @property
    def mean(self) -> float:
        """The training split's pixel mean (building the splits if they are not yet): what standardises them."""
        return self._split_stats()[0]

    @property
    def std(self) -> float:
        """The training split's pixel standard deviation (see ``mean``)."""
        return self._split_stats()[1]

    def _split_stats(self) -> tuple[float, float]:
        self.splits  # noqa: B018  (built once; sets the statistics)
        return self._stats

    def _build_splits(self) -> tuple[TensorDataset, TensorDataset]:
        images, labels = load_digits_tensors(self.image_size, self.interpolation)  # (N, 1, S, S), (N,)
        train_idx, val_idx = (
            torch.from_numpy(i) for i in stratified_split(labels.numpy(), self.val_fraction, self.seed)
        )
        mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
        self._stats = (mean, std)
        images = ((images - mean) / std).expand(-1, self.in_chans, -1, -1).contiguous()  # (N, C, S, S)
        return TensorDataset(images[train_idx], labels[train_idx]), TensorDataset(images[val_idx], labels[val_idx])

    def _stream(self, train: Dataset) -> SeededImageStream:
        background = (0.0 - self.mean) / self.std  # a blank pixel, standardised
        return SeededImageStream(
            train, self.seed, self.augment, max_shift=max(1, self.image_size // 8), fill=background
        )


class ImageFolderData(_ImageData):
    """Images in torchvision's ImageFolder layout: ``root/train/<class>/*.png`` and ``root/val/<class>/...``,
    or ``root/<class>/...`` split (stratified, by ``seed``) into train and val by ``val_fraction``.

    Images are converted to grey (``in_chans: 1``) or RGB (3), resized to ``image_size``² (bilinear),
    scaled to [0, 1] and normalised by ``mean``/``std`` (default 0.5: values in [−1, 1]).
    ``num_classes`` must equal the number of class folders (checked at build time).
    Augmentation: random horizontal flips and shifts by up to image_size/8 pixels.
    """

    lowbit_plugin_api = 1

    def __init__(
        self,
        *,
        root: str,
        num_classes: int,
        image_size: int = 32,
        in_chans: int = 3,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        val_fraction: float = 0.1,
        augment: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 1337,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            image_size=image_size,
            in_chans=in_chans,
            num_classes=num_classes,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            val_fraction=val_fraction,
            augment=augment,
            seed=seed,
            num_workers=num_workers,
        )
        if in_chans not in (1, 3):
            raise LowbitError(f"data.in_chans must be 1 (grey) or 3 (RGB), got {in_chans}")
        self.root = Path(os.path.expanduser(root))
        if not self.root.is_dir():
            raise LowbitError(
                f"data.root={root}: no such folder; give an ImageFolder tree (root/train/<class>/*.png and root/val/<class>/..., or root/<class>/*.png)"
            )
        self.mean = [0.5] * in_chans if mean is None else [float(m) for m in mean]
        self.std = [0.5] * in_chans if std is None else [float(s) for s in std]
        if len(self.mean) != in_chans or len(self.std) != in_chans or min(self.std) <= 0:
            raise LowbitError(
                f"data.mean and data.std need {in_chans} values (one per channel, std > 0), got {self.mean} and {self.std}"
            )
        self.train_dir = self.root / "train" if (self.root / "train").is_dir() else self.root
        from torchvision.datasets.folder import find_classes

        try:
            self.classes, self.class_to_idx = find_classes(str(self.train_dir))
        except FileNotFoundError as err:
            raise LowbitError(f"data.root={root}: no class folders in {self.train_dir}") from err
        if len(self.classes) != num_classes:
            shown = ", ".join(self.classes[:10]) + (", ..." if len(self.classes) > 10 else "")
            raise LowbitError(
                f"data.num_classes={num_classes} but {self.train_dir} has {len(self.classes)} class folders ({shown}); set data.num_classes={len(self.classes)}"
            )

    def _samples(self, directory: Path) -> list[tuple[str, int]]:
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        return make_dataset(str(directory), self.class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)

    def _build_splits(self) -> tuple[Dataset, Dataset]:
        train = self._samples(self.train_dir)
        if self.train_dir != self.root and (self.root / "val").is_dir():
            val = self._samples(self.root / "val")
        else:  # one folder: a stratified split by seed
            labels = np.array([label for _, label in train])
            train_idx, val_idx = stratified_split(labels, self.val_fraction, self.seed)
            train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
        for split, samples in (("train", train), ("val", val)):
            if not samples:
                raise LowbitError(f"data.root={self.root}: the {split} split has no images")
        make = lambda s: _ImageFiles(s, self.image_size, self.in_chans, self.mean, self.std)
        return make(train), make(val)

    def _stream(self, train: Dataset) -> SeededImageStream:
        return SeededImageStream(train, self.seed, self.augment, max_shift=max(1, self.image_size // 8), flip=True)
