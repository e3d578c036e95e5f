"""Triton kernels of kexue, installed as ``kexue.triton_kernels``.

One module per op family: ``@triton.jit`` kernels and the plain launchers that allocate outputs and
pick the grid. No autograd and no validation here (that is ``kexue.ops``). Each module lists the
kernel configurations it ships in ``AOT_CONFIGS`` so tests/gpu_compile.py can compile every one
ahead of time for sm_80 and sm_90.
"""
