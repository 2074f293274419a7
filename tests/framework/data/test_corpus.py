"""Corpus building: deterministic split, checksum-verified cache, unigram baseline."""

import math

import numpy as np
import pytest

from lowbit.data.corpus import load_corpus, stdlib_files, text_files, unigram_bits_per_byte
from lowbit.errors import LowbitError


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}\n" * 20)
    return root


def test_split_is_deterministic_and_by_file(folder, tmp_path):
    root, files = text_files(folder)
    a = load_corpus(root, files, 0.2, tmp_path / "c1")
    b = load_corpus(root, files, 0.2, tmp_path / "c2")
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    val_docs = bytes(a.val).split(b"\0")[:-1]
    train_docs = bytes(a.train).split(b"\0")[:-1]
    assert len(val_docs) + len(train_docs) == 40 and 0 < len(val_docs) < 20
    assert not set(val_docs) & set(train_docs)
    # files in sorted order, each whole, NUL-terminated
    assert train_docs == sorted(train_docs, key=lambda d: int(d.split()[1]))


def test_corrupt_or_missing_cache_is_rebuilt(folder, tmp_path):
    root, files = text_files(folder)
    good = load_corpus(root, files, 0.2, tmp_path / "c")
    expected = np.array(good.train)
    train_bin = good.root / "train.bin"
    raw = bytearray(train_bin.read_bytes())
    raw[5] ^= 0xFF  # flip one byte: same size, wrong checksum
    train_bin.write_bytes(bytes(raw))
    assert np.array_equal(load_corpus(root, files, 0.2, tmp_path / "c").train, expected)
    (good.root / "val.bin").unlink()
    assert len(load_corpus(root, files, 0.2, tmp_path / "c").val) == len(good.val)


def test_single_file_splits_by_bytes(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(256)) * 4)
    c = load_corpus(*text_files(path), 0.25, tmp_path / "c")
    assert len(c.val) == 257  # the last quarter plus the separator
    assert bytes(c.train) + bytes(c.val) == bytes(range(256)) * 4 + b"\0"


def test_unigram_baseline_matches_the_formula():
    train = np.array([0, 0, 0, 1], dtype=np.uint8)
    val = np.array([0, 1], dtype=np.uint8)
    total = 4 + 256  # add-one smoothing over 256 byte values
    expected = -(math.log2(4 / total) + math.log2(2 / total)) / 2
    assert unigram_bits_per_byte(train, val) == pytest.approx(expected, rel=1e-12)


def test_stdlib_files_are_sorted_python_sources():
    root, files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 500
    assert all(r.endswith(".py") and "site-packages" not in r for r in rel)
    assert "os.py" in rel


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(LowbitError, match="data.path '/nope' does not exist"):
        text_files("/nope")
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    with pytest.raises(LowbitError, match="holds no text files"):
        text_files(tmp_path)
