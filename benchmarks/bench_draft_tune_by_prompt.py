"""Where a draft-tune result's acceptance loss lives, prompt by prompt: the vanilla body (the study's FP8 base) and
the trial's candidate with the vanilla and with the tuned draft, served one after another in the study's harness.

  python benchmarks/bench_draft_tune_by_prompt.py runs/<study> --trial N

Needs a study folder where `draft-tune --trial N` has run (its FP8 candidate and tuned draft are reused) and the
study's FP8 base. Each answer carries its own spec-decode histogram; per set it prints mean accepted tokens per
draft over every prompt and over the prompts whose candidate answer is the vanilla body's word for word, and the
answers that differ. A loss on answers that changed is the body writing something else (a draft cannot predict
text the body no longer writes the same way); a loss on identical answers is the draft's alignment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_abliterate.objectives.acceptance import Draws  # noqa: E402
from mtp_abliterate.objectives.served import Reply  # noqa: E402
from mtp_abliterate.search.config import StudyConfig  # noqa: E402
from mtp_abliterate.search.draft.run import work_dir  # noqa: E402
from mtp_abliterate.search.draft.tune import measure, server_for  # noqa: E402
from mtp_abliterate.search.prompts import load_prompt_set  # noqa: E402
from mtp_abliterate.search.study.storage import load_study_config, run_dir_of  # noqa: E402

console = Console(width=120)


def served_replies(cfg: StudyConfig, model: Path, draft: Path, log: Path) -> dict[str, list[Reply]]:
    """Every prompt of every acceptance set, greedy, each reply with its spec-decode histogram."""
    sets = [(s.name, load_prompt_set(cfg.model, s.prompts), s.weight) for s in cfg.acceptance.sets]
    with server_for(cfg.serving, model, str(draft), log, cfg.name) as server:
        return measure(cfg, server, sets).replies


def mean_accepted(replies: list[Reply], keep: set[int], n: int) -> float:
    """Accepted tokens per draft over the kept prompts (the ratio of sums, as the study's figure)."""
    tally = Draws([0] * (n + 1))
    for i in keep:
        tally.add(replies[i])
    return tally.accepted / tally.drafts if tally.drafts else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="the study's run folder")
    parser.add_argument("--trial", type=int, required=True)
    args = parser.parse_args()
    cfg = load_study_config(args.study)
    work = work_dir(cfg, args.trial)
    vanilla_draft = Path(cfg.model.draft)
    runs = {
        "vanilla body": (run_dir_of(cfg) / "fp8-base", vanilla_draft),
        "candidate + vanilla draft": (work / "candidate-fp8", vanilla_draft),
        "candidate + tuned draft": (work / "candidate-fp8", work / "draft"),
    }
    for model, draft in runs.values():
        if not (model / "config.json").is_file() or not (draft / "config.json").is_file():
            sys.exit(f"{model} or {draft} is missing: run `draft-tune {args.study} --trial {args.trial}` first")
    replies = {}
    for label, (model, draft) in runs.items():
        console.print(f"serving the {label}")
        replies[label] = served_replies(cfg, model, draft, work / f"by-prompt-{label.replace(' ', '-')}.log")
    vanilla, candidate = replies["vanilla body"], replies["candidate + vanilla draft"]
    n = cfg.serving.num_speculative_tokens
    table = Table(title=f"trial {args.trial}: mean accepted tokens per draft, prompt groups")
    for column in ("set", "prompts", "how many", *runs, "loss", "recovered"):
        table.add_column(column)
    for name in vanilla:
        every = set(range(len(vanilla[name])))
        same = {i for i in every if vanilla[name][i].text == candidate[name][i].text}
        for group, keep in (("all", every), ("same answer as vanilla", same), ("answer changed", every - same)):
            if not keep:
                continue
            v, c, t = (mean_accepted(replies[label][name], keep, n) for label in runs)
            recovered = f"{(t - c) / (v - c):.0%}" if v != c else "-"
            table.add_row(name, group, str(len(keep)), f"{v:.3f}", f"{c:.3f}", f"{t:.3f}", f"{v - c:.3f}", recovered)
    console.print(table)


if __name__ == "__main__":
    main()
