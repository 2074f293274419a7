"""lowbit kernels: Triton kernels that make ``lowbit.numerics``' numbers fast on GPUs.

One file per kernel family, each with the ``@triton.jit`` kernel, a launcher that checks its input,
allocates and launches, a ``torch.library`` custom op (namespace ``lowbit``) with a fake
implementation for ``torch.compile``, and a ``benchmark`` against the torch baseline:

  quantize_fp8      FP8 E4M3/E5M2, FP32 tensor (amax included, or a given scale) or row scales
  quantize_mx       MXFP8 / MXFP4: E8M0 scales on 32-element blocks, every MX scale rule
  quantize_nvfp4    NVFP4: E2M1 with E4M3 (or UE5M3) scales on 1x16 / 16x16 blocks, FP32 tensor scale
  amax              the tensor amax the per-tensor scales need
  gemm_blockscaled  C = A·Bᵀ on codes and block scales, FP32 accumulation
  dispatch          QuantSpec -> kernel, what QuantLinear's triton backend calls

Quantize kernels write rowwise and colwise (transposed) outputs from one read, fuse the random
Hadamard transform and round by RNE (bit-exact with the numerics) or stochastically (Philox).
Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before the
kernel modules are imported). Importing this package alone does not import Triton.
"""
