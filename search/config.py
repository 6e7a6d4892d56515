"""Typed study settings, read from a TOML file and validated before anything heavy happens.

Every field is documented here and mirrored, commented, in `configs/*.toml`. A file may `extends` another
(`config_merge.py`). Relative paths are relative to the folder of the TOML file that writes them, and made absolute
when the config loads (`LocalPath`): stages take a section or a value, never the config to resolve one. Errors name
the file, the field and the fix (`ConfigError`). Later stages add sections by adding a model class and one field on
`StudyConfig`; unknown keys are rejected so typos never pass silently.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mtp_abliterate.objectives.registry import lookup
from mtp_abliterate.search.candidate.methods import DEFAULT as DEFAULT_METHOD
from mtp_abliterate.search.candidate.methods import NAMES as METHOD_NAMES
from mtp_abliterate.search.candidate.methods import MethodName
from mtp_abliterate.search.config_merge import HF_ID, PATH_FIELDS, Merged, MergeError, exists, load_merged, resolve_path
from mtp_abliterate.search.errors import UserError

FIX_HINTS = {
    "python": " or run `make vllm-env` to create the vLLM environment",
    "source": " (a dataset id also needs `column` and `split`)",
}


class ConfigError(UserError):
    """A study file that cannot be used; the message is one line per problem, each naming the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _from_config_folder(value: str, info: ValidationInfo) -> str:
    """A path relative to the TOML made absolute when `load_config` validates (its context names the TOML's folder),
    so no stage needs the config to read a path; HF ids and absolute paths unchanged."""
    base_dir = (info.context or {}).get("base_dir")
    return resolve_path(base_dir, value) if base_dir is not None else value


# A field that names a local path (or an HF id); config_merge.PATH_FIELDS lists them for a base's rebasing.
LocalPath = Annotated[str, AfterValidator(_from_config_folder)]


class ModelSource(Section):
    """Target body and MTP draft: local folders (relative to the TOML) or Hugging Face ids."""

    target: LocalPath = Field(description="vanilla BF16 body to abliterate: a folder or an HF id")
    draft: LocalPath = Field(
        description="the vanilla MTP assistant served beside every candidate: a folder or an HF id"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the body is loaded in for abliteration and KL ('auto' = the checkpoint's)"
    )
    system_prompt: str = Field(
        "You are a helpful assistant.", description="system turn of every chat (heretic's default)"
    )


class PromptSet(Section):
    """Prompts in heretic's conventions: a text file with one prompt per line, or a dataset id + split + column."""

    source: LocalPath = Field(description="text file (relative to the TOML) or HF dataset id")
    split: str | None = Field(None, description="e.g. 'train[:400]' for datasets, '[:100]' for text files")
    column: str | None = Field(None, description="dataset column holding the prompt; required for dataset ids")


class Prompts(Section):
    """harmful/harmless x train/eval. Train sets shape the abliteration; eval sets score it (held out)."""

    harmful_train: PromptSet
    harmless_train: PromptSet
    harmful_eval: PromptSet
    harmless_eval: PromptSet


class Range(Section):
    """Override of one search parameter: a fixed value, or a narrower [low, high]."""

    low: float | None = None
    high: float | None = None
    value: float | None = Field(None, description="fix the parameter to this value")

    @model_validator(mode="after")
    def _one_form(self) -> Range:
        if (self.value is None) == (self.low is None or self.high is None):
            raise ValueError("give either value = X, or both low and high")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        return self


class Constraints(Section):
    max_refusal_rate: float | None = Field(None, ge=0, le=1, description="trials above it are infeasible")
    max_kl: float | None = Field(None, gt=0, description="trials above this KL divergence are infeasible")


class Search(Section):
    """The Optuna study."""

    n_trials: int = Field(100, ge=1, description="trials to run (a resumed study counts finished ones)")
    seed: int = Field(0, description="sampler seed; also seeds ARA's optimiser")
    sampler: Literal["tpe", "gp", "random"] = Field(
        "tpe", description="multivariate TPE, Optuna's Gaussian-process sampler, or random search"
    )
    n_startup_trials: int = Field(10, ge=0, description="random trials before TPE models the front")
    space: dict[str, Range] = Field(default_factory=dict, description="per-parameter overrides of the ARA space")
    constraints: Constraints = Constraints()
    methods: list[MethodName] = Field(
        ["ara", "directional"],
        min_length=1,
        description="abliteration methods searched: ARA, heretic's directional ablation, or both (the method is then "
        "a search dimension)",
    )
    # a method's categorical values (the directional method's scopes) are listed beside the method names
    enqueue: list[dict[str, float | Literal[(*METHOD_NAMES, "global", "per layer")]]] = Field(
        default_factory=list,
        description="informed first trials: parameter sets run before the sampler's own (`method` = directional for "
        "heretic's parametrisation; ARA's otherwise)",
    )
    acceptance_objective: Annotated[str, Field(pattern=r"^(accepted_per_step|acc_pos_[0-9]+)$")] = Field(
        "accepted_per_step",
        description="acceptance scalar maximised, over the acceptance sets' mix: accepted draft tokens per verify "
        "step as the client receives them (emitted tokens per step - 1; what speculative decoding buys), or one "
        "position's speed-true rate (acc_pos_0 .. acc_pos_{n-1})",
    )
    extra_objectives: list[str] = Field(
        default_factory=list,
        description="objectives optimised after the three built-ins (refusal rate, KL, the acceptance objective): "
        "`module:name` of a module that registers one when imported (objectives/registry.py); each adds an Optuna "
        "direction, a column in the tables and the model card, and an MLflow metric",
    )
    max_consecutive_failures: int = Field(
        5,
        ge=1,
        description="stop the study after this many failed trials in a row (a broken setup; a bad candidate is a "
        "complete, infeasible trial and never counts)",
    )

    @property
    def acceptance_position(self) -> int | None:
        """The draft position the acceptance objective is, or None for accepted tokens per step."""
        scalar = self.acceptance_objective
        return int(scalar.removeprefix("acc_pos_")) if scalar.startswith("acc_pos_") else None

    @field_validator("extra_objectives")
    @classmethod
    def _objectives_known(cls, entries: list[str]) -> list[str]:
        names = [lookup(entry).name for entry in entries]
        if len(set(names)) < len(names):
            raise ValueError(f"extra_objectives names an objective twice ({', '.join(entries)}); remove the repeat")
        return entries

    @model_validator(mode="after")
    def _methods_fit(self) -> Search:
        # Optuna's GP models a fixed set of parameters; each method's are conditional on the method
        if self.sampler == "gp" and len(set(self.methods)) > 1:
            raise ValueError(
                f"sampler 'gp' models one method's parameters, but methods = {self.methods}; "
                "use sampler = 'tpe' or keep one method"
            )
        for i, trial in enumerate(self.enqueue):
            if (method := trial.get("method", DEFAULT_METHOD)) not in self.methods:
                raise ValueError(
                    f"enqueue[{i}] is a {method} trial but methods = {self.methods}; remove it or add {method!r}"
                )
        return self


class Abliteration(Section):
    """How candidates are made from the resident BF16 model."""

    method: MethodName = Field(DEFAULT_METHOD, description="ARA, or heretic 1.4.0's directional ablation")
    rank: int = Field(8, ge=1, description="adapter rank (ARA); heretic's full_normalization_lora_rank (directional)")
    row_normalization: Literal["full", "none"] = Field(
        "full", description="'full': edited rows keep their vanilla norms (ARA: DoRA with frozen magnitudes)"
    )
    batch_size: int = Field(32, ge=1, description="prompts per forward pass for capture, KL and HF refusals")
    max_response_length: int = Field(100, ge=1, description="greedy tokens judged for refusals (heretic: 100)")
    workers: int = Field(
        4, ge=1, le=16, description="ARA modules optimised at once on a GPU (host-bound L-BFGS; CPU runs one)"
    )
    experts: bool = Field(
        False,
        description="ARA also edits routed experts' down projections: the study searches `experts_per_layer` "
        "(0 to the experts per layer; those the harmful prompts are routed to most), in the same layer range",
    )


class Quantization(Section):
    """How each candidate is deployed."""

    scheme: Literal["FP8_DYNAMIC", "none"] = Field("FP8_DYNAMIC", description="llm-compressor scheme, data-free")
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="modules kept in BF16 (llm-compressor names, 're:' regexes)"
    )
    incremental: bool = Field(
        True,
        description="FP8: quantize the vanilla model once per study and re-quantize only each trial's edited "
        "matrices (byte-identical to a whole-model llm-compressor run); false = the whole model every trial",
    )


class Serving(Section):
    """How vLLM is started. It never shares the main environment: it pins its own torch and transformers."""

    launcher: Literal["python", "docker"] = Field("python", description="a virtualenv's python, or a docker command")
    python: LocalPath = Field(
        ".venv-vllm/bin/python",
        validate_default=True,  # the default is relative to the TOML too
        description="python of the vLLM environment (launcher = python)",
    )
    docker_template: str = Field(
        "docker run --rm --gpus all --ipc host -p 127.0.0.1:{port}:{port} {image} --host 0.0.0.0 --port {port}",
        description="launcher = docker: command before the model args; {port} and {image} are filled in. The tool "
        "adds --name/--label (the container is removed on stop and on the next start after a crash), -e for "
        "serving.env, and -v for every folder the server reads at the same path (local checkpoints, the HF cache "
        "read-only for hub ids, the study folder). Publish on 127.0.0.1 only: the swap server's dev endpoints run "
        "methods on its workers",
    )
    image: str = Field("vllm/vllm-openai:latest", description="launcher = docker: the user's vLLM image")
    vllm_args: list[str] = Field(default_factory=list, description="passed through to vLLM unchanged")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the server (docker: -e)")
    startup_timeout_s: float = Field(600, gt=0, description="give up waiting for /health after this long")
    request_timeout_s: float = Field(
        600,
        gt=0,
        description="give up on one measurement request (a chat completion) after this long without its answer: "
        "vLLM is taken as hung, stopped (SIGKILL) and replaced, and the candidate measured again once; keep it "
        "well above one answer's time at acceptance.concurrency requests in flight",
    )
    num_speculative_tokens: int = Field(4, ge=1, le=8, description="draft tokens per step (the MTP n)")
    resident_gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="--gpu-memory-utilization of the servers a study starts beside its resident BF16 model (None: "
        "vllm_args as given). On unified memory (DGX Spark) vLLM checks at start-up that its share is free",
    )
    multimodal: Literal["auto", "as_is", "text_only"] = Field(
        "auto",
        description="how a multimodal release checkpoint (Gemma4ForConditionalGeneration) is served: as_is; "
        "text_only = a view of the same files as Gemma4ForCausalLM (config rewritten, weights linked); auto = "
        "text_only when the vLLM environment has no torchvision (vLLM's CPU build), which the multimodal "
        "architecture needs, else as_is (docker: as_is)",
    )
    mode: Literal["auto", "swap", "cold"] = Field(
        "auto",
        description="auto: one server per study, each candidate swapped in place, after a self-check on the first "
        "candidate proves swap == cold start (else cold starts); swap: swap without the self-check; cold: a fresh "
        "server per candidate",
    )
    self_check_beside: bool = Field(
        False,
        description="the swap self-check's cold server starts while the study's server stays up, which saves "
        "restarting it afterwards; needs memory for both servers at once (a CPU organism, never a 26B target on "
        "one GPU or a Spark)",
    )

    @field_validator("docker_template")
    @classmethod
    def _loopback_only(cls, template: str) -> str:
        words = shlex.split(template)
        if len(words) < 2 or Path(words[0]).name != "docker" or words[1] != "run":
            raise ValueError("must start with `docker run`")
        for flag, value in zip(words, [*words[1:], ""], strict=True):
            published = value if flag in ("-p", "--publish") else None
            if flag.startswith("--publish="):
                published = flag.split("=", 1)[1]
            if published is not None and not published.startswith("127.0.0.1:"):
                raise ValueError(
                    f"publishes {published} on every network interface; write -p 127.0.0.1:{{port}}:{{port}} (the "
                    "swap server's dev endpoints can run code on its workers)"
                )
        for placeholder in ("{models}", "{hf_home}"):
            if placeholder in template:
                raise ValueError(
                    f"{placeholder} is no longer filled in: the tool mounts the checkpoints and the HF cache itself; "
                    "remove the -v/-e that use it"
                )
        return template

    @field_validator("vllm_args")
    @classmethod
    def _no_owned_flags(cls, args: list[str]) -> list[str]:
        owned = {
            "--speculative-config",
            "--port",
            "--model",
            "--worker-extension-cls",
            "--per-request-spec-decode-metrics",
        }
        clash = sorted(a.split("=")[0] for a in args if a.split("=")[0] in owned)
        if clash:
            raise ValueError(f"{', '.join(clash)} is set by the tool; remove it from vllm_args")
        return args


class AcceptanceSet(Section):
    name: str
    prompts: PromptSet
    weight: float = Field(1.0, ge=0, description="share of this set in the configured mix")


class Acceptance(Section):
    """The draft-acceptance benchmark, run through /v1/chat/completions."""

    sets: list[AcceptanceSet] = Field(min_length=1, description="prompt sets, each reported on its own")
    max_tokens: int = Field(128, ge=8)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="one run per seed")
    concurrency: int = Field(4, ge=1, description="requests in flight at once")
    target_halfwidth: float = Field(
        0.05,
        ge=0,
        description="adaptive measurement: stop serving a candidate once the mix's 95 % half-width (mean accepted "
        "tokens per draft, prompts as the unit) is at most this, or once the rest of the prompts cannot put it on "
        "the Pareto front; 0 = the fixed budget (every prompt of every set, as before)",
    )
    round_size: int = Field(
        16, ge=2, description="adaptive measurement: prompts per set per round (the first round is the least served)"
    )

    @field_validator("sets")
    @classmethod
    def _unique_names(cls, sets: list[AcceptanceSet]) -> list[AcceptanceSet]:
        names = [s.name for s in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"set names must be unique (got {names}); each set is reported under its name")
        return sets


class Retention(Section):
    """Which candidate checkpoints stay on disk: an FP8 candidate of the real target is ~27 GB (< 1 GB incremental)."""

    keep: Literal["pareto", "all", "none"] = Field(
        "pareto", description="'pareto': only the current Pareto front's (removed when they fall off it)"
    )
    keep_last: int = Field(0, ge=0, description="also keep the last k complete trials' checkpoints")
    min_free_gb: float = Field(
        5.0, ge=0, description="stop the study before a trial when less than this is free under runs_dir"
    )


class Export(Section):
    """The study's named winner (`study status`, MLflow, `export --trial best`) and the model card of `export`."""

    max_refusal_rate: float = Field(
        0.05, ge=0, le=1, description="the winner is the trial with the highest acceptance objective within this"
    )
    max_kl: float | None = Field(
        None,
        gt=0,
        description="...and within this KL divergence; default: 2 x the KL of the informed directional trial (the "
        "first `search.enqueue` entry with method = directional: heretic's default), no bound when there is none",
    )

    license: str | None = Field(
        None, description="license tag; default: the base model card's (a local README.md), else 'other'"
    )


class DraftTune(Section):
    """`mtp-abliterate draft-tune`: the vanilla MTP draft self-distilled on one chosen candidate (README
    "Re-aligning the draft"). The budget is whichever of `steps` and `max_minutes` comes first."""

    prompts: list[PromptSet] | None = Field(
        None,
        description="the prompt mix the candidate answers for training (harmful and harmless; never the eval sets); "
        "default (or []: a config that extends one with a mix goes back to the default): prompts.harmful_train and "
        "prompts.harmless_train",
    )
    steps: int = Field(300, ge=1, description="optimiser steps; `draft-tune --steps` overrides")
    max_minutes: float | None = Field(
        None, gt=0, description="stop training after this many minutes; `draft-tune --minutes` overrides"
    )
    batch_size: int = Field(32, ge=1, description="answers per optimiser step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW, linear warm-up, cosine decay)")
    warmup_steps: int = Field(20, ge=1, description="linear warm-up steps")

    @field_validator("prompts")
    @classmethod
    def _empty_is_default(cls, prompts: list[PromptSet] | None) -> list[PromptSet] | None:
        return prompts or None  # TOML has no null: [] is how a config unsets its base's mix


class Tracking(Section):
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI: http://HOST:PORT of an `mlflow server` for several machines (with its "
        "basic-auth app, the credentials come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the "
        "environment, never from here); default: a SQLite store under runs/. `${VAR}` is expanded from the "
        "environment when the config is loaded; a password in the URL is never written or printed (`config check` "
        "warns when one is written here)",
    )


class Storage(Section):
    """Where the study lives. Several machines share one study through a PostgreSQL URL (README "Several machines")."""

    optuna_url: str | None = Field(
        None,
        description="Optuna storage URL, postgresql://USER@HOST[:PORT]/DB for several machines (the psycopg driver: "
        "`pip install 'mtp-abliterate[distributed]'`); default: SQLite under the study's folder. Keep the password "
        "out of the file: `${VAR}` is expanded from the environment when the config is loaded "
        "(postgresql://USER:${PGPASSWORD}@HOST/DB), and psycopg (libpq) reads PGPASSWORD, PGPASSFILE and "
        "~/.pgpass itself for a URL without one. A password in the URL is never written or printed (the study "
        "folder's config.toml, study.json, MLflow and every printed line carry the URL without it) and `config "
        "check` warns that the file holds it",
    )
    heartbeat_s: Annotated[int, Field(ge=1, description="a running trial's heartbeat to the storage, seconds")] = 60
    grace_s: Annotated[
        int,
        Field(
            ge=2,
            description="a trial whose heartbeat stopped this long ago (its host died) is failed and re-queued once "
            "by another process of the study, seconds",
        ),
    ] = 180

    @model_validator(mode="after")
    def _grace_covers_heartbeats(self) -> Storage:
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(
                f"grace_s ({self.grace_s}) must exceed heartbeat_s ({self.heartbeat_s}): a live trial would be failed"
            )
        return self


class StudyConfig(Section):
    extends: str | None = Field(
        None,
        exclude=True,
        description="a study TOML this one is based on, relative to this file: its fields are merged under this "
        "file's own (tables key by key; arrays and values replace), recursively; `config check` shows the result",
    )
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="study name; its folder under runs/")]
    runs_dir: LocalPath = Field("runs", validate_default=True, description="where studies write (relative to the TOML)")
    model: ModelSource
    prompts: Prompts
    search: Search = Search()
    abliteration: Abliteration = Abliteration()
    quantization: Quantization = Quantization()
    serving: Serving = Serving()
    acceptance: Acceptance
    retention: Retention = Retention()
    export: Export = Export()
    draft_tune: DraftTune = DraftTune()
    tracking: Tracking = Tracking()
    storage: Storage = Storage()

    # Filled by load_config: the TOML's folder, against which relative paths resolved (every path field is absolute).
    base_dir: Path = Field(Path("."), exclude=True)
    # Filled by load_config: each path field's value as its file wrote it (key path, list indices as ints).
    written_paths: dict[tuple[str | int, ...], str] = Field(default_factory=dict, exclude=True)
    # Filled by load_config: the URL fields whose TOML value holds a password itself (`config check` warns).
    password_fields: tuple[str, ...] = Field((), exclude=True)
    # Filled by load_config: each value a file set (key path; an array is one value) -> that file (`config check`).
    origins: dict[tuple[str, ...], Path] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="after")
    def _acceptance_position_exists(self) -> StudyConfig:
        scalar = self.search.acceptance_objective
        n = self.serving.num_speculative_tokens
        if scalar.startswith("acc_pos_") and int(scalar.removeprefix("acc_pos_")) >= n:
            raise ValueError(f"search.acceptance_objective {scalar} needs a position below num_speculative_tokens={n}")
        return self

    def as_written(self) -> dict[str, Any]:
        """The config as JSON values with each path as its TOML wrote it: what a study records (`trial_meaning`; the
        same on hosts whose checkouts differ) and what `config check` shows beside the file that set it."""
        dumped = self.model_dump(mode="json")
        for (*parents, leaf), written in self.written_paths.items():
            node = functools.reduce(lambda n, k: n[k], parents, dumped)
            if node[leaf] == resolve_path(self.base_dir, written):  # a value replaced since the load stays resolved
                node[leaf] = written
        return dumped

    def prompt_sets(self) -> dict[str, PromptSet]:
        out = {f"prompts.{k}": getattr(self.prompts, k) for k in Prompts.model_fields}
        out.update({f"acceptance.sets[{i}].prompts": s.prompts for i, s in enumerate(self.acceptance.sets)})
        out.update({f"draft_tune.prompts[{i}]": ps for i, ps in enumerate(self.draft_tune.prompts or [])})
        return out

    def draft_tune_prompts(self) -> list[PromptSet]:
        return self.draft_tune.prompts or [self.prompts.harmful_train, self.prompts.harmless_train]

    def local_inputs(self) -> dict[str, str]:
        """Field -> value of every input that names a local path, for existence checks."""
        # imported here: the launchers import this module (Serving)
        from mtp_abliterate.search.serving.launchers import launcher_for

        out = {"model.target": self.model.target, "model.draft": self.model.draft}
        out.update({f"{k}.source": ps.source for k, ps in self.prompt_sets().items() if ps.column is None})
        out.update(launcher_for(self.serving, self.name).local_inputs())
        return {k: v for k, v in out.items() if not HF_ID.match(v) or k.endswith(".source")}


PATH_NAMES = frozenset(".".join(k for k in keys if k != "*") for keys in PATH_FIELDS)


def _paths_as_written(node: Any, keys: tuple[str | int, ...] = ()) -> dict[tuple[str | int, ...], str]:
    """Each path field's value in the merged TOML (a base's from another folder already absolute), by key path."""
    if isinstance(node, str):
        return {keys: node} if ".".join(k for k in keys if isinstance(k, str)) in PATH_NAMES else {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return {k: v for key, sub in items for k, v in _paths_as_written(sub, (*keys, key)).items()}


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_config(path: str | Path, check_paths: bool = True) -> StudyConfig:
    """Parse and validate a study TOML (merged over the configs it `extends`). Raises ConfigError naming file, field
    and fix."""
    path = Path(path)
    try:
        merged = load_merged(path)
    except MergeError as e:
        raise ConfigError(str(e)) from None
    raw, password_fields = _expand_urls(path, merged.raw)
    if internal := [k for k in INTERNAL if k in raw]:  # filled here, never from the file
        lines = [f"{merged.origin((k,)) or path}: {k}: unknown field; remove it or fix its spelling" for k in internal]
        raise ConfigError("\n".join(lines))
    base_dir = path.resolve().parent
    filled = {
        "base_dir": base_dir,
        "written_paths": _paths_as_written(raw),
        "password_fields": password_fields,
        "origins": merged.origins,
    }
    try:
        cfg = StudyConfig.model_validate({**raw, **filled, "extends": merged.extends}, context={"base_dir": base_dir})
    except ValidationError as e:
        raise ConfigError("\n".join(_problem(path, merged, err) for err in e.errors())) from None
    if check_paths:
        missing = [
            f"{path}: {field}: {value} does not exist; fix the path" + FIX_HINTS.get(field.rsplit(".", 1)[-1], "")
            for field, value in cfg.local_inputs().items()
            if not exists(Path(value))
        ]
        if missing:
            raise ConfigError("\n".join(missing))
        if unusable := _model_problems(path, cfg) + _prompt_file_problems(path, cfg):
            raise ConfigError("\n".join(unusable))
    return cfg


INTERNAL = ("base_dir", "written_paths", "password_fields", "origins")


def _problem(path: Path, merged: Merged, err: Any) -> str:
    """One validation error as a line naming the file that set the field (`path` for a missing one), the field and
    the fix."""
    where, source = _where(err["loc"]), merged.origin(err["loc"]) or path
    if err["type"] == "missing":
        return f"{path}: {where}: required field is missing; add it (see configs/organism.toml)"
    if err["type"] == "extra_forbidden":
        return f"{source}: {where}: unknown field; remove it or fix its spelling"
    return f"{source}: {where}: {err['msg']} (got {err.get('input')!r}); fix the value"


URL_FIELDS = (("storage", "optuna_url"), ("tracking", "mlflow_uri"))


def _expand_urls(path: Path, raw: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """`raw` with `${VAR}` expanded in the store URLs, and the URL fields that hold a literal password."""
    from mtp_abliterate.search import credentials

    lines, literal = [], []
    for section, key in URL_FIELDS:
        table = raw.get(section)
        if not isinstance(table, dict) or not isinstance(value := table.get(key), str):
            continue  # absent, or the wrong type: validation says so
        if credentials.literal_password(value):
            literal.append(f"{section}.{key}")
        try:
            raw = {**raw, section: {**table, key: credentials.expand(value)}}
        except credentials.UnsetVariable as e:
            lines.append(
                f"{path}: {section}.{key}: ${{{e.args[0]}}} is not set in the environment; export {e.args[0]} "
                "before running (or leave the password out of the URL: libpq reads PGPASSWORD and ~/.pgpass)"
            )
    if lines:
        raise ConfigError("\n".join(lines))
    return raw, tuple(literal)


# What the study loads: a Gemma 4 body (text-only or the release layout) and its MTP assistant.
ARCHITECTURES = {
    "model.target": ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"),
    "model.draft": ("Gemma4AssistantForCausalLM",),
}


def _model_problems(path: Path, cfg: StudyConfig) -> list[str]:
    """Local model folders that are not the Gemma 4 body / MTP draft the study needs (hub ids are checked when the
    study reads them from the HF cache)."""
    lines = []
    for field, wanted in ARCHITECTURES.items():
        value = getattr(cfg.model, field.split(".")[1])
        if HF_ID.match(value):  # resolved: an HF id is the only value still relative
            continue
        folder = Path(value)
        if not folder.is_dir():
            lines.append(f"{path}: {field}: {folder} is not a folder; name a model folder or a hub id")
            continue
        try:
            found = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not a JSON object"
            lines.append(f"{path}: {field}: {folder}/config.json cannot be read ({reason}); name a model folder")
            continue
        if not isinstance(found, list) or not set(map(str, found)) & set(wanted):
            lines.append(
                f"{path}: {field}: {folder} is a {found} model, not {' or '.join(wanted)}; "
                f"name a Gemma 4 {'body' if field == 'model.target' else 'MTP draft (the -assistant model)'}"
            )
    return lines


def _prompt_file_problems(path: Path, cfg: StudyConfig) -> list[str]:
    """Prompt text files that cannot give a prompt (`search/prompts.py`: one prompt per line, blank lines skipped):
    not UTF-8, or no prompt at all; a folder named without `column` (a dataset needs it)."""
    lines = []
    for field, ps in cfg.prompt_sets().items():
        if ps.column is not None:
            continue
        source = Path(ps.source)
        if source.is_dir():
            lines.append(f"{path}: {field}.source: {source} is a folder; a dataset also needs `column` and `split`")
            continue
        try:
            text = source.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            line = source.read_bytes()[: e.start].count(b"\n") + 1
            lines.append(f"{path}: {field}.source: {source} line {line} is not UTF-8 ({e.reason}); save it as UTF-8")
            continue
        except OSError as e:
            lines.append(f"{path}: {field}.source: {source} cannot be read ({e.strerror}); fix its permissions")
            continue
        if not any(line.strip() for line in text.splitlines()):
            lines.append(f"{path}: {field}.source: {source} has no prompt (blank lines are skipped); add one per line")
    return lines


# What a trial means, for a study resumed with an edited config (`trial_meaning`): a field here changes the candidates
# or how they are scored, so a study's trials stop being comparable when it changes; the rest is budget and operation
# (how long, where, how fast, what is kept, how results are read). A field takes the class of its longest prefix.
TRIAL_MEANING = (
    "model",
    "prompts",
    "abliteration",
    "quantization.scheme",
    "quantization.ignore",
    "serving.num_speculative_tokens",
    "acceptance.sets",
    "acceptance.max_tokens",
    "acceptance.temperature",
    "acceptance.seeds",
    "search.seed",  # it seeds ARA's optimiser too
    "search.methods",
    "search.space",
    "search.constraints",
    "search.acceptance_objective",
)
OPERATIONAL = (
    "name",
    "runs_dir",
    "abliteration.method",  # the `abliterate` command's; a study searches search.methods
    "abliteration.batch_size",
    "abliteration.workers",
    "quantization.incremental",  # byte-identical either way
    # n_trials, sampler, n_startup_trials, enqueue, max_consecutive_failures; extra_objectives too: a resumed study
    # refuses another objective list outright (storage.open_study)
    "search",
    "serving",  # launcher, image, vllm_args, env, timeouts, mode (a swap is checked against a cold start)
    "acceptance",  # concurrency (greedy answers do not depend on it), adaptive target_halfwidth, round_size
    "retention",
    "export",
    "draft_tune",
    "tracking",
    "storage",
)


def _leaves(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _leaves(f"{prefix}.{key}", sub).items()}
    if isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        return {k: v for i, sub in enumerate(value) for k, v in _leaves(f"{prefix}[{i}]", sub).items()}
    return {prefix: value}


def _class_of(field: str) -> bool:
    """Whether `field` (a dotted path, list indices allowed) changes what a trial means."""
    bare = re.sub(r"\[\d+\]", "", field)
    best = max(
        (p for p in (*TRIAL_MEANING, *OPERATIONAL) if bare == p or bare.startswith(p + ".")), key=len, default=None
    )
    if best is None:
        raise KeyError(f"{field} is in neither TRIAL_MEANING nor OPERATIONAL (search/config.py); classify it")
    return best in TRIAL_MEANING


def trial_meaning(cfg: StudyConfig) -> dict[str, Any]:
    """The fields that change what a trial means, flattened (`acceptance.sets[0].weight`), as JSON values: stored
    in the study when it is created, compared when it is resumed (`meaning_changes`). Paths as the TOML wrote them
    (`as_written`): a record independent of where the checkout is, the same as before paths resolved at load."""
    dumped = cfg.as_written()
    leaves = {k: v for key, value in dumped.items() for k, v in _leaves(key, value).items()}
    return {k: v for k, v in leaves.items() if _class_of(k)}


def meaning_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field: old -> new` for each meaning field that differs (absent on one side: `(none)`)."""

    def shown(v: Any) -> str:
        return "(none)" if v is _ABSENT else json.dumps(v)

    return [
        f"{k}: {shown(stored.get(k, _ABSENT))} -> {shown(current.get(k, _ABSENT))}"
        for k in sorted(set(stored) | set(current))
        if stored.get(k, _ABSENT) != current.get(k, _ABSENT)
    ]


_ABSENT = object()
