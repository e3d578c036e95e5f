"""The sign-optimizer step table: the one definition of its columns, flags and random streams.

``kexue::sign_optim_step`` takes, per tensor, a row of float64 coefficients and a row of int64
values and flags (and, in capturable mode, a row of the float64 dynamic table on the device). The
optimizers fill the rows, every backend reads them: the torch backend, the Triton kernel (which
loads this file by path when kexue is not installed) and the C++ kernels, whose header
csrc/include/kexue/sign_optim.h spells the same numbers (tests/sign_optim/test_table.py checks
that it agrees with this module). Plain Python: no imports, so anything can import it.
"""

# Columns of the float table (float64; the kernels round the coefficients to float32 once per tensor).
LR, WD, C_M, C_G, M_M, M_G, GSCALE, SHRINK, CENTRE = range(9)
NUM_FLOATS = 9

# Columns of the int table.
FLAGS, NAN_GROUP, ROW_LEN, MASK_K0, MASK_K1, MASK_THRESHOLD, ROUND_K0, ROUND_K1 = range(8)
NUM_INTS = 8

# Bits of the FLAGS column.
USE_NEW_MOMENTUM = 1 << 0  # Tiger: the direction is sign(m'), not Lion's interpolation
UPDATE = 1 << 1  # theta is stepped by this call (Tiger skips it on accumulation micro-steps)
RMS_TENSOR = 1 << 2  # lr *= RMS(theta) over the whole tensor
RMS_ROW = 1 << 3  # lr *= RMS(theta) over each row
LAZY_ROWS = 1 << 4  # embedding-drift guard: rows whose gradient is all zero do not move
FREEZE_ABSENT = 1 << 5  # ... and keep their momentum too
MASK_F = 1 << 6  # ChildTuning-F: Bernoulli(p) gradient mask from the hash
MASK_D = 1 << 7  # ChildTuning-D: fixed mask tensor
MASK_UPDATE = 1 << 8  # masked elements are not stepped either
STOCHASTIC_ROUND = 1 << 9  # bfloat16 params are stored with stochastic rounding
SHRINK_NOW = 1 << 10  # the NaN guard was decided on the host (sharded tensors)
DYNAMIC = 1 << 11  # capturable mode: the per-step values come from the dynamic table
# One-pass Tiger: the tensor's ``ssq`` buffer (one float64 per tensor, or per row with RMS_ROW)
# holds the sum of squares of theta as the previous call left it, so the RMS factor is read
# from it instead of from theta (no pre-pass over the params) ...
RMS_CARRIED = 1 << 12
# ... and the call leaves in ``ssq`` the sum of squares of theta as it stores it, for the next.
SSQ_OUT = 1 << 13

# Columns of the dynamic table (float64 on the tensors' device; the keys are uint32 values).
D_LR, D_M_M, D_GSCALE, D_UPDATE, D_SKIP, D_MASK_K0, D_MASK_K1, D_ROUND_K0, D_ROUND_K1 = range(9)
NUM_DYN = 9

# Streams of random bits drawn from one (seed, parameter, step).
MASK_STREAM = 1
ROUND_STREAM = 2

# Tiger's tensor kinds (the lr factor and weight decay of each: kexue.optim.Tiger).
TIGER_KINDS = ("matrix", "embedding", "bias", "gamma")


def keep_threshold(p: float) -> int:
    """ChildTuning-F keeps an element iff ``(bits >> 8) < threshold``: probability threshold/2^24 ~ p."""
    return max(0, min(1 << 24, round(p * (1 << 24))))
