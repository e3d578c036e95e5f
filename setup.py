"""Build kexue and its native module kexue._C.

The C++ CPU sources always build. The CUDA sources build too when the installed torch has CUDA,
nvcc is found, and the GPU architectures to compile for are known: a GPU is visible to torch (its
own architecture is used) or TORCH_CUDA_ARCH_LIST names them (e.g. "8.0;9.0", to build on a machine
without a GPU for one with). Otherwise the module is CPU-only and the Triton kernels serve CUDA
tensors; the build prints which case applied, and ``python -m kexue.env`` says so afterwards.
KEXUE_NO_NATIVE=1 skips the native build entirely (kexue then runs on the torch reference).
Install with ``pip install --no-build-isolation .`` (or ``-e .``) after torch is installed.
Extras: ``[test]`` what the tests need, ``[bench]`` the packages the benchmarks time kexue against,
``[transformers]`` and ``[triton]``; each is listed in requirements/<extra>.txt (the Makefile
installs from the same files).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _requirements(name: str) -> list[str]:
    """The package lines of requirements/<name>.txt."""
    with open(os.path.join(ROOT, "requirements", f"{name}.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


# Why the CUDA sources were left out although nvcc is there (kexue.env repeats it).
NO_ARCH = (
    "no GPU visible and TORCH_CUDA_ARCH_LIST unset: set it (e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0') "
    "to build the CUDA kernels on a machine without a GPU"
)


def _want_cuda(torch, environ=os.environ, cuda_home: str | None = None) -> tuple[bool, str]:
    """Whether to build the CUDA sources, and why (printed by the build)."""
    if environ.get("KEXUE_NO_CUDA") == "1":
        return False, "KEXUE_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "the installed torch has no CUDA"
    if cuda_home is None and shutil.which("nvcc") is None:
        return False, "nvcc not found"
    # Without an architecture list torch's extension builder asks each visible GPU for its own;
    # with none visible it has nothing to compile for and fails midway through the build.
    arch_list = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if arch_list and arch_list != "native":
        return True, f"torch CUDA {torch.version.cuda}, TORCH_CUDA_ARCH_LIST={arch_list}"
    if torch.cuda.device_count() == 0:
        return False, NO_ARCH
    return True, f"torch CUDA {torch.version.cuda}, for the visible GPU(s)"


def _extensions():
    if os.environ.get("KEXUE_NO_NATIVE") == "1":
        print("kexue: KEXUE_NO_NATIVE=1, skipping kexue._C", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fno-trapping-math lets GCC turn float selects into vector blends (we never read FP flags).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    from torch.utils.cpp_extension import CUDA_HOME

    use_cuda, why = _want_cuda(torch, os.environ, CUDA_HOME)
    print(f"kexue: CUDA sources {'on' if use_cuda else 'off'} ({why})", file=sys.stderr)
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("KEXUE_WITH_CUDA", None))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        if os.environ.get("KEXUE_NVCC_RESOURCE_USAGE") == "1":
            nvcc.append("--resource-usage")
        ext = CUDAExtension(
            "kexue._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "kexue._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # pip runs this file as __main__; tests import _want_cuda
    ext_modules, cmdclass = _extensions()
    setup(
        name="kexue",
        version="0.1.0",
        description="Fused GPU kernels with fast CPU fallbacks for PyTorch",
        packages=[*find_packages("python"), "kexue.triton_kernels"],
        package_dir={"": "python", "kexue.triton_kernels": "triton_kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        python_requires=">=3.10",
        install_requires=["torch>=2.5", "numpy"],
        extras_require={
            "triton": ["triton"],
            "test": _requirements("test"),
            "bench": _requirements("bench"),
            "transformers": ["transformers"],
        },
    )
