"""The `mtp-abliterate` command line: parses, calls and prints (the tables are in `search/views.py`)."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from mtp_abliterate.search import quiet, views
from mtp_abliterate.search.candidate.methods import NAMES
from mtp_abliterate.search.config import StudyConfig, load_config
from mtp_abliterate.search.credentials import ScrubbedStdout
from mtp_abliterate.search.errors import UserError


class _Root(typer.core.TyperGroup):
    """The command tree's root: a `UserError` from any command is printed as one line and exits 2, here only; a
    command's library output, routed to its study folder, comes back to the terminal before anything is printed."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            fail(str(e))
        finally:
            quiet.restore_stderr()


app = typer.Typer(cls=_Root, no_args_is_help=True, add_completion=False, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Study configuration files.")
organism_app = typer.Typer(no_args_is_help=True, help="The model organism: a tiny trained Gemma 4 + MTP draft.")
study_app = typer.Typer(no_args_is_help=True, help="Optuna studies: run (and resume), reference, status.")
app.add_typer(config_app, name="config")
app.add_typer(organism_app, name="organism")
app.add_typer(study_app, name="study")
# Every line goes through `credentials.scrub`: a password the tool has seen (a store URL's, MLFLOW_TRACKING_PASSWORD,
# PGPASSWORD) is never printed, whatever message carries it.
console = Console(file=ScrubbedStdout())
if not console.is_terminal:  # logs and CI: wide enough for the tables, never truncated
    console = Console(file=ScrubbedStdout(), width=120)


@app.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="show third-party warnings, logs and progress bars (default: in the study folder's "
            f"{quiet.LIBRARY_LOG})",
        ),
    ] = False,
) -> None:
    quiet.set_verbose(verbose)


def _quiet(cfg: StudyConfig) -> None:
    """Library output of a command on a study into its folder's log (or the terminal under --verbose)."""
    from mtp_abliterate.search.study.storage import run_dir_of

    quiet.quiet_libraries(run_dir_of(cfg) / quiet.LIBRARY_LOG)


METHODS = " | ".join(NAMES)  # the registered abliteration methods, for --method's help
OrganismDir = Annotated[Path | None, typer.Option(help="organism folder (default: the committed one)")]
Precision = Annotated[str, typer.Option(help="fp8 (as served in the study) or bf16")]


def fail(message: str) -> NoReturn:
    # One line whatever its length; escaped: a fix such as `pip install 'mtp-abliterate[distributed]'` is not markup.
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _json(text: str, option: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{option} is not valid JSON ({e}); pass an object such as '{{\"start_layer_index\": 1, ...}}'")


def _with_method(cfg: StudyConfig, method: str | None) -> StudyConfig:
    if not method:
        return cfg
    return cfg.model_copy(update={"abliteration": cfg.abliteration.model_copy(update={"method": method})})


@config_app.command("check")
def config_check(
    file: Path,
    paths: Annotated[bool, typer.Option(help="check that local inputs exist")] = True,
) -> None:
    """Validate a study TOML and print the resolved plan, and the merged config with the file each field came from."""
    cfg = load_config(file, check_paths=paths)
    console.print(views.plan_table(cfg))
    console.print(views.origins_table(cfg, console.width))
    for field in cfg.password_fields:
        served = field == "tracking.mlflow_uri" and str(cfg.tracking.mlflow_uri).startswith(("http:", "https:"))
        fix = (
            "export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"
            if served
            else "write ${PGPASSWORD} in its place and export it, or keep it in ~/.pgpass"
        )
        console.print(
            f"[yellow]warning:[/yellow] {escape(str(file))}: {field} holds a password, which anyone who reads the file "
            f"has (the tool never writes or prints it); {fix}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"[green]ok[/green]: {file} is valid")


def _layout(root: Path | None, release: bool = False):
    from mtp_abliterate.organism.layout import RELEASE_ROOT, OrganismLayout

    return OrganismLayout(root.resolve()) if root else OrganismLayout(RELEASE_ROOT) if release else OrganismLayout()


def _report(measured: dict) -> bool:
    from mtp_abliterate.organism.check import verdicts

    console.print(views.measured_table(measured))
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
    spec: Annotated[
        Path | None,
        typer.Option(help="an OrganismSpec JSON (e.g. a variant's spec.json); its format wins over --format"),
    ] = None,
) -> None:
    """Train the organism from scratch (deterministic), measure it and write its card."""
    from pydantic import ValidationError

    from mtp_abliterate.organism.build import build_and_record
    from mtp_abliterate.organism.spec import OrganismSpec

    if format not in ("text", "release"):
        fail(f"--format {format!r} is not one of text, release")
    try:
        organism = OrganismSpec.model_validate_json(spec.read_text()) if spec else OrganismSpec(format=format)
    except (OSError, ValidationError) as e:
        fail(f"--spec {spec}: {str(e).splitlines()[0]} (fix the file or leave --spec out for the default organism)")
    layout = _layout(out, release=organism.format == "release")
    measured, timings = build_and_record(layout, organism, console)
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


@app.command("abliterate")
def abliterate_cmd(
    file: Path,
    params: Annotated[str, typer.Option(help="the candidate's parameters as JSON (see README)")],
    method: Annotated[str | None, typer.Option(help=f"{METHODS} (default: the config's)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the merged BF16 checkpoint here")] = None,
) -> None:
    """One candidate on the resident model: prints refusal rate and KL, optionally writes the merged checkpoint."""
    from mtp_abliterate.search.candidate.resident import Resident, parse_parameters, shape_of
    from mtp_abliterate.search.study.storage import run_dir_of

    cfg = _with_method(load_config(file), method)
    raw = _json(params, "--params")
    _quiet(cfg)
    candidate = parse_parameters(cfg.abliteration.method, raw, shape_of(cfg.model.target))
    resident = Resident(cfg, cache_dir=run_dir_of(cfg) / "cache")
    details = resident.apply(candidate)
    digest = resident.abliterator.adapter_digest()
    console.print(views.candidate_table(cfg, resident.evaluate(), details["modules"], digest))
    if out:
        resident.abliterator.save_merged(out, resident.local_dir())
        console.print(f"merged BF16 checkpoint: {out}")


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
    from mtp_abliterate.search.baseline import as_deployed, baseline_dir, baseline_server, run_baseline

    cfg = load_config(file, check_paths=not dry_run)
    try:
        n_values = [int(x) for x in n.split(",")]
    except ValueError as e:
        fail(f"--n {n!r}: {e}; write e.g. 0,1,2,3,4")
    out = baseline_dir(cfg, label)
    if dry_run:
        for k in n_values:
            command = baseline_server(cfg, model or cfg.model.target, k, out).command()
            console.print(f"# n={k}\n" + shlex.join(command), highlight=False, soft_wrap=True)
        return
    _quiet(cfg)
    model = as_deployed(cfg.quantization, model or cfg.model.target, out)
    rows = run_baseline(cfg, model, n_values, out)
    console.print(views.baseline_table(model, rows))
    console.print(views.baseline_legend(rows[0].concurrency, out))


def _existing_study(target: Path):
    """(config, Optuna study) of a study that exists, from its run folder or its TOML; StudyNotFound if not."""
    from mtp_abliterate.search.study.storage import load_existing_study, load_study_config

    cfg = load_study_config(target)
    return cfg, load_existing_study(cfg)


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
    from mtp_abliterate.search.study.limits import RunLimits
    from mtp_abliterate.search.study.serving_plan import study_servers
    from mtp_abliterate.search.study.storage import study_lock

    cfg = load_config(file)
    if runs_dir:
        cfg = cfg.model_copy(update={"runs_dir": str(runs_dir.absolute())})
    s = cfg.search
    try:
        limits = RunLimits.from_options(n_trials or s.n_trials, s.max_consecutive_failures, until, timeout, time.time())
    except ValueError as e:
        fail(str(e))
    if dry_run:
        for title, server in study_servers(cfg):
            console.print(f"# {title}\n" + shlex.join(server.command()), highlight=False, soft_wrap=True)
        return
    with study_lock(cfg):  # one `study run` per folder: a second is refused before anything loads
        _study_run(cfg, file, limits)


def _study_run(cfg: StudyConfig, file: Path, limits) -> None:
    from mtp_abliterate.search.credentials import redact
    from mtp_abliterate.search.study.preflight import check_method, open_stores
    from mtp_abliterate.search.study.storage import check_config_unchanged
    from mtp_abliterate.search.study.tracking import served

    _quiet(cfg)
    check_method(cfg)
    storage = open_stores(cfg)
    check_config_unchanged(cfg, storage)
    # The model stack (heretic, transformers, peft), imported once the checks passed.
    from mtp_abliterate.search.study.runner import StudyRunner

    try:
        runner = StudyRunner(cfg, console, file, storage)
        runner.run(limits)
    except KeyboardInterrupt:
        console.print(
            "\n[yellow]interrupted[/]: the current trial was failed and re-queued, the server stopped; "
            f"run `mtp-abliterate study run {file}` to resume"
        )
        raise typer.Exit(130) from None
    console.print(views.pareto_table(cfg, runner.study, runner.objectives))
    console.print(views.winner_line(cfg, runner.study))
    uri = runner.mlflow_uri()
    browse = redact(uri) if served(uri) else f"mtp-abliterate ui {runner.run_dir} [--dashboard]"
    console.print(f"study folder: {runner.run_dir}\nbrowse it: {browse}")


@study_app.command("reference")
def study_reference(
    file: Path,
    params: Annotated[str, typer.Option(help="the candidate's parameters as JSON")],
    method: Annotated[str, typer.Option(help=METHODS)] = "directional",
    label: Annotated[
        str | None, typer.Option(help="its name in tables, plots and MLflow (default: the method)")
    ] = None,
) -> None:
    """Score one candidate (e.g. heretic's directional method) in the study's harness; list trials dominating it."""
    from mtp_abliterate.search.study.reference import score_reference
    from mtp_abliterate.search.study.runner import StudyRunner
    from mtp_abliterate.search.study.storage import study_lock

    cfg = load_config(file)
    raw = _json(params, "--params")
    with study_lock(cfg):  # it builds the same FP8 base and module I/O cache as `study run`
        _quiet(cfg)
        runner = StudyRunner(cfg, console, file)
        metrics, better = score_reference(runner, method, raw, label or method)
    console.print(views.reference_line(label or method, metrics, cfg.serving.num_speculative_tokens))
    console.print(f"trials dominating it (paired by prompt on acceptance): {better or 'none'}")


@study_app.command("status")
def study_status(target: Path) -> None:
    """Trials, their states and the Pareto set of a study (its run folder or its config)."""
    from mtp_abliterate.objectives.registry import objective_specs
    from mtp_abliterate.search.study import records

    cfg, study = _existing_study(target)
    objectives, n = objective_specs(cfg), cfg.serving.num_speculative_tokens
    console.print(views.trials_table(study, objectives, n))
    console.print(views.pareto_table(cfg, study, objectives))
    console.print(views.winner_line(cfg, study))
    console.print(views.swap_summary(cfg, records.swap_checks(study)))


@study_app.command("show")
def study_show(
    target: Annotated[Path, typer.Argument(help="the study's run folder or config")],
    trial: Annotated[int, typer.Argument(help="trial number (`study status` lists them)")],
) -> None:
    """One trial in full: every parameter (the tables abbreviate them), every metric, its failure and files."""
    from mtp_abliterate.search.study.records import TrialRecord

    _, study = _existing_study(target)
    found = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
    if not found:
        fail(f"study {study.study_name} has no trial {trial}; `mtp-abliterate study status {target}` lists them")
    console.print(views.trial_detail(TrialRecord.of(found[0])))


@app.command("ui")
def ui(
    target: Annotated[Path, typer.Argument(help="a study's run folder or config")],
    port: Annotated[int, typer.Option(help="port of the MLflow UI")] = 5000,
    host: Annotated[
        str, typer.Option(help="interface to listen on (0.0.0.0 to reach it from another machine)")
    ] = "127.0.0.1",
    workers: Annotated[
        int, typer.Option(help="MLflow's uvicorn workers: 1 beside a running study, 4 (MLflow's default) for a team")
    ] = 1,
    dashboard: Annotated[
        bool, typer.Option(help="also open optuna-dashboard on the study's storage (Pareto front of any 2 objectives)")
    ] = False,
    dashboard_port: Annotated[int, typer.Option(help="port of optuna-dashboard")] = 8080,
) -> None:
    """Browse a study: the MLflow UI on its tracking store (and optuna-dashboard on its storage); Ctrl-C stops both."""
    from mtp_abliterate.search.study import browse
    from mtp_abliterate.search.study.storage import load_study_config, redact, tracking_uri
    from mtp_abliterate.search.study.tracking import served

    cfg = load_study_config(target)
    uri, secret = tracking_uri(cfg), browse.store_password(cfg)
    commands, ports = [], {}
    if served(uri):  # the study logs to a tracking server: that server is the UI
        console.print(f"MLflow UI for study {cfg.name}: {redact(uri)}  (the study's tracking server)")
    else:
        commands.append(browse.mlflow_command(uri, host, port, workers))
        ports["--port"] = port
        shown = f"store {redact(uri)}; {workers} worker(s)"
        console.print(f"MLflow UI for study {cfg.name}: http://{host}:{port}  ({shown})")
    if dashboard:
        commands.append(browse.dashboard_command(cfg, host, dashboard_port))
        ports["--dashboard-port"] = dashboard_port
        url = f"http://{host}:{dashboard_port}"
        console.print(f"optuna-dashboard for study {cfg.name}: {url}  (Pareto front: pick any two objectives)")
    if not commands:
        return
    browse.check_free(ports)
    console.print("Ctrl-C to stop")
    browse.supervise(commands, secret)


def _scored_trial(target: Path, number: int | str):
    """(config, study, record) of a study's scored trial, from its run folder or config; `number` "best" is the
    study's named winner (`[export]` bounds)."""
    from mtp_abliterate.search.release.materialize import recorded_trial
    from mtp_abliterate.search.study.winner import pick_winner

    cfg, study = _existing_study(target)
    if number == "best":
        if (w := pick_winner(cfg, study)) is None:
            fail(views.winner_line(cfg, study) + "; widen [export] max_refusal_rate / max_kl or run more trials")
        number = w.record.number
    elif not str(number).isdigit():
        fail(f"--trial {number!r} is neither a trial number nor 'best'")
    return cfg, study, recorded_trial(study, int(number))


@app.command("materialize")
def materialize_cmd(
    study: Annotated[Path, typer.Argument(help="the study's run folder or config")],
    trial: Annotated[int, typer.Option(help="trial number")],
    out: Annotated[Path, typer.Option(help="a new folder for the checkpoint")],
    precision: Precision = "fp8",
) -> None:
    """Rebuild a trial's candidate from its recorded parameters; verify the edited tensors' recorded hash."""
    from mtp_abliterate.search.release.materialize import materialize

    cfg, _, t = _scored_trial(study, trial)
    _quiet(cfg)
    done = materialize(cfg, t, out, precision)
    console.print(
        f"trial {trial}: edited tensors match the record (sha256 {done.merged_digest[:16]}); {precision} in {out}"
    )


@app.command("export")
def export_cmd(
    study: Annotated[Path, typer.Argument(help="the study's run folder or config")],
    trial: Annotated[str, typer.Option(help="trial number, or 'best': the study's winner (`study status`)")],
    out: Annotated[Path | None, typer.Option(help="export folder (default: runs/<study>/exports/trial-N)")] = None,
    push: Annotated[str | None, typer.Option(help="upload to this Hugging Face repo, user/name")] = None,
    private: Annotated[bool, typer.Option(help="create the repo private")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="write the export and list what would be uploaded; upload nothing")
    ] = False,
    precision: Precision = "fp8",
    draft: Annotated[
        str, typer.Option(help="vanilla, or tuned: add the trial's `draft-tune` draft in draft/ (and to the card)")
    ] = "vanilla",
) -> None:
    """Write a trial's checkpoint with tokenizer files and a model card of its measured numbers; optionally push."""
    from mtp_abliterate.search.release.export import default_export_dir, export_trial, files_to_upload
    from mtp_abliterate.search.release.export import push as push_folder

    if draft not in ("vanilla", "tuned"):
        fail(f"--draft {draft!r} is not one of vanilla, tuned")
    cfg, optuna_study, t = _scored_trial(study, trial)
    out = out or default_export_dir(cfg, t.number, precision, draft)
    _quiet(cfg)
    export_trial(cfg, optuna_study, t, out, push, precision, draft)
    console.print(f"exported trial {t.number} ({precision}, {draft} draft) to {out}")
    if dry_run:
        console.print(f"would upload to {push or '<--push user/name>'}:")
        for f in files_to_upload(out):
            console.print(f"  {f}  ({(out / f).stat().st_size / 1e6:.1f} MB)", highlight=False)
    if dry_run or not push:
        return
    console.print(f"uploaded: {push_folder(out, push, private)}")


@app.command("draft-tune")
def draft_tune_cmd(
    study: Annotated[Path, typer.Argument(help="the study's run folder or config")],
    trial: Annotated[int, typer.Option(help="trial number (a scored candidate)")],
    steps: Annotated[int | None, typer.Option(help="optimiser steps (default: draft_tune.steps)")] = None,
    minutes: Annotated[float | None, typer.Option(help="training time limit (default: draft_tune.max_minutes)")] = None,
) -> None:
    """Re-align the vanilla MTP draft to a trial's candidate (self-distillation on its own answers, hidden states and
    KV); print the candidate's acceptance with the vanilla and the tuned draft, measured in the same vLLM harness."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mtp_abliterate.search.draft.report import identity_line, tune_table
    from mtp_abliterate.search.draft.run import budget_of, draft_tune, work_dir

    cfg, optuna_study, t = _scored_trial(study, trial)
    budget = budget_of(cfg, steps, minutes)
    _quiet(cfg)
    columns = (TextColumn("distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("distil", total=budget.steps, loss="-")

        def progress(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1, loss=f"{loss:.3f}")

        record = draft_tune(cfg, optuna_study, t, budget, progress, lambda line: bar.console.print(line))
    console.print(tune_table(record, f"trial {trial}: the candidate's acceptance with the vanilla and the tuned draft"))
    tr = record["training"]
    console.print(
        f"{tr['steps']} steps in {tr['seconds']:.0f} s on {record['examples']} answers, loss {tr['first_loss']:.3f} -> "
        f"{tr['last_loss']:.3f}; tuned draft: {record['draft']}\n{identity_line(record)}",
        highlight=False,
    )
    if not record["identical"]:
        fail(
            f"the candidate's greedy answers changed with the draft (see {work_dir(cfg, trial)}); the served body is "
            "not deterministic across batch shapes: measure with acceptance.concurrency = 1"
        )
