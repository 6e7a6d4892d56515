"""vLLM general plugin for the CPU build: FP8 x FP8 matmuls in float32 instead of oneDNN's reference kernel.

Installed into the vLLM environment by `make vllm-env` (entry point `vllm.general_plugins`), so every vLLM process
of that environment loads it; the GPU path (the user's image) never sees it. Like the worker extension beside it,
it imports nothing from the project.

Why: vLLM serves FP8_DYNAMIC (per-channel) layers on CPU through `torch._scaled_mm`, which oneDNN implements with a
real kernel only on CPUs with FP8 instructions; elsewhere it runs its reference implementation (`ref:any` in
ONEDNN_VERBOSE), measured at ~70 MFLOP/s on a 2-core Xeon with AMX-BF16: ~40x slower serving than BF16. Products of
two e4m3 values are exact in float32, so `A.float() @ B.float()` computes the same sums (in another order, as any
other kernel does) times the same scales.
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def register() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or getattr(torch._scaled_mm, "mtp_abliterate", False):
        return  # plugins load in every vLLM process, and may load twice in one
    reference = torch._scaled_mm

    def scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        if a.device.type != "cpu" or a.dtype not in FP8_DTYPES or scale_result is not None:
            return reference(a, b, scale_a, scale_b, bias, scale_result, out_dtype, use_fast_accum)
        out = torch.mm(a.float(), b.float()) * scale_a.float() * scale_b.float()
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype or a.dtype)

    scaled_mm.mtp_abliterate = True
    torch._scaled_mm = scaled_mm
