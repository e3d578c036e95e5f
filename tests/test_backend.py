"""Backend selection and the fallback when the native module is missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import kexue
from kexue import _backend


def test_automatic_choice_on_cpu_prefers_the_native_module():
    name, _ = _backend.select("entropy_normalize", torch.empty(2, 3))
    assert name == ("cpu" if _backend.native() is not None else "torch")


def test_float64_and_forced_torch():
    with kexue.use_backend("torch"):
        assert _backend.select("entropy_normalize", torch.empty(2, 3))[0] == "torch"
    assert _backend.forced() is None


def test_kexue_imports_and_falls_back_without_the_native_module():
    # Hide kexue._C from the import system, as when the build failed or the ABI does not match.
    script = textwrap.dedent(
        """
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "kexue._C":
                    raise ImportError("simulated: no native module")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kexue
            import kexue.ops
        import torch
        from kexue import _backend
        assert _backend.native() is None
        msgs = [str(w.message) for w in caught if "kexue._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "falls back to the torch reference" in msgs[0]
        assert _backend.select("entropy_normalize", torch.empty(2, 3))[0] == "torch"
        y = kexue.ops.entropy_normalize(torch.softmax(torch.randn(3, 5), -1), 1.0)
        assert torch.allclose(-(y * y.log()).sum(-1), torch.ones(3), atol=1e-5)
        assert not kexue.backends()["cpu"]["available"]
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_env_report_names_every_backend():
    from kexue.env import report

    text = report()
    for name in ("triton", "cuda", "cpu", "torch", "entropy_norm"):
        assert name in text


def test_an_op_can_prefer_another_order_without_changing_the_others():
    op, other = "toy_prefer", "toy_prefer_default"
    try:
        for name in (op, other):
            _backend.register(name, "torch", lambda: "torch", (torch.float32,))
            _backend.register(name, "cpu", lambda: "cpu", (torch.float32,))
        x = torch.ones(2)
        if not kexue.backends()["cpu"]["available"]:
            pytest.skip("the native module is not built here")
        assert _backend.select(op, x)[0] == "cpu"
        _backend.prefer(op, "cpu", ("torch",))
        assert _backend.preference(op, "cpu") == ("torch", "cpu")
        assert _backend.select(op, x)[0] == "torch"
        assert _backend.select(other, x)[0] == "cpu"  # other ops keep the default order
        with kexue.use_backend("cpu"):  # forcing still wins over the preference
            assert _backend.select(op, x)[0] == "cpu"
        with pytest.raises(ValueError, match="unknown backends"):
            _backend.prefer(op, "cpu", ("fast",))
    finally:
        for name in (op, other):
            _backend._REGISTRY.pop(name, None)
            _backend._OP_PREFERENCE.pop((name, "cpu"), None)
