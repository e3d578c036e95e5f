"""What Triton's JIT will specialise, for the tests that hold the AOT lists to it.

Triton compiles an integer argument equal to 1 as a constant unless the kernel lists it in
``do_not_specialize``; tests/gpu_compile.py compiles the integers a configuration lists under
``unaligned_ints`` as runtime values. A kernel whose integers are often 1 must therefore keep them
at runtime, or GPUs run code the static check never compiled. The flags are read in a child process:
the test process runs Triton's interpreter (tests/conftest.py), whose functions keep none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence


def runtime_ints(kernels: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    """``{kernel: names of its do_not_specialize arguments}`` for the ``@triton.jit`` functions
    ``kernels`` names (``{module: [kernel, ...]}``), as the compiling (not interpreting) JIT sees them."""
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for module, names in json.loads(sys.argv[1]).items():\n"
        "    m = importlib.import_module(module)\n"
        "    out.update({k: [p.name for p in getattr(m, k).params if p.do_not_specialize] for k in names})\n"
        "print(json.dumps(out))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    arg = json.dumps({module: list(names) for module, names in kernels.items()})
    run = subprocess.run([sys.executable, "-c", code, arg], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return {name: set(names) for name, names in json.loads(run.stdout).items()}


def assert_compiled_as_kept(configs: Iterable[dict], kept: dict[str, set[str]], required: Iterable[str]) -> None:
    """Every configuration's kernel keeps ``required`` (where it has them) at runtime, and compiles
    every integer its kernel keeps as a runtime value: listed in ``unaligned_ints``, no constexpr."""
    required = set(required)
    for c in configs:
        ints = kept[c["kernel"].fn.__name__]
        assert required & set(c["signature"]) <= ints, (c["name"], required - ints)
        for name in ints:
            assert name in c.get("unaligned_ints", ()) and name not in c.get("constexprs", {}), (c["name"], name)
