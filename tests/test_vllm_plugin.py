"""The project's vLLM CPU plugin, in the vLLM environment as `make vllm-env` installs it: vLLM loads it through its
general-plugin entry point, and its FP8 matmul gives oneDNN's reference results (exact products, float32 sums)."""

from __future__ import annotations

import subprocess
from pathlib import Path

PROBE = """
import torch
reference = torch._scaled_mm
from vllm.plugins import load_general_plugins
load_general_plugins()
assert torch._scaled_mm is not reference and torch._scaled_mm.mtp_abliterate, "plugin not loaded"
torch.manual_seed(0)
for m, n, k in ((1, 128, 128), (17, 256, 128), (50, 128, 256)):
    a = (torch.randn(m, k) * 4).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k) * 4).to(torch.float8_e4m3fn).t()
    exact = torch.mm(a.double(), b.double())
    # vLLM's channel-wise FP8 kernel calls it with unit scales and scales the float32 result itself.
    one = torch.ones(1)
    got = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
    want = reference(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), exact, rtol=1e-6, atol=1e-3), (m, n, k)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-3), (m, n, k)
    sa, sb = torch.rand(m, 1), torch.rand(1, n)
    got = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), exact * sa.double() * sb.double(), rtol=1e-2, atol=1e-2), (m, n, k)
print("ok")
"""


def test_the_cpu_fp8_plugin_is_loaded_by_vllm_and_matches_the_reference_kernel(vllm_python: Path) -> None:
    proc = subprocess.run([str(vllm_python), "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
