"""The draft-tune stage: the vanilla MTP draft re-aligned to one candidate body, measured before and after.

1. The candidate (FP8, as deployed) is served with the vanilla draft: it answers the training prompt mix (greedy,
   token ids kept, and the n-1 tokens it writes past each answer's stop: vLLM scores proposals there too) and its
   acceptance is measured on the acceptance sets, every prompt.
2. The draft is self-distilled on those answers, fed the candidate's own hidden states and KV (BF16 candidate in
   transformers, vLLM's MTP wiring), within the budget.
3. The tuned draft is saved in the vanilla draft's format and the candidate is served again with it: same sets, same
   prompts. Greedy answers must be identical text for text (speculation never changes what the body writes).

Knows nothing of Optuna or MLflow: inputs are checkpoints and settings, output a `Tuned` record.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from heretic.utils import Prompt
from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

from mtp_abliterate.objectives.acceptance import AcceptanceSets
from mtp_abliterate.objectives.served import Reply, chat
from mtp_abliterate.search.candidate.checkpoint import locate, read_config, tensor_layout
from mtp_abliterate.search.config import Serving, StudyConfig
from mtp_abliterate.search.draft.distill import Budget, Distilled, Progress, distil
from mtp_abliterate.search.draft.wiring import Example, text_body
from mtp_abliterate.search.errors import UserError
from mtp_abliterate.search.prompts import load_prompt_set
from mtp_abliterate.search.serving.server import VllmServer

WEIGHTS = (".safetensors", ".safetensors.index.json")
NO_TOKEN_IDS = "the vLLM server returned no token ids (`return_token_ids`); use vLLM >= 0.11"


class DraftTuneError(UserError, RuntimeError):
    """draft-tune cannot go on; the one-line message names the fix."""


@dataclass
class Served:
    """One server's acceptance over the sets (AcceptanceSets details) and every answer (text, token ids, spec-decode
    histogram), per set."""

    details: dict[str, Any]
    replies: dict[str, list[Reply]]


@dataclass
class Tuned:
    vanilla: Served  # the candidate with the vanilla draft
    tuned: Served  # the candidate with the tuned draft
    training: Distilled
    examples: int  # training answers (prompt mix)
    draft_dir: Path
    differing: dict[str, int] = field(default_factory=dict)  # set -> answers that differ between the two drafts


def server_for(serving: Serving, model: Path, draft: str, log: Path, label: str) -> VllmServer:
    """`model` served with `draft` as the study `label` serves its candidates."""
    return VllmServer(serving, str(model), draft, log, label=label)


def measure(cfg: StudyConfig, server: VllmServer, sets: Sequence[tuple[str, list[Prompt], float]]) -> Served:
    """Every prompt of every set (the fixed budget), the answers kept for the identity check."""
    a = cfg.acceptance
    names = [name for name, _, _ in sets]
    acceptance = AcceptanceSets(
        server.base_url,
        server.served_name,
        sets,
        cfg.serving.num_speculative_tokens,
        a.max_tokens,
        a.temperature,
        a.seeds,
        a.concurrency,
        keep_replies=names,
        timeout=cfg.serving.request_timeout_s,
    )
    details = acceptance.compute().details
    return Served(details, acceptance.replies)


def continuation(client: httpx.Client, server: VllmServer, ids: list[int], tokens: int) -> tuple[int, ...]:
    """The served body's next `tokens` greedy tokens after `ids`, stop tokens ignored (`Example.tail`)."""
    payload = {
        "model": server.served_name,
        "prompt": ids,
        "max_tokens": tokens,
        "temperature": 0.0,
        "ignore_eos": True,  # vLLM extensions: go on past the stop token, and say which tokens came
        "return_token_ids": True,
    }
    reply = client.post(f"{server.base_url}/v1/completions", json=payload)
    reply.raise_for_status()
    token_ids = reply.json()["choices"][0].get("token_ids")
    if token_ids is None:
        raise DraftTuneError(NO_TOKEN_IDS)
    return tuple(token_ids)


def answers(cfg: StudyConfig, server: VllmServer, prompts: Sequence[Prompt]) -> list[Example]:
    """The served candidate's greedy answers to `prompts` as training examples: chat tokens as the server scored
    them + answer tokens + the n-1 tokens the body writes after the answer's last one (the last round's proposals
    past the stop are scored against those). Empty answers teach nothing and are left out."""
    tail = cfg.serving.num_speculative_tokens - 1

    def ask(client: httpx.Client, prompt: Prompt) -> Example | None:
        r = chat(client, server.base_url, server.served_name, prompt, cfg.acceptance.max_tokens, token_ids=True)
        if r.token_ids is None or r.prompt_token_ids is None:
            raise DraftTuneError(NO_TOKEN_IDS)
        if not r.token_ids:
            return None
        ids = r.prompt_token_ids + r.token_ids
        return Example(ids, len(r.prompt_token_ids), continuation(client, server, ids, tail) if tail else ())

    with (
        httpx.Client(timeout=cfg.serving.request_timeout_s) as client,
        ThreadPoolExecutor(cfg.acceptance.concurrency) as pool,
    ):
        return [e for e in pool.map(lambda p: ask(client, p), prompts) if e is not None]


def load_body(path: Path, device: torch.device, dtype: torch.dtype | None = None) -> Gemma4ForCausalLM:
    """The candidate's text model (a release checkpoint's language model, or the text checkpoint): in `dtype` if
    given, else in its own dtype on a GPU and in float32 on a CPU, where BF16 matmuls without AMX run 4-15x slower
    (measured on the organism)."""
    cls = Gemma4ForConditionalGeneration if "text_config" in read_config(path) else Gemma4ForCausalLM
    dtype = dtype or ("auto" if device.type == "cuda" else torch.float32)
    return text_body(cls.from_pretrained(path, dtype=dtype).eval()).to(device)


def save_draft(draft: Gemma4AssistantForCausalLM, vanilla: Path, dtype: torch.dtype, out: Path) -> Path:
    """`draft` in the vanilla draft's format: in `dtype` (the vanilla's), the same tensor names and shapes, the config,
    tokenizer and template files copied unchanged. Raises DraftTuneError when the tensors would not load where the
    vanilla draft does."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        saved = Path(tmp) / "draft"
        draft.to(dtype).save_pretrained(saved)
        for f in vanilla.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHTS):
                shutil.copy2(f, saved / f.name)
        want, got = tensor_layout(vanilla), tensor_layout(saved)
        if want != got:
            diff = sorted(set(want.items()) ^ set(got.items()))[:3]
            raise DraftTuneError(f"the tuned draft's tensors differ from the vanilla draft's ({diff}); report it")
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(saved), out)
    return out


def tune_draft(
    cfg: StudyConfig,
    fp8: Path,
    bf16: Path,
    train_prompts: Sequence[Prompt],
    budget: Budget,
    work: Path,
    progress: Progress,
    say: Callable[[str], None],
) -> Tuned:
    """Steps 1-3 of the module doc for the candidate `fp8` (served) / `bf16` (taught from); writes under `work`."""
    vanilla_draft = locate(cfg.model.draft).path
    sets = [(s.name, load_prompt_set(cfg.model, s.prompts), s.weight) for s in cfg.acceptance.sets]
    work.mkdir(parents=True, exist_ok=True)
    say("serving the candidate with the vanilla draft: training answers and acceptance")
    with server_for(cfg.serving, fp8, str(vanilla_draft), work / "server-vanilla-draft.log", cfg.name) as server:
        examples = answers(cfg, server, train_prompts)
        before = measure(cfg, server, sets)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    say(f"distilling the draft on {len(examples)} answers ({device})")
    body = load_body(bf16, device)
    draft = Gemma4AssistantForCausalLM.from_pretrained(vanilla_draft, dtype="auto")
    dtype = draft.dtype
    draft = draft.float().to(device)  # learns in float32, saved in its own dtype
    pad_id = body.config.pad_token_id if body.config.pad_token_id is not None else 0
    chain_steps = cfg.serving.num_speculative_tokens
    trained = distil(draft, body, examples, budget, chain_steps, pad_id, cfg.search.seed, progress)
    del body
    draft_dir = save_draft(draft.cpu(), vanilla_draft, dtype, work / "draft")
    say("serving the candidate with the tuned draft")
    with server_for(cfg.serving, fp8, str(draft_dir), work / "server-tuned-draft.log", cfg.name) as server:
        after = measure(cfg, server, sets)
    differing = {
        name: sum(a.text != b.text for a, b in zip(before.replies[name], after.replies[name], strict=True))
        for name, _, _ in sets
    }
    return Tuned(before, after, trained, len(examples), draft_dir, differing)
