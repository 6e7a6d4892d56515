"""Which draft-tune settings recover the most speed-true acceptance? Variants screened in process, no server.

For one candidate of a study (`draft-tune`'s own rebuilt checkpoints under runs/<study>/draft-tune/trial-N/), every
answer is generated greedily in transformers (the BF16 candidate in float32, as draft-tune teaches from; the server
runs its FP8 copy, whose per-expert layout transformers does not load), each variant of
the draft is trained from the vanilla draft on the same training answers with `search/draft/distill.py`, and each
draft is replayed over the eval sets' answers with vLLM's MTP wiring (`search/draft/wiring.py`): the rounds greedy
speculative decoding takes are determined by the body's text and the draft's proposals, so speed-true accepted per
step, (sum T - sum S) / sum S with T = completion tokens - 1 and S = verify steps, is computed exactly as the
served objective defines it, up to the server's numerics. Recovered = paired gain (tuned - vanilla draft, same
prompts) / the candidate's paired loss against the vanilla body (its own answers with the vanilla draft).

    python benchmarks/bench_draft_levers.py runs/organism --config configs/organism.toml --trial 0 \\
        --variants shipped,no-tail,steps-1000

`oracle` variants are a ceiling, not a setting: trained on the eval answers themselves, they say how much of the
candidate's loss this draft can win back at all on those texts.

Prints one table (median of nothing: one seeded training run per variant; the training seed is the study's) and
writes it as JSON beside the trial's draft-tune folder. A screen, not the served figure: confirm a winner with
`mtp-abliterate draft-tune`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, Gemma4AssistantForCausalLM, Gemma4ForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".shim")) if (REPO / ".shim").is_dir() else None

from mtp_abliterate.objectives.paired import paired  # noqa: E402
from mtp_abliterate.organism.acceptance_sim import AcceptanceCounts, replay_rounds  # noqa: E402
from mtp_abliterate.organism.generate import encode_prompt  # noqa: E402
from mtp_abliterate.search.candidate.checkpoint import locate  # noqa: E402
from mtp_abliterate.search.config import load_config  # noqa: E402
from mtp_abliterate.search.draft.distill import VLLM_POSITION_OFFSET, Budget, distil  # noqa: E402
from mtp_abliterate.search.draft.tune import load_body  # noqa: E402
from mtp_abliterate.search.draft.wiring import Example, body_states, draft_chain, pad_batch  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    steps: int = 300
    lr: float = 1e-3
    tail: bool = True  # teach the body's tokens past the stop (speed-true never credits them)
    changed_copies: int = 1  # copies in the mix of each training answer the candidate changed (vs the vanilla body)
    oracle: bool = False  # a ceiling, not a setting: trained on the eval sets' own answers (what this draft can fit)


VARIANTS = {
    v.name: v
    for v in [
        Variant("shipped"),
        Variant("no-tail", tail=False),
        Variant("steps-1000", steps=1000),
        Variant("lr-3e-4", lr=3e-4),
        Variant("no-tail-steps-1000", steps=1000, tail=False),
        Variant("lr-3e-4-steps-1000", steps=1000, lr=3e-4),
        Variant("steps-3000", steps=3000),
        Variant("lr-3e-3", lr=3e-3),
        Variant("changed-x4", changed_copies=4),
        Variant("changed-x4-steps-1000", steps=1000, changed_copies=4),
        Variant("oracle", oracle=True),
        Variant("oracle-steps-1000", steps=1000, oracle=True),
    ]
}


def _greedy(body: Gemma4ForCausalLM, seqs: list[list[int]], new: int, pad: int, stop: bool) -> list[list[int]]:
    """`generate` over left-padded `seqs`: the next `new` greedy tokens, cut after the first stop token (`stop`) or
    run on past it."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in seqs], device=body.device)
    lengths = torch.tensor([len(p) for p in seqs], device=body.device)
    mask = (torch.arange(width, device=body.device)[None, :] >= width - lengths[:, None]).long()
    eos = body.config.eos_token_id if stop else None
    gen = body.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=0 if stop else new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )[:, width:].tolist()
    stops = set(eos if isinstance(eos, list) else [eos]) if stop else set()
    return [g[: next((i + 1 for i, t in enumerate(g) if t in stops), len(g))] for g in gen]


@torch.no_grad()
def answers(body: Gemma4ForCausalLM, encoded: list[list[int]], max_new: int, pad: int, tail: int) -> list[Example]:
    """Greedy answers (KV-cached, 64 per batch), each with the body's next `tail` tokens past its stop."""
    out = []
    for start in range(0, len(encoded), 64):
        chunk = encoded[start : start + 64]
        replies = _greedy(body, chunk, max_new, pad, stop=True)
        full = [p + r for p, r in zip(chunk, replies, strict=True)]
        tails = _greedy(body, full, tail, pad, stop=False) if tail else [[] for _ in full]
        out += [Example(f, len(p), tuple(t)) for p, f, t in zip(chunk, full, tails, strict=True) if len(f) > len(p)]
    return out


@torch.no_grad()
def steps_per_answer(body, draft, examples: list[Example], n: int, pad: int) -> list[tuple[int, int]]:
    """(T, S) per answer: tokens emitted after the prefill's and verify steps, replaying greedy speculative decoding
    with vLLM's wiring; proposals past the stop are never emitted."""
    out = []
    window = body.config.sliding_window
    for start in range(0, len(examples), 32):
        chunk = examples[start : start + 32]
        batch = pad_batch([Example(e.ids, e.prompt_len) for e in chunk], pad)
        ids, attn = batch[0].to(body.device), batch[1].to(body.device)
        _, hidden, kv = body_states(body, ids, attn)
        embed = body.get_input_embeddings()
        chain = draft_chain(draft, embed, ids, hidden, kv, n, window, position_offset=VLLM_POSITION_OFFSET)
        proposals = torch.stack([logits.argmax(-1) for logits in chain], dim=-1).tolist()
        for i, e in enumerate(chunk):
            counts = AcceptanceCounts(accepted_per_pos=[0] * n)  # its verify steps are its rounds
            replay_rounds(e.ids, e.prompt_len, proposals[i], counts)
            out.append((len(e.ids) - e.prompt_len - 1, counts.num_drafts))
    return out


def per_step(pairs: list[tuple[int, int]]) -> float:
    t, s = map(sum, zip(*pairs, strict=True))
    return (t - s) / s


def paired_gain(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> tuple[float, float]:
    """b - a and its 95 % half-width on the same prompts (`objectives/paired.py`)."""
    as_counts = lambda pairs: {  # noqa: E731
        "x": {"index": range(len(pairs)), "steps": [s for _, s in pairs], "accepted": [t - s for t, s in pairs]}
    }
    d = paired(as_counts(b), as_counts(a), {"x": 1.0})
    return d.difference, d.halfwidth


def mix_of(variant: Variant, examples: list[Example], changed: list[bool], oracle: list[Example]) -> list[Example]:
    """The variant's training answers: the candidate's to the training prompts, those it changed `changed_copies`
    times over (or the eval sets' own answers for the oracle), with or without the tail past the stop."""
    if variant.oracle:
        mix = oracle
    else:
        mix = [e for e, c in zip(examples, changed, strict=True) for _ in range(variant.changed_copies if c else 1)]
    return [e if variant.tail else replace(e, tail=()) for e in mix]


def train(variant: Variant, body, vanilla: Path, mix: list[Example], n: int, pad: int, seed: int, bs: int):
    draft = Gemma4AssistantForCausalLM.from_pretrained(vanilla, dtype=torch.float32).to(body.device)
    budget = Budget(variant.steps, None, bs, variant.lr, 20)
    t0 = time.perf_counter()
    done = distil(draft, body, mix, budget, n, pad, seed, lambda step, loss: None)
    return draft.eval(), time.perf_counter() - t0, done.last_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path, help="a study's run folder, after `draft-tune` rebuilt the trial there")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "organism.toml", help="the study's TOML")
    ap.add_argument("--trial", type=int, default=0)
    ap.add_argument("--variants", default="shipped,no-tail,steps-1000,lr-3e-4")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config, check_paths=False)  # the vLLM environment is not needed here
    device = torch.device(args.device)
    work = args.study / "draft-tune" / f"trial-{args.trial:04d}"
    tok = AutoTokenizer.from_pretrained(work / "candidate-bf16")
    pad = tok.pad_token_id or 0
    n, max_new = cfg.serving.num_speculative_tokens, cfg.acceptance.max_tokens
    system = cfg.model.system_prompt
    read = lambda src: [p for p in Path(src).read_text().splitlines() if p.strip()]  # noqa: E731
    evals = {s.name: [encode_prompt(tok, p, system) for p in read(s.prompts.source)] for s in cfg.acceptance.sets}
    train_prompts = [encode_prompt(tok, p, system) for ps in cfg.draft_tune_prompts() for p in read(ps.source)]
    console = Console()
    # float32 on a GPU too, so that a CPU and a GPU screen agree
    vanilla_body = load_body(locate(cfg.model.target).path, device, torch.float32)
    cand = load_body(work / "candidate-bf16", device, torch.float32)
    vanilla_draft = Path(cfg.model.draft)
    draft0 = Gemma4AssistantForCausalLM.from_pretrained(vanilla_draft, dtype=torch.float32).eval().to(device)
    console.print("generating answers (vanilla body, candidate; eval sets and training mix)")
    ref, base = {}, {}
    eval_answers = {}
    changed: dict[str, list[bool]] = {}  # per prompt: the candidate's answer differs from the vanilla body's
    for name, enc in evals.items():
        vanilla_answers = answers(vanilla_body, enc, max_new, pad, 0)
        ref[name] = steps_per_answer(vanilla_body, draft0, vanilla_answers, n, pad)
        eval_answers[name] = answers(cand, enc, max_new, pad, 0)
        base[name] = steps_per_answer(cand, draft0, eval_answers[name], n, pad)
        changed[name] = [a.ids != b.ids for a, b in zip(vanilla_answers, eval_answers[name], strict=True)]
    examples = answers(cand, train_prompts, max_new, pad, n - 1)
    variants = [VARIANTS[v] for v in args.variants.split(",") if v != "kept"]
    train_changed = [False] * len(examples)
    if any(v.changed_copies > 1 for v in variants):  # which training answers the candidate changed
        said = {tuple(e.ids[: e.prompt_len]): e.ids for e in answers(vanilla_body, train_prompts, max_new, pad, 0)}
        train_changed = [said.get(tuple(e.ids[: e.prompt_len])) != e.ids for e in examples]
        console.print(f"training answers the candidate changed: {sum(train_changed)} of {len(examples)}")
    oracle = (
        [a for enc in evals.values() for a in answers(cand, enc, max_new, pad, n - 1)]
        if any(v.oracle for v in variants)
        else []
    )
    rows: list[dict] = []
    out = work / "draft-levers.json"
    for v in args.variants.split(","):
        if v == "kept":  # the draft `draft-tune` saved for this trial
            draft, seconds, loss = (
                Gemma4AssistantForCausalLM.from_pretrained(work / "draft", dtype=torch.float32).to(device),
                0.0,
                0.0,
            )
        else:
            bs = cfg.draft_tune.batch_size
            mix = mix_of(VARIANTS[v], examples, train_changed, oracle)
            draft, seconds, loss = train(VARIANTS[v], cand, vanilla_draft, mix, n, pad, cfg.search.seed, bs)
        row: dict = {"variant": v, "train_s": round(seconds, 1), "last_loss": round(loss, 5)}
        for name in evals:
            tuned = steps_per_answer(cand, draft, eval_answers[name], n, pad)
            loss_v, _ = paired_gain(base[name], ref[name])
            gain, half = paired_gain(base[name], tuned)
            row[name] = {
                "vanilla_body": round(per_step(ref[name]), 3),
                "vanilla_draft": round(per_step(base[name]), 3),
                "tuned": round(per_step(tuned), 3),
                "gain": round(gain, 3),
                "halfwidth": round(half, 3),
                "recovered": round(gain / loss_v, 3) if loss_v > 0 else None,
            }
            for part, want in (("changed", True), ("unchanged", False)):  # where the loss and the gain lie
                pick = [i for i, c in enumerate(changed[name]) if c == want]
                if pick:
                    row[name][part] = {"prompts": len(pick)} | {
                        k: round(per_step([pairs[i] for i in pick]), 3)
                        for k, pairs in (("vanilla_body", ref[name]), ("vanilla_draft", base[name]), ("tuned", tuned))
                    }
        rows.append(row)
        console.print(row)
        out.write_text(json.dumps(rows, indent=1) + "\n")  # each variant as it finishes
    table = Table(title=f"{args.study.name} trial {args.trial}: draft-tune variants, speed-true accepted/step (screen)")
    for col in ["variant", *[f"{s}: vanilla draft -> tuned, gain (recovered)" for s in evals], "train s"]:
        table.add_column(col)
    for r in rows:
        cells = [
            f"{r[s]['vanilla_draft']} -> {r[s]['tuned']}, {r[s]['gain']:+.3f} ± {r[s]['halfwidth']:.3f} "
            f"({r[s]['recovered']:.0%})"
            for s in evals
        ]
        table.add_row(r["variant"], *cells, str(r["train_s"]))
    console.print(table)
    console.print(f"written: {out}")


if __name__ == "__main__":
    main()
