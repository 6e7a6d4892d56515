"""Export of a study's winner: the checkpoint (re-materialised and verified), a model card, and the upload.

The card carries the numbers measured in the study — refusal rate, KL, per-position acceptance and accepted tokens
per step next to the vanilla model measured in the same harness — and the exact `vllm serve` command with the vanilla
MTP draft. Uploads go through huggingface_hub with the user's token, which is never printed or logged.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import optuna

from mtp_abliterate.objectives.base import ObjectiveSpec
from mtp_abliterate.objectives.registry import BUILT_INS, objective_specs
from mtp_abliterate.search import metrics as names
from mtp_abliterate.search.candidate.checkpoint import locate
from mtp_abliterate.search.candidate.methods import method
from mtp_abliterate.search.config import HF_ID, StudyConfig
from mtp_abliterate.search.errors import UserError
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.records import TrialRecord
from mtp_abliterate.search.study.space import method_of
from mtp_abliterate.search.study.storage import run_dir_of

CARD_HEADER = (
    "| model | refusal rate | KL divergence | acceptance per position | accepted / step | tokens / step "
    "| vLLM's mean accepted (/metrics) |"
)
TAGS = ["abliterated", "uncensored", "mtp", "speculative-decoding", "gemma4", "mtp-abliterate"]


class ExportError(UserError, RuntimeError):
    """An export or upload that cannot go on; the exported folder is left intact."""


def base_license(cfg: StudyConfig) -> str:
    """The config's license tag, else the base model card's (a local README.md front matter), else 'other'."""
    if cfg.export.license:
        return cfg.export.license
    card = locate(cfg.model.target).path / "README.md"
    text = card.read_text() if card.is_file() else ""
    front = text.split("---")[1] if text.startswith("---") and text.count("---") >= 2 else ""
    m = re.search(r"(?m)^license:\s*(\S+)", front)
    return m.group(1) if m else "other"


def serve_command(cfg: StudyConfig, model: str, draft: str | None = None) -> str:
    """`vllm serve` of `model` with `draft` as its MTP drafter (default: the vanilla draft)."""
    draft = draft or (cfg.model.draft if HF_ID.match(cfg.model.draft) else "<path to the vanilla draft>")
    spec = {"method": "mtp", "model": draft, "num_speculative_tokens": cfg.serving.num_speculative_tokens}
    return shlex.join(["vllm", "serve", model, "--speculative-config", json.dumps(spec)])


def default_export_dir(cfg: StudyConfig, trial: int, precision: str, draft: str = "vanilla") -> Path:
    suffix = "-tuned-draft" if draft == "tuned" else ""
    return run_dir_of(cfg) / "exports" / f"trial-{trial:04d}-{precision}{suffix}"


def _row(label: str, m: dict[str, float], n: int, extra: list[ObjectiveSpec]) -> str:
    acc = " / ".join(f"{a:.3f}" for a in names.per_position(m, n))
    mean, raw = m[names.ACCEPTED_PER_STEP], m.get(names.VLLM_MEAN_ACCEPTED, float("nan"))
    head = f"| {label} | {m[names.REFUSAL_RATE]:.3f} | {m[names.KLD]:.4f} | {acc}"
    extras = "".join(f" {m[o.name]:{o.fmt}} |" if o.name in m else " - |" for o in extra)
    return f"{head} | {mean:.3f} | {1 + mean:.2f} | {raw:.3f} |{extras}"


def _measured_table(cfg: StudyConfig, vanilla: dict[str, float], m: dict[str, float]) -> str:
    """The card's main table: vanilla and this model, the built-in columns then one per extra objective."""
    n, extra = cfg.serving.num_speculative_tokens, objective_specs(cfg)[BUILT_INS:]
    header = CARD_HEADER + "".join(f" {o.label} |" for o in extra)
    rule = "|---" * (header.count("|") - 1) + "|"
    return "\n".join([header, rule, _row("vanilla", vanilla, n, extra), _row("this model", m, n, extra)])


def _set_rows(cfg: StudyConfig, m: dict[str, float]) -> str:
    """Per acceptance set: per-position rates, accepted per step with its 95 % CI, drafts."""
    n = cfg.serving.num_speculative_tokens

    def row(name: str) -> str:
        mean, ci = m[names.set_metric(name, names.ACCEPTED_PER_STEP)], m[names.set_metric(name, names.CI95)]
        rates = " / ".join(f"{a:.3f}" for a in names.per_position(m, n, name))
        return f"| {name} | {rates} | {mean:.3f} ± {ci:.3f} | {int(m[names.set_metric(name, names.NUM_DRAFTS)])} |"

    return "\n".join(row(s.name) for s in cfg.acceptance.sets)


def _param_rows(t: TrialRecord) -> str:
    return "\n".join(
        f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in t.params.items()
    )


def _front_matter(cfg: StudyConfig, base: str, precision: str) -> str:
    tags = [*TAGS, "fp8" if precision == "fp8" else "bf16"]
    lines = ["---", f"base_model: {base}", f"license: {base_license(cfg)}", "tags:", *[f"- {x}" for x in tags], "---"]
    return "\n".join(lines)


def _method(params: dict) -> str:
    return method(method_of(params)).label


def _tuned_section(cfg: StudyConfig, tune: dict[str, Any], repo: str | None) -> str:
    """The tuned draft (in `draft/`): both drafts' acceptance on this model, how it was tuned, how to serve it."""
    local = repo.split("/")[-1] if repo else "<this folder>"
    download = f"hf download {repo} --local-dir {local}\n" if repo else ""
    rows = []
    for name, s in tune["sets"].items():
        for key, label in (("vanilla_draft", "vanilla draft"), ("tuned_draft", "tuned draft (`draft/`)")):
            f = s[key]
            acc = " / ".join(f"{a:.3f}" for a in f["per_position"])
            rows.append(
                f"| {name} | {label} | {acc} | {f['accepted_per_step']:.3f} ± {f['ci95']:.3f} | {f['num_drafts']} |"
            )
    tr = tune["training"]
    table = "\n".join(rows)
    return f"""
## Its own MTP draft (`draft/`)

The vanilla draft was trained on the vanilla body. `draft/` is that draft re-aligned to this model by
`mtp-abliterate draft-tune`: {tr["steps"]} steps of self-distillation on this model's own greedy answers to
{tune["examples"]} training prompts (harmful and harmless, none of the measured ones) and to the tokens it writes past
each answer's stop (vLLM scores proposals there too), fed this model's hidden states and KV as vLLM's MTP path feeds
them. Same format, config and tokenizer as the vanilla draft. Measured on this
model in one vLLM harness (every prompt of each set; greedy answers identical with either draft):

| set | draft | acceptance per position | accepted / step ± 95 % CI | verify steps |
|---|---|---|---|---|
{table}

```bash
{download}{serve_command(cfg, local, f"{local}/draft")}
```
"""


def model_card(
    cfg: StudyConfig,
    t: TrialRecord,
    vanilla: dict[str, float],
    repo: str | None,
    precision: str,
    tune: dict[str, Any] | None = None,
) -> str:
    """The card of trial `t`: its numbers beside vanilla's, how they were measured, the serve command, parameters."""
    m, n = t.metrics, cfg.serving.num_speculative_tokens
    written = StudyConfig.model_validate(cfg.as_written())  # paths as the TOML wrote them: a card names no home folder
    base = cfg.model.target if HF_ID.match(cfg.model.target) else Path(cfg.model.target).name
    quantized = "llm-compressor FP8_DYNAMIC, BF16: " + ", ".join(cfg.quantization.ignore)
    software = ", ".join(f"{k} {v}" for k, v in t.versions.items())
    model = repo or "<this folder>"
    return f"""{_front_matter(cfg, base, precision)}

# {repo or base + "-mtp-abliterated"}

An abliteration of `{base}` chosen for keeping its MTP draft's speed-up: {_method(t.params)} on
`attn.o_proj` and `mlp.down_proj`, picked from an Optuna study (trial {t.number} of study `{cfg.name}`)
that scored every candidate, served in vLLM beside the **vanilla** MTP draft `{written.model.draft}` at
n = {n}, on refusal rate, KL divergence and per-position draft acceptance. Weights: {precision.upper()}
({quantized if precision == "fp8" else "BF16"}).

## Measured (same harness, same prompts, same study)

{_measured_table(cfg, vanilla, m)}

{_how_measured(written)}
Per set, with a 95 % interval on the mean:

| set | acceptance per position | accepted / step ± 95 % CI | verify steps |
|---|---|---|---|
{_set_rows(cfg, m)}

## Serve it with the vanilla MTP draft

```bash
{serve_command(cfg, model)}
```

{_tuned_section(cfg, tune, repo) if tune else ""}
## Method and parameters

| parameter | value |
|---|---|
{_param_rows(t)}

Adapter rank {cfg.abliteration.rank}, row normalisation `{cfg.abliteration.row_normalization}`, seed {cfg.search.seed}.

## Reproduce

With the study's config and its cached module I/O, `mtp-abliterate materialize <study> --trial {t.number} --out DIR`
rebuilds these weights and checks them against the sha256 of the edited tensors recorded at trial time
(`{t.merged_digest}`). Software: {software}.
"""


def _how_measured(cfg: StudyConfig) -> str:
    """The card's paragraph on how each figure was measured."""
    sets = ", ".join(f"{s.name} ({s.prompts.source}, weight {s.weight})" for s in cfg.acceptance.sets)
    return f"""Refusal rate: heretic's refusal markers over `{cfg.prompts.harmful_eval.source}` (greedy, at most
{cfg.abliteration.max_response_length} tokens, chat template). KL divergence: heretic 1.4.0's first-token
KL(vanilla ‖ this) over `{cfg.prompts.harmless_eval.source}`. Acceptance: each answer's verify steps over
/v1/chat/completions, counted as the client receives them (a step's accepted draft tokens capped at the answer's
stop), a_i = share of verify steps whose first i+1 draft tokens were accepted and emitted, mixed over {sets}.
Accepted / step = emitted tokens per verify step - 1; tokens / step = 1 + that: the speed-up over no speculation a
memory-bound GPU approaches. vLLM's mean accepted (its /metrics figure) also counts proposals accepted past an
answer's stop, which are never emitted, so it reads higher.
No tok/s is quoted here: the study measured throughput with {cfg.acceptance.concurrency} requests in flight, not the
single-stream figure public numbers quote; `mtp-abliterate baseline` prints both on your hardware."""


def export_trial(
    cfg: StudyConfig,
    study: optuna.Study,
    t: TrialRecord,
    out: Path,
    repo: str | None,
    precision: str,
    draft: str = "vanilla",
) -> None:
    """The trial's checkpoint (an earlier export of it is reused, not rebuilt) and its model card, in `out`; with
    `draft` "tuned", the trial's `draft-tune` draft in `out/draft`. Raises MaterializeError, ExportError."""
    from mtp_abliterate.search.release.materialize import MaterializeError, materialize

    if t.not_measured:
        raise MaterializeError(
            f"trial {t.number} was not measured in full ({t.not_measured}); its card would have no figures for "
            "what was skipped: export a trial of the Pareto front"
        )
    tune = None
    if draft == "tuned":
        tune = records.draft_tune(study, t.number)
        if tune is None or not (Path(tune["draft"]) / "config.json").is_file():
            raise ExportError(
                f"trial {t.number} has no tuned draft; run "
                f"`mtp-abliterate draft-tune {run_dir_of(cfg)} --trial {t.number}`"
            )
        if not tune["identical"]:
            raise ExportError(f"trial {t.number}'s tuned draft changed the model's greedy answers; it is not exported")
    if not (out / "config.json").is_file():
        materialize(cfg, t, out, precision, fuse_experts=True)  # loads in transformers too
    if tune:
        shutil.rmtree(out / "draft", ignore_errors=True)
        shutil.copytree(tune["draft"], out / "draft")
    (out / "README.md").write_text(model_card(cfg, t, records.vanilla(study) or {}, repo, precision, tune))


def files_to_upload(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def push(folder: Path, repo: str, private: bool) -> str:
    """Upload `folder` to `repo`; returns the repo URL. The token comes from huggingface_hub (HF_TOKEN or login)."""
    from huggingface_hub import HfApi, get_token

    if not HF_ID.match(repo):
        raise ExportError(f"--push {repo!r} is not a repo id; write user/name")
    token = get_token()
    if not token:
        raise ExportError(
            f"no Hugging Face token (set HF_TOKEN or run `hf auth login`); the export in {folder} is intact, "
            "push it later with the same command"
        )
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder), repo_id=repo, repo_type="model", commit_message="mtp-abliterate export"
        )
    except Exception as e:  # network, auth, quota: the message must not carry the token
        reason = str(e).replace(token, "***").splitlines()[0][:300]
        raise ExportError(
            f"upload to {repo} failed ({type(e).__name__}: {reason}); the export in {folder} is intact"
        ) from None
    return str(url)
