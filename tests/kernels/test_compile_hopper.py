"""Every kernel the benches launch compiles for Hopper (sm_90) on a machine without a GPU.

The interpreter runs a kernel's Python, not Triton's compiler, so code that only the compiler
rejects (a non-constexpr global, a plain Python call inside a ``constexpr_function``) passes
every interpreted test and fails on the first GPU, as it did on the first H200 run. Here a
stand-in driver answers "CUDA, capability 9.0", every launch becomes a compile-only warmup, and
the autotuned GEMM compiles its largest and smallest tiles: the full pipeline down to ptxas's
cubin, in a subprocess without ``TRITON_INTERPRET``.
"""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile for real")


def test_every_bench_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    compiled = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith("compiled_"))
    kernels = {name.split(" ")[0] for name in compiled.values()}
    assert kernels == {"_amax_kernel", "_quantize_fp8_tensor_kernel", "_quantize_fp8_row_kernel",
                       "_quantize_mx_kernel", "_quantize_nvfp4_kernel", "_gemm_kernel"}, kernels  # fmt: skip
    failed = [line for line in proc.stdout.splitlines() if line.startswith("failed ")]
    assert not failed, "\n".join(failed)


def _compile_everything() -> None:
    """Run the kernel bench's quantize and GEMM cases at 256 x 256 with compile-only launches."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class Hopper(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            raise NotImplementedError

        def get_empty_cache_for_benchmark(self):
            raise NotImplementedError

        def clear_cache(self, cache):
            pass

    driver.set_active(Hopper())
    seen: set[str] = set()
    compile_only = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = compile_only(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel.hash not in seen:
            seen.add(kernel.hash)
            print(f"compiled_{len(seen)} {self.fn.__name__} shared={kernel.metadata.shared}", flush=True)
        return kernel

    def autotuned(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        for config in {id(c): c for c in (configs[0], configs[-1])}.values():
            self.fn.run(*args, grid=None, warmup=True, **kwargs, **config.all_kwargs())

    JITFunction.run = run
    Autotuner.run = autotuned

    import lowbit.bench.kernels as bench
    from lowbit.kernels import _common, amax, gemm_blockscaled, quantize_fp8, quantize_mx, quantize_nvfp4

    for module in (_common, amax, gemm_blockscaled, quantize_fp8, quantize_mx, quantize_nvfp4):
        module.check_device = lambda *tensors, what: None  # CPU tensors stand in for CUDA ones
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)

    def launch(fn):
        try:
            fn()
        except Exception as err:
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            print(f"failed {str(err).splitlines()[0][:200]} <- {str(cause).strip()[-600:]}", flush=True)
        return 1.0

    bench._ms = launch
    bench._torchao_quantizers = lambda x: {}
    bench._torchao_matmuls = lambda x, w: {}
    bench.quantize_rows(256, device="cpu")
    bench.gemm_rows([256], device="cpu")


if __name__ == "__main__":
    _compile_everything()
