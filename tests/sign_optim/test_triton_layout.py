"""The Triton kernels' own copy of the step-table layout equals the reference's."""

from __future__ import annotations

import pytest

from kexue.reference import sign_optim as R


def test_triton_table_layout_matches_the_reference():
    """triton_kernels/sign_optim_layout.py keeps its own copy of the table layout (it must import without
    kexue); it has to be the reference's (and so the C++ header's, which the oracle tests cover)."""
    tk = pytest.importorskip("kexue.triton_kernels.sign_optim_layout")
    names = [
        "LR",
        "WD",
        "C_M",
        "C_G",
        "M_M",
        "M_G",
        "GSCALE",
        "SHRINK",
        "CENTRE",
        "NUM_FLOATS",
        "FLAGS",
        "NAN_GROUP",
        "ROW_LEN",
        "MASK_K0",
        "MASK_K1",
        "MASK_THRESHOLD",
        "ROUND_K0",
        "ROUND_K1",
        "NUM_INTS",
        "USE_NEW_MOMENTUM",
        "UPDATE",
        "RMS_TENSOR",
        "RMS_ROW",
        "LAZY_ROWS",
        "FREEZE_ABSENT",
        "MASK_F",
        "MASK_D",
        "MASK_UPDATE",
        "STOCHASTIC_ROUND",
        "SHRINK_NOW",
    ]
    assert {n: getattr(tk, n) for n in names} == {n: getattr(R, n) for n in names}
