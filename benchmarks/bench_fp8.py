"""The fast path's merge + quantize stages at Gemma 4 26B-A4B's shapes, and FP8 parity with compressed-tensors.

  python benchmarks/bench_fp8.py [--device cuda] [--repeats 3]

Random BF16 weights at the real shapes of every editable matrix (30 layers: o_proj 2816x4096 on sliding layers,
2816x8192 on full ones, dense down_proj 2816x2112; 60 matrices, 1.16 G values), with edge rows (all-zero, values
that round to -0, a lone outlier). Times, per all-layer candidate:
  digest    sha256 of the edited matrices' BF16 bytes (the trial's merged_digest)
  quantize  `quantize_rows` (search/candidate/quantize.py) on the device, copied to the host
  write     one safetensors file per matrix (what `write_candidate` writes; symlinks are free)
and checks the formula against compressed-tensors' own `quantize` for the same scales: its eager path and, on a GPU
with triton, its fused kernel (which divides in fp32: why `quantize_fp8_dynamic` forces the eager path).
Medians and spreads of `--repeats` runs; absolute times name the device they ran on.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_abliterate.search.candidate.quantize import quantize_rows  # noqa: E402

console = Console(width=120)
HIDDEN, LAYERS, FULL_EVERY = 2816, 30, 6  # 5 sliding : 1 full
O_PROJ = {"sliding": 4096, "full": 8192}
DOWN_PROJ = 2112


def shapes() -> list[tuple[str, tuple[int, int]]]:
    out = []
    for layer in range(LAYERS):
        kind = "full" if (layer + 1) % FULL_EVERY == 0 else "sliding"
        out.append((f"layers.{layer}.self_attn.o_proj.weight", (HIDDEN, O_PROJ[kind])))
        out.append((f"layers.{layer}.mlp.down_proj.weight", (HIDDEN, DOWN_PROJ)))
    return out


def weights(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    for name, shape in shapes():
        w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        w[0] = 0
        w[1] = -1e-30
        w[1, 0] = 1.0
        w[2, 7] = 40.0
        out[name] = w.to(device)
    return out


def _timed(fn, repeats: int, device: str) -> list[float]:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def parity(ws: dict[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """(path, elements differing from the formula, elements) for compressed-tensors' quantize paths."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.utils import impl_backend

    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    rows = []
    paths = [("compressed-tensors eager", True)] + (
        [("compressed-tensors fused (triton)", False)] if any(w.is_cuda for w in ws.values()) else []
    )
    for label, eager in paths:
        impl_backend.ENFORCE_EAGER = eager
        differ = total = 0
        for w in ws.values():
            q, scale = quantize_rows(w)
            theirs = quantize(w, scale, torch.zeros_like(scale), args, dtype=torch.float8_e4m3fn)
            differ += int((theirs.view(torch.uint8) != q.view(torch.uint8)).sum())
            total += w.numel()
        rows.append((label, differ, total))
    impl_backend.ENFORCE_EAGER = True
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ws = weights(args.device)
    gb = sum(w.numel() for w in ws.values()) * 2 / 1e9

    def digest() -> None:
        h = hashlib.sha256()
        for name, w in ws.items():
            h.update(name.encode())
            h.update(w.cpu().contiguous().view(torch.uint8).numpy().tobytes())

    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def quantize_all() -> None:
        for name, w in ws.items():
            q, s = quantize_rows(w)
            quantized[name] = (q.cpu(), s.cpu())

    with tempfile.TemporaryDirectory() as tmp:

        def write() -> None:
            for name, (q, s) in quantized.items():
                save_file({name: q, name + "_scale": s}, Path(tmp) / f"edit-{name}.safetensors")

        times = {
            "digest": _timed(digest, args.repeats, args.device),
            "quantize": _timed(quantize_all, args.repeats, args.device),
            "write": _timed(write, args.repeats, args.device),
        }
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    table = Table(title=f"all-layer candidate, 60 matrices, {gb:.2f} GB BF16, {device}, {args.repeats} repeats")
    for col in ("stage", "median s", "min s", "max s"):
        table.add_column(col)
    for stage, t in times.items():
        table.add_row(stage, f"{statistics.median(t):.2f}", f"{min(t):.2f}", f"{max(t):.2f}")
    total = sum(statistics.median(t) for t in times.values())
    table.add_row("merge + quantize stages", f"{total:.2f}", "", "")
    console.print(table)
    for label, differ, n in parity(ws):
        console.print(f"{label}: {differ} of {n} FP8 values differ from the formula ({differ / n:.2e})")


if __name__ == "__main__":
    main()
