"""One `draft-tune` training step at Gemma 4 26B-A4B's real shapes, and what a budget costs on a DGX Spark.

  python benchmarks/bench_draft_tune.py --device cuda [--layers 30] [--batch 4] [--seq-len 1024] [--repeats 5]

Random BF16 weights: the body at 26B-A4B's text shapes (benchmarks/bench_memory.py's TEXT: 30 layers, 128 experts,
top-8) and a draft at the released assistant's config (`google/gemma-4-26B-A4B-it-assistant`: hidden 1024,
intermediate 8192, 3 sliding + 1 full layer, 16 heads, 8 KV heads (2 global), head_dim 256 / 512, window 1024,
vocab 262144, tied lm_head; values from transformers' Gemma 4 conversion script, not read from the hub here). The
step is the product's own (search/draft/distill.py `chain_loss` + AdamW): the body's forward (frozen, BF16) for
hidden states and KV, then the draft's 4 chained steps forward and backward in float32, then the optimiser.
Prints medians and spreads of `--repeats` steps (after one warm-up), split into body forward and draft
update, and projects a budget's hours on a GB10 from the H200 time by two ratios printed beside it (peak BF16
compute and memory bandwidth): a projection, not a Spark measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import REAL_LAYERS, TEXT  # noqa: E402 (the benchmarks share the real body shapes)

# The released assistant's text config (see the module doc).
ASSISTANT_TEXT = dict(
    hidden_size=1024,
    intermediate_size=8192,
    num_hidden_layers=4,
    layer_types=["sliding_attention"] * 3 + ["full_attention"],
    num_attention_heads=16,
    num_key_value_heads=8,
    num_global_key_value_heads=2,
    head_dim=256,
    global_head_dim=512,
    attention_k_eq_v=True,
    sliding_window=1024,
    vocab_size=262144,
    num_kv_shared_layers=4,
    hidden_size_per_layer_input=0,
    vocab_size_per_layer_input=0,
    enable_moe_block=False,
    final_logit_softcapping=None,
    tie_word_embeddings=True,
)
# Peak dense BF16 TFLOP/s and memory bandwidth (TB/s), the projection's two ratios: H200 vendor figures; GB10's BF16
# derived from its vendor figure of 1 PFLOP/s sparse FP4 (/2 dense, /4 BF16), 273 GB/s LPDDR5x.
H200 = (989.0, 4.8)
GB10 = (125.0, 0.273)
CHAIN_STEPS = 4


def models(layers: int, device: torch.device):
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4ForCausalLM, Gemma4TextConfig

    kinds = (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6) + ["sliding_attention"] * (layers % 6)
    body_config = Gemma4TextConfig(**{**TEXT, "num_hidden_layers": layers, "layer_types": kinds})
    draft_config = Gemma4AssistantConfig(
        text_config=Gemma4TextConfig(**ASSISTANT_TEXT), backbone_hidden_size=TEXT["hidden_size"]
    )
    torch.manual_seed(0)
    with device:
        torch.set_default_dtype(torch.bfloat16)
        body = Gemma4ForCausalLM(body_config).eval()
        torch.set_default_dtype(torch.float32)
        draft = Gemma4AssistantForCausalLM(draft_config)
    return body, draft


def main(args: argparse.Namespace) -> None:
    from mtp_abliterate.search.draft.distill import VLLM_POSITION_OFFSET, adamw_cosine, chain_loss
    from mtp_abliterate.search.draft.wiring import body_states

    console = Console(width=130)
    device = torch.device(args.device)
    body, draft = models(args.layers, device)
    step = adamw_cosine(list(draft.parameters()), 1e-4, 0.0, 1, 10**6)
    params = sum(p.numel() for p in body.parameters()) / 1e9, sum(p.numel() for p in draft.parameters()) / 1e9
    vocab = TEXT["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(10, vocab, (args.batch, args.seq_len), generator=g).to(device)
    attn = torch.ones_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, args.seq_len // 4 :] = True  # a prompt quarter, an answer three quarters: the answer tokens are taught
    window = TEXT["sliding_window"]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    cuda = device.type == "cuda"
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    body_s, total_s, body_peak = [], [], float("nan")
    for i in range(args.repeats + 1):
        sync()
        t0 = time.perf_counter()
        body_states(body, ids, attn)
        sync()
        t1 = time.perf_counter()
        if cuda and not i:
            body_peak = torch.cuda.max_memory_allocated() / 2**30
        loss = chain_loss(draft, body, ids, attn, resp, CHAIN_STEPS, 0, window, VLLM_POSITION_OFFSET, True)
        step(loss)
        sync()
        t2 = time.perf_counter()
        if i:  # the first step warms kernels and allocators
            body_s.append(t1 - t0)
            total_s.append(t2 - t1)  # chain_loss runs the body forward itself: a full step
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    def fmt(xs: list[float]) -> str:
        return f"{statistics.median(xs):.3f} s ({min(xs):.3f}-{max(xs):.3f})"

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    table = Table(title=f"draft-tune step, {name}: body {params[0]:.1f} B, draft {params[1]:.2f} B parameters")
    for col in ("what", f"median of {args.repeats} (min-max)", "tokens/s"):
        table.add_column(col)
    tokens = args.batch * args.seq_len
    table.add_row(
        "training step (body forward + draft update)", fmt(total_s), f"{tokens / statistics.median(total_s):,.0f}"
    )
    table.add_row(
        "of which the body's forward (frozen, BF16)", fmt(body_s), f"{tokens / statistics.median(body_s):,.0f}"
    )
    console.print(table)
    console.print(
        f"batch {args.batch} x {args.seq_len} tokens ({tokens} per step, answers {tokens * 3 // 4}), "
        f"{CHAIN_STEPS} chained draft steps; GPU memory: the two models {resident:.1f} GiB, peak in the "
        f"body's forward {body_peak:.1f} GiB, peak in a step {peak:.1f} GiB"
    )

    step_s = statistics.median(total_s)
    compute, bandwidth = H200[0] / GB10[0], H200[1] / GB10[1]
    proj = Table(title="projected on a DGX Spark (GB10): the H200 step time x a ratio; not a measurement")
    columns = ("budget", f"measured step x steps ({name})", f"GB10, compute ratio {compute:.1f}x")
    for col in (*columns, f"GB10, bandwidth ratio {bandwidth:.1f}x"):
        proj.add_column(col)
    for steps in args.budgets:
        h = steps * step_s / 3600
        proj.add_row(f"{steps} steps", f"{h:.2f} h", f"{h * compute:.1f} h", f"{h * bandwidth:.1f} h")
    console.print(proj)
    console.print(
        f"ratios: peak dense BF16 {H200[0]:.0f} vs {GB10[0]:.0f} TFLOP/s, memory {H200[1]} vs {GB10[1]} TB/s "
        "(vendor figures; GB10 BF16 derived from FP4); the Spark also generates the training answers first "
        "(vLLM, not timed here)"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=REAL_LAYERS)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (prompt + answer)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budgets", type=int, nargs="+", default=[300, 1000, 3000], help="steps to project")
    main(p.parse_args())
