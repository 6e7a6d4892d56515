"""The `mtp-abliterate` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from search.config import ConfigError, StudyConfig, load_config

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
        ("quantization", f"{cfg.quantization.scheme}, BF16: {', '.join(cfg.quantization.ignore)}"),
        (
            "vLLM launcher",
            cfg.serving.launcher
            + (f" {cfg.resolve(cfg.serving.python)}" if cfg.serving.launcher == "python" else f" {cfg.serving.image}"),
        ),
        ("vLLM args", " ".join(cfg.serving.vllm_args) or "-"),
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
    from search.organism.layout import OrganismLayout

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
    from search.organism.check import verdicts

    console.print(measured_table(measured))
    ok = True
    for name, passed in verdicts(measured).items():
        ok &= passed
        console.print(f"  {'[green]pass[/green]' if passed else '[red]FAIL[/red]'}  {name}")
    return ok


@organism_app.command("build")
def organism_build(out: OrganismDir = None) -> None:
    """Train the organism from scratch (deterministic), measure it and write its card."""
    import time

    from search.organism.build import build_organism, save_card, tree_sha256
    from search.organism.check import check_organism
    from search.organism.spec import OrganismSpec
    from search.versions import software_versions

    layout, spec = _layout(out), OrganismSpec()
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
    from search.organism.check import check_organism
    from search.organism.spec import OrganismSpec

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
    from search.ara import AbliterationError
    from search.resident import Resident, num_layers_of, parse_parameters

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
    except AbliterationError as e:
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
        resident.abliterator.save_merged(out, cfg.resolve(cfg.model.target))
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
    import shlex

    from search.baseline import run_baseline
    from search.quantize import QuantizationError, quantize_fp8_dynamic
    from search.serve import ServerError, VllmServer

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
            )
            console.print(f"# n={k}\n" + shlex.join(server.command()), highlight=False, soft_wrap=True)
        return
    try:
        source = Path(model or cfg.resolve(cfg.model.target))
        model = str(source)
        # Compared as deployed: a local BF16 checkpoint is quantized like every candidate.
        config = source / "config.json"
        if (
            cfg.quantization.scheme == "FP8_DYNAMIC"
            and config.is_file()
            and "quantization_config" not in config.read_text()
        ):
            model = str(quantize_fp8_dynamic(source, out / "model-fp8", cfg.quantization.ignore).path)
        rows = run_baseline(cfg, model, n_values, out)
    except (ServerError, QuantizationError) as e:
        fail(str(e))
    table = Table(title=f"baseline: {model}", header_style="bold")
    for col in (
        "n",
        "prompts",
        "tok/s",
        "speed-up",
        "acceptance a0..a3",
        "mean acc ± 95% CI",
        "tokens/step",
        "drafts",
        "note",
    ):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(
            str(r.n) if r.n else "no spec",
            r.prompt_set,
            f"{r.tok_s:.1f}",
            f"{r.speedup:.2f}x",
            "/".join(f"{x:.3f}" for x in r.per_position) or "-",
            f"{r.mean_accepted_tokens:.3f} ± {r.ci95:.3f}" if r.n else "-",
            f"{r.tokens_per_step:.2f}",
            str(r.num_drafts),
            r.invalid_reason or "",
        )
    console.print(table)
    console.print(f"saved {out / 'baseline.csv'} and {out / 'baseline.json'}")
