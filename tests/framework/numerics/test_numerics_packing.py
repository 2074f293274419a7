"""FP4 / INT4 nibble packing: element 2i in the low nibble."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.numerics import pack_fp4, quantize, unpack_fp4, unpack_int4


def test_pack_layout_and_round_trip():
    codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0xF3]]
    assert torch.equal(unpack_fp4(packed), codes)
    q = quantize(torch.randn(3, 4, 64), "mxfp4")
    assert pack_fp4(q.codes).shape == (3, 4, 32) and torch.equal(unpack_fp4(pack_fp4(q.codes)), q.codes)


def test_int4_round_trip():
    codes = torch.arange(-8, 8, dtype=torch.int8).view(2, 8)
    assert torch.equal(unpack_int4(pack_fp4(codes)), codes)
    q = quantize(torch.randn(4, 64), "int4_group32")
    assert torch.equal(unpack_int4(pack_fp4(q.codes)), q.codes)


def test_packing_errors():
    with pytest.raises(LowbitError, match=r"even last dim, got shape \(2, 3\)"):
        pack_fp4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(LowbitError, match="uint8 or int8 codes, got torch.float32"):
        pack_fp4(torch.zeros(2, 4))
    with pytest.raises(LowbitError, match="uint8 packed bytes"):
        unpack_fp4(torch.zeros(2, 4, dtype=torch.int32))
