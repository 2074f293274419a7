"""Image data: digits (sizes, seeded stratified split, balance, normalisation, stream), ImageFolder, errors."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.data.images import (
    Digits,
    ImageFolderData,
    SeededImageStream,
    load_digits_tensors,
    stratified_split,
)
from lowbit.errors import LowbitError

CLASS_SIZES = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's digits per class


def _val_labels(data):
    return data.val_set.tensors[1]


def test_digits_sizes_and_stratified_split():
    data = Digits(image_size=16, val_fraction=0.2, seed=0)
    images, labels = data.train_set.tensors
    assert images.shape[1:] == (1, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    val_counts = torch.bincount(_val_labels(data), minlength=10).tolist()
    assert sum(val_counts) == 360  # scikit-learn's train_test_split: ceil(0.2 · 1797) to val, stratified
    assert all(abs(v - 0.2 * n) < 1 for v, n in zip(val_counts, CLASS_SIZES))
    assert torch.bincount(labels, minlength=10).tolist() == [n - v for n, v in zip(CLASS_SIZES, val_counts)]
    assert len(data.train_set) + len(data.val_set) == 1797
    assert (data.num_classes, data.image_size, data.in_chans) == (10, 16, 1)


def test_split_is_a_pure_function_of_the_seed_and_disjoint():
    labels = load_digits_tensors(8)[1].numpy()
    train, val = stratified_split(labels, 0.2, seed=5)
    again_train, again_val = stratified_split(labels, 0.2, seed=5)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert not set(train) & set(val) and len(train) + len(val) == 1797
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=6)[1])
    from sklearn.model_selection import train_test_split

    _, sklearn_val = train_test_split(np.arange(1797), test_size=0.2, stratify=labels, random_state=5)
    assert np.array_equal(val, np.sort(sklearn_val))
    with pytest.raises(LowbitError, match="cannot split 3 images of 2 classes by data.val_fraction=0.5"):
        stratified_split(np.array([0, 0, 1]), 0.5, seed=0)  # a class with a single image
    a, b = Digits(seed=5), Digits(seed=5)
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])


def test_the_standardisation_is_the_training_splits_before_anything_else_is_read():
    """mean/std read first build the splits: a sampler clamping x̂₀ to the standardised pixel range of a fresh
    data module got the placeholders 0 and 1 (samples clamped to [0, 1] instead of about [-0.8, 1.9])."""
    fresh = Digits(seed=0)
    mean, std = fresh.mean, fresh.std  # before the splits were asked for
    raw, labels = load_digits_tensors(fresh.image_size, fresh.interpolation)
    train_idx, _ = stratified_split(labels.numpy(), fresh.val_fraction, 0)
    train = raw[torch.from_numpy(train_idx)]
    assert mean == pytest.approx(train.mean().item(), rel=1e-6) and std == pytest.approx(train.std().item(), rel=1e-6)
    assert 0.1 < mean < 0.5 and 0.2 < std < 0.6  # digits: mostly blank pixels, strokes up to 1


def test_values_are_standardised_by_the_training_split():
    data = Digits(image_size=16, seed=0)
    train = data.train_set.tensors[0]
    assert train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train.std().item() == pytest.approx(1.0, abs=1e-5)
    raw, _ = load_digits_tensors(16)
    assert raw.min().item() >= 0.0 and raw.max().item() <= 1.0
    torch.testing.assert_close(data.val_set.tensors[0].amin(), (0.0 - data.mean) / data.std * torch.ones(()))


def test_resizing_nearest_repeats_pixels_and_8_is_the_original():
    from sklearn.datasets import load_digits

    original = torch.from_numpy(load_digits().images).float()[:, None] / 16  # (N, 1, 8, 8)
    same, _ = load_digits_tensors(8)
    assert torch.equal(same, original)
    nearest, _ = load_digits_tensors(16, "nearest")
    assert torch.equal(nearest, original.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    with pytest.raises(LowbitError, match="unknown data.interpolation 'area'; valid: nearest, bilinear, bicubic"):
        Digits(interpolation="area")
    with pytest.raises(LowbitError, match="data.num_classes must be 10, got 3"):
        Digits(num_classes=3)


def test_rgb_digits_repeat_the_grey_channel():
    data = Digits(image_size=8, in_chans=3, seed=0)
    x = data.train_set.tensors[0]
    assert x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 2])


def test_training_stream_is_seeded_epoch_permutations():
    data = Digits(image_size=8, batch_size=16, seed=3)
    n = len(data.train_set)
    stream = SeededImageStream(data.train_set, seed=3)
    perm0, perm1 = stream.permutation(0).copy(), stream.permutation(1).copy()
    assert sorted(perm0) == list(range(n)) and not np.array_equal(perm0, perm1)  # each image once per epoch
    assert torch.equal(stream[5][0], data.train_set[int(perm0[5])][0])
    assert torch.equal(stream[n + 4][0], data.train_set[int(perm1[4])][0])
    assert torch.equal(stream[n + 4][0], SeededImageStream(data.train_set, seed=3)[n + 4][0])
    x, y = next(iter(data.train_dataloader()))  # no trainer: starts at sample 0
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    assert torch.equal(x[0], stream[0][0]) and torch.equal(x[15], stream[15][0])


def test_loader_resumes_after_the_samples_the_trainer_consumed():
    data = Digits(image_size=8, batch_size=4, seed=3)
    data.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=2, global_rank=1, world_size=2)
    x, _ = next(iter(data.train_dataloader()))
    stream = SeededImageStream(data.train_set, seed=3)
    # 10 batches (steps · accumulation) of 2 ranks · 4 samples consumed: global sample 80; rank 1 takes 84..87
    for row, i in enumerate(range(84, 88)):
        assert torch.equal(x[row], stream[i][0])


def test_augmentation_shifts_by_at_most_max_shift_and_fills_the_border():
    data = Digits(image_size=8, augment=True, seed=0)
    stream = data._stream(data.train_set)  # max_shift 1, the border a blank pixel
    plain = SeededImageStream(data.train_set, seed=0)
    blank = (0.0 - data.mean) / data.std
    shifts = []
    for i in range(40):
        image, original = stream[i][0], plain[i][0]
        padded = torch.nn.functional.pad(original, (1, 1, 1, 1), value=blank)  # (1, 10, 10)
        found = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(image, padded[:, 1 - dy : 9 - dy, 1 - dx : 9 - dx])
        ]
        assert found, i  # a translation by (dy, dx) in [-1, 1]², blank where the image moved away
        shifts.append(found[0])
    assert len(set(shifts)) >= 6  # torchvision's RandomCrop draws all nine
    assert torch.equal(stream[7][0], stream[7][0])  # augmentation seeded by (seed, i)
    assert torch.equal(stream[7][0], data._stream(data.train_set)[7][0])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    stream[3]
    assert torch.equal(torch.rand(1), before)  # torch's global generator untouched


def _write_png(path, rgb, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)


@pytest.fixture
def folder(tmp_path):
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for cls, rgb in colors.items():
        for i in range(3):
            _write_png(tmp_path / "train" / cls / f"{i}.png", rgb)
        _write_png(tmp_path / "val" / cls / "0.png", rgb)
    return tmp_path


def test_imagefolder_reads_train_and_val(folder):
    data = ImageFolderData(root=str(folder), num_classes=2, image_size=4, in_chans=3, batch_size=2)
    assert data.classes == ["cat", "dog"] and len(data.train_set) == 6 and len(data.val_set) == 2
    image, label = data.val_set[1]
    assert image.shape == (3, 4, 4) and label == 1
    assert torch.equal(image, torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 4, 4))  # blue, (v - 0.5) / 0.5
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (2, 3, 4, 4) and y.dtype == torch.int64
    grey = ImageFolderData(root=str(folder), num_classes=2, image_size=4, in_chans=1)
    assert grey.val_set[0][0].shape == (1, 4, 4)


def test_imagefolder_single_folder_is_split_by_class(tmp_path):
    for cls in ("a", "b"):
        for i in range(10):
            _write_png(tmp_path / cls / f"{i}.png", (i * 20, 0, 0))
    data = ImageFolderData(root=str(tmp_path), num_classes=2, image_size=4, val_fraction=0.2, seed=1)
    assert len(data.train_set) == 16 and len(data.val_set) == 4
    assert sorted(label for _, label in data.val_set.samples) == [0, 0, 1, 1]


def test_imagefolder_errors(folder, tmp_path):
    with pytest.raises(LowbitError, match="data.root=/no/such/folder: no such folder"):
        ImageFolderData(root="/no/such/folder", num_classes=2)
    with pytest.raises(
        LowbitError, match=r"data.num_classes=5 but .* has 2 class folders \(cat, dog\); set data.num_classes=2"
    ):
        ImageFolderData(root=str(folder), num_classes=5)
