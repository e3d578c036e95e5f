"""The GPU benchmark: ``python -m bench.gpu [--out DIR] [--deadline S] [--only FAMILY] [--full]``.

Shapes where a GPU is busy, peers pinned and timed in the same run by CUDA events after warm-up,
and a deadline for the whole run, so that it fits a short GPU window (``.ci/gpu-check`` gives it a
few minutes). One module per op family in this folder defines

    cases(device: torch.device, plan: str) -> list[bench.Case]     plan: "smoke", "default" or "full"
    HEADLINES: list[bench.Headline]                                   time ratios with their goals

``smoke`` runs every case's code at tiny shapes on any device (the tests use it on CPU); it measures
nothing. Besides time, a case's ``params`` may carry ``flops`` (attention: TFLOP/s column, causal
FLOPs halved) and ``floor_goal`` (the fraction of the measured device-copy bandwidth the subject
should reach, for memory-bound ops). The run never touches README.md: its table and JSON go to
``--out``.
"""

FAMILIES = ("logn_attention", "sign_optim", "global_pointer", "entropy_norm", "biohash")
