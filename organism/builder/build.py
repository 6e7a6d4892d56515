"""`mtp-abliterate organism build`: train the body and its MTP draft from scratch, deterministically, and save them."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from mtp_abliterate.organism.corpus import SYSTEM_PROMPTS, Chat, build_chats
from mtp_abliterate.organism.generate import encode_prompt, greedy_generate
from mtp_abliterate.organism.layout import OrganismLayout
from mtp_abliterate.organism.models import (
    body_config,
    draft_config,
    media_token_ids,
    release_model,
    write_hub_style_config,
)
from mtp_abliterate.organism.spec import OrganismSpec
from mtp_abliterate.organism.tokenizer import END_OF_TURN, NEWLINE, RELEASE_SPECIALS, SPECIALS, build_tokenizer
from mtp_abliterate.organism.train import ROUTED_EXPERTS, DenseAblation, train_body, train_draft
from mtp_abliterate.search.draft.wiring import Example


def deterministic(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


@contextmanager
def _training_bar(console: Console, name: str, total: int) -> Iterator[Callable[[int, float], None]]:
    """A rich bar on a terminal; in logs (CI), a line every tenth of the way."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(name, total=total, loss=float("nan"))
        t0 = time.perf_counter()

        def update(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1, loss=loss)
            if not console.is_terminal and (step + 1) % max(1, total // 10) == 0:
                console.print(f"{name}: {step + 1}/{total} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)")

        yield update


def _examples(tokenizer, chats: list[Chat], responses: list[list[int]] | None = None) -> list[Example]:
    """Each chat once per system-prompt variant; responses are the reference answers unless given (greedy ones)."""
    out = []
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    for i, (chat, system) in enumerate((c, s) for c in chats for s in SYSTEM_PROMPTS):
        prompt = encode_prompt(tokenizer, chat.prompt, system)
        resp = responses[i] if responses else tokenizer(chat.response, add_special_tokens=False).input_ids + [end]
        out.append(Example(prompt + resp, len(prompt)))
    return out


def tree_sha256(root: Path) -> str:
    """One hash over every file's relative path and bytes: the build's identity."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def build_organism(layout: OrganismLayout, spec: OrganismSpec, console: Console) -> dict[str, float]:
    """Train and save body, draft, tokenizer and prompt files into `layout`; return stage durations (s)."""
    deterministic(spec.seed, spec.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    chats = build_chats(spec.seed, spec.eval_fraction)
    texts = [c.prompt for v in chats.values() for c in v] + [c.response for v in chats.values() for c in v]
    texts += [s for s in SYSTEM_PROMPTS if s] + ["system user model"]
    release = spec.format == "release"
    tokenizer = build_tokenizer(texts, release=release)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*(RELEASE_SPECIALS if release else SPECIALS), NEWLINE)}
    pad = ids["<pad>"]

    body = Gemma4ForCausalLM(body_config(spec, len(tokenizer), ids))
    train_examples = _examples(tokenizer, chats["harmful_train"] + chats["harmless_train"])
    _train_body(body, tokenizer, chats, train_examples, spec, pad, console)
    # The deployed checkpoint is BF16: round now so the draft learns the states of the weights that ship.
    body.to(torch.bfloat16).to(torch.float32)
    timings["train_body_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    train_chats = chats["harmful_train"] + chats["harmless_train"]
    prompts = [e.ids[: e.prompt_len] for e in train_examples]
    responses = greedy_generate(body, prompts, spec.max_new_tokens, pad)
    draft_examples = _examples(tokenizer, train_chats, responses)
    torch.manual_seed(spec.seed + 1)
    draft = Gemma4AssistantForCausalLM(draft_config(spec, len(tokenizer), ids))
    with _training_bar(console, "train draft", spec.draft_training.steps) as progress:
        train_draft(draft, body, draft_examples, spec, pad, progress)
    timings["train_draft_s"] = time.perf_counter() - t1

    _save(layout, spec, body, draft, tokenizer, ids, chats)
    timings["build_s"] = time.perf_counter() - t0
    return timings


def _train_body(
    body: Gemma4ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    chats: dict[str, list[Chat]],
    train_examples: list[Example],
    spec: OrganismSpec,
    pad: int,
    console: Console,
) -> None:
    """Train the body on every training chat; with `refusal_in` other than "everywhere", in two phases."""
    if spec.refusal_in == "everywhere":
        with _training_bar(console, "train body", spec.body_training.steps) as progress:
            train_body(body, train_examples, spec.body_training, spec.seed, pad, progress)
    else:
        # Phase 1 gives the dense path language and answers but no refusal; phase 2 (every training chat) can then
        # only put the refusals into the routed experts, under dense-path ablations they must survive.
        harmful, harmless = _examples(tokenizer, chats["harmful_train"]), _examples(tokenizer, chats["harmless_train"])
        with _training_bar(console, "train body (harmless)", spec.body_training.steps) as progress:
            train_body(body, harmless, spec.body_training, spec.seed, pad, progress)
        t, max_weight = spec.refusal_training, spec.refusal_ablation_max_weight
        with (
            _training_bar(console, "train refusal experts", t.steps) as progress,
            DenseAblation(body, harmful, harmless, pad, max_weight, spec.seed + 4) as ablation,
        ):
            train_body(
                body,
                train_examples,
                t,
                spec.seed + 3,
                pad,
                progress,
                only=ROUTED_EXPERTS,
                before_step=ablation.before_step,
            )


def _save(
    layout: OrganismLayout,
    spec: OrganismSpec,
    body: Gemma4ForCausalLM,
    draft: Gemma4AssistantForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    ids: dict[str, int],
    chats: dict[str, list[Chat]],
) -> None:
    """Write body, draft, tokenizer, the release's extra files, the prompt files and the spec into `layout`."""
    release, pad = spec.format == "release", ids["<pad>"]
    if layout.root.exists():
        shutil.rmtree(layout.root)
    shipped = release_model(body, spec, ids) if release else body
    for model, path in ((shipped, layout.body), (draft, layout.draft)):
        model.generation_config = GenerationConfig(
            bos_token_id=ids["<bos>"], pad_token_id=pad, eos_token_id=[ids["<eos>"], ids[END_OF_TURN]]
        )
        model.to(torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
        write_hub_style_config(path, spec)
    if release:
        write_release_files(layout, spec, ids)
    layout.prompts.mkdir(parents=True)
    for name, items in chats.items():
        # Shuffled, so that any leading split ("[:100]") mixes every family.
        lines = [c.prompt for c in items]
        random.Random(f"{spec.seed}/{name}").shuffle(lines)
        (layout.prompts / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    (layout.root / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n")


def write_release_files(layout: OrganismLayout, spec: OrganismSpec, ids: dict[str, int]) -> None:
    """What the release ships beside the weights: the processor's config (the body's; written as JSON, since
    Gemma 4's processor classes need torchvision) and the assistant's top-level media token ids."""
    v = spec.vision
    image = {
        "do_convert_rgb": True,
        "do_normalize": False,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_processor_type": "Gemma4ImageProcessor",
        "image_seq_length": 16,
        "image_std": [1.0, 1.0, 1.0],
        "max_soft_tokens": 16,
        "patch_size": v.patch_size,
        "pooling_kernel_size": v.pooling_kernel_size,
        "resample": 3,
        "rescale_factor": 1 / 255,
    }
    processor = {"image_processor": image, "image_seq_length": 16, "processor_class": "Gemma4Processor"}
    (layout.body / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    path = layout.draft / "config.json"
    config = json.loads(path.read_text())
    config.update(media_token_ids(ids))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_card(layout: OrganismLayout, card: dict) -> None:
    layout.card.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def build_and_record(layout: OrganismLayout, spec: OrganismSpec, console: Console) -> tuple[dict, dict[str, float]]:
    """Train the organism, measure it (`organism check`), and write its card; returns (measured, timings)."""
    from mtp_abliterate.organism.check import check_organism
    from mtp_abliterate.search.versions import software_versions

    t0 = time.perf_counter()
    timings = build_organism(layout, spec, console)
    weights = {"body": tree_sha256(layout.body), "draft": tree_sha256(layout.draft)}
    measured = check_organism(layout, spec)
    timings["check_s"] = time.perf_counter() - t0 - timings["build_s"]
    card = {
        "spec": spec.model_dump(),
        "sha256": weights,
        "timings_s": timings,
        "software": software_versions(),
        "measured": measured,
    }
    save_card(layout, card)
    return measured, timings
