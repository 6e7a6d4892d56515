"""Peak memory of every phase of a study trial at Gemma 4 26B-A4B's real shapes, measured in one run.

  python benchmarks/bench_memory.py --layers 2 --device cpu       smoke test on a small CPU machine
  python benchmarks/bench_memory.py --device cuda --budget-s 560  all 30 layers on a GPU (~50 GB of random BF16
                                                                  weights, ~27 GB FP8 base: ~130 GB of disk with the
                                                                  whole-model reference)

A random-weight checkpoint in the release layout (`Gemma4ForConditionalGeneration`, `model.language_model.*`, fused
experts, tied embeddings, a 27-layer vision tower, ~5 GB BF16 shards) is generated under --workdir, then each phase of
a study runs on it as the study runs it: the resident model (heretic + adapters), module I/O capture, ARA, the FP8
base (streamed, one shard at a time), the merge, the candidate write, KL, heretic-side refusals, and llm-compressor's
whole-model FP8 run (the reference the streamed quantizer replaced). Per phase: wall seconds, peak process RSS
(VmHWM after a clear_refs reset, and a 20 ms sampler), peak CUDA memory (allocated and reserved), and their sum:
what a unified-memory machine (a 128 GB DGX Spark / GB10) has to hold at once. Phases that would overrun --budget-s
are skipped with a note. With fewer layers the per-layer part is projected linearly to 30 layers (PROJECTED).
The table is also written as JSON to --out (default $OUT, else the workdir), after every phase.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import sys
import threading
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORGANISM = REPO / "organism-release"
REAL_LAYERS = 30
GIB = 2**30

# Gemma 4 26B-A4B: the organism's config.json (the project's field names) with the real sizes.
TEXT = dict(
    hidden_size=2816,
    intermediate_size=2112,
    moe_intermediate_size=704,
    num_experts=128,
    top_k_experts=8,
    enable_moe_block=True,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    num_global_key_value_heads=2,
    global_head_dim=512,
    attention_k_eq_v=True,
    sliding_window=1024,
    vocab_size=262144,
    max_position_embeddings=262144,
    final_logit_softcapping=30.0,
    hidden_size_per_layer_input=0,
    vocab_size_per_layer_input=0,
    tie_word_embeddings=True,
)
# SigLIP-so400m-sized vision tower, as Gemma 3/4's larger variants use: 27 layers.
VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=72,
    position_embedding_size=10240,
)


def _pre_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=REAL_LAYERS, help="text decoder layers (30 = the real model)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_memory"), help="checkpoint, base, candidates")
    p.add_argument("--out", type=Path, default=None, help="folder for bench_memory.json (default $OUT, else workdir)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="checkpoint shard size")
    p.add_argument("--budget-s", type=float, default=0.0, help="skip optional phases that would overrun (0: none)")
    p.add_argument("--train-prompts", type=int, default=400, help="harmful and harmless train prompts each")
    p.add_argument("--rank", type=int, default=32, help="adapter rank (configs/gemma4-26b-a4b.toml: 32)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward (configs/gemma4-26b-a4b.toml)")
    p.add_argument("--skip", default="", help="comma-separated optional phases to skip: refusals,reference")
    p.add_argument("--keep", action="store_true", help="keep the workdir (checkpoint, FP8 base)")
    p.add_argument("--reuse", action="store_true", help="reuse the workdir's checkpoint if complete (with --keep)")
    p.add_argument("--reference-only", action="store_true", help="only the whole-model llm-compressor phase")
    return p.parse_args()


ARGS = _pre_args() if __name__ == "__main__" else None
if ARGS is not None:
    if ARGS.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:  # heretic's device_map="auto" would spread the model over every visible GPU; one GPU, as on a Spark
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    os.environ.setdefault("CT_ENFORCE_EAGER", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(REPO))

console = Console(width=150)


# ---------------------------------------------------------------------------------------------------- measurement
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Sampler:
    """Peak VmRSS seen every 20 ms (where clear_refs cannot reset VmHWM, e.g. under gVisor)."""

    def __init__(self) -> None:
        self.peak = 0
        self.peak_anon = 0  # anonymous memory (heap, tensors); the rest of RSS is mapped files (safetensors mmap)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status_kib("VmRSS"))
            self.peak_anon = max(self.peak_anon, _status_kib("RssAnon"))

    def reset(self) -> None:
        self.peak = _status_kib("VmRSS")
        self.peak_anon = _status_kib("RssAnon")


class Recorder:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.sampler = Sampler()
        self.cuda = args.device == "cuda" and torch.cuda.is_available()
        self.t_start = time.perf_counter()
        self.meta: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def note(self, text: str) -> None:
        console.print(f"[yellow]note:[/] {text}")
        self.notes.append(text)
        self.save()

    @contextmanager
    def phase(self, name: str, per_layer: bool = True):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        hwm_ok = _reset_hwm()
        self.sampler.reset()
        rss0 = _status_kib("VmRSS")
        cuda0 = torch.cuda.memory_allocated() if self.cuda else 0
        console.print(f"[bold]{name}[/] ... (t={self.elapsed():.0f} s)")
        t0 = time.perf_counter()
        row = {"phase": name, "status": "failed"}
        try:
            yield row
            row["status"] = "ok"
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            console.print_exception(max_frames=8)
            raise
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            hwm = _status_kib("VmHWM") if hwm_ok else 0
            peak_rss = max(hwm, self.sampler.peak, _status_kib("VmRSS")) * 1024 / GIB
            row.update(
                seconds=round(seconds, 2),
                rss_start_gib=round(rss0 * 1024 / GIB, 2),
                peak_rss_gib=round(peak_rss, 2),
                peak_rss_anon_gib=round(max(self.sampler.peak_anon, _status_kib("RssAnon")) * 1024 / GIB, 2),
                rss_end_gib=round(_status_kib("VmRSS") * 1024 / GIB, 2),
                rss_source="VmHWM+sampler" if hwm_ok else "sampler (clear_refs unavailable)",
                cuda_start_gib=round(cuda0 / GIB, 2),
                peak_cuda_alloc_gib=round(torch.cuda.max_memory_allocated() / GIB, 2) if self.cuda else 0.0,
                peak_cuda_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2) if self.cuda else 0.0,
                cuda_end_gib=round(torch.cuda.memory_allocated() / GIB, 2) if self.cuda else 0.0,
                per_layer=per_layer,
            )
            row["rss_plus_cuda_gib"] = round(row["peak_rss_gib"] + row["peak_cuda_reserved_gib"], 2)
            self.rows.append(row)
            self.save()
            console.print(
                f"  {seconds:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB, "
                f"peak CUDA {row['peak_cuda_reserved_gib']:.2f} GiB"
            )

    def save(self) -> None:
        data = {"meta": self.meta, "rows": self.rows, "notes": self.notes, "projected": self.projected()}
        (self.out / "bench_memory.json").write_text(json.dumps(data, indent=1))

    def projected(self) -> list[dict]:
        """Linear projection to 30 layers from the ratio of text-layer parameters (the embeddings and the vision
        tower do not scale). Only meaningful when fewer layers were measured."""
        layers = self.args.layers
        if layers >= REAL_LAYERS or not self.meta.get("params"):
            return []
        fixed, per = self.meta["params"]["fixed"], self.meta["params"]["per_layer_avg"]
        factor = (fixed + REAL_LAYERS * per) / (fixed + layers * per)
        rows = []
        for r in self.rows:
            if r["status"] != "ok":
                continue
            f = factor if r["per_layer"] else 1.0
            rows.append(
                {
                    "phase": r["phase"],
                    "factor": round(f, 2),
                    "seconds": round(r["seconds"] * f, 1),
                    "peak_rss_gib": round(r["peak_rss_gib"] * f, 2),
                    "peak_cuda_reserved_gib": round(r["peak_cuda_reserved_gib"] * f, 2),
                    "rss_plus_cuda_gib": round(r["rss_plus_cuda_gib"] * f, 2),
                }
            )
        return rows

    def table(self) -> None:
        layers = self.args.layers
        t = Table(title=f"Study-trial memory, Gemma 4 26B-A4B shapes, {layers} layers MEASURED ({self.meta['device']})")
        for col in (
            "phase",
            "s",
            "peak RSS GiB",
            "of it anon GiB",
            "peak CUDA alloc GiB",
            "peak CUDA reserved GiB",
            "RSS+CUDA GiB",
            "RSS / CUDA at end GiB",
            "status",
        ):
            t.add_column(col)
        for r in self.rows:
            t.add_row(
                r["phase"],
                f"{r['seconds']:.1f}",
                f"{r['peak_rss_gib']:.2f}",
                f"{r['peak_rss_anon_gib']:.2f}",
                f"{r['peak_cuda_alloc_gib']:.2f}",
                f"{r['peak_cuda_reserved_gib']:.2f}",
                f"{r['rss_plus_cuda_gib']:.2f}",
                f"{r['rss_end_gib']:.1f} / {r['cuda_end_gib']:.1f}",
                r["status"],
            )
        console.print(t)
        proj = self.projected()
        if proj:
            p = Table(title=f"PROJECTED to {REAL_LAYERS} layers (linear in text-layer parameters, from {layers})")
            for col in ("phase", "x", "s", "peak RSS GiB", "peak CUDA GiB", "RSS+CUDA GiB"):
                p.add_column(col)
            for r in proj:
                p.add_row(
                    r["phase"],
                    f"{r['factor']:.2f}",
                    f"{r['seconds']:.0f}",
                    f"{r['peak_rss_gib']:.1f}",
                    f"{r['peak_cuda_reserved_gib']:.1f}",
                    f"{r['rss_plus_cuda_gib']:.1f}",
                )
            console.print(p)
        streamed = next((r for r in self.rows if r["phase"].startswith("5 ") and r["status"] == "ok"), None)
        whole = next((r for r in self.rows if r["phase"].startswith("9 ") and r["status"] == "ok"), None)
        if streamed and whole:
            console.print(
                "FP8 base, whole-model llm-compressor / streamed (same run): peak RSS "
                f"{whole['peak_rss_gib'] / streamed['peak_rss_gib']:.1f}x, of it anon "
                f"{whole['peak_rss_anon_gib'] / streamed['peak_rss_anon_gib']:.1f}x, "
                f"time {whole['seconds'] / streamed['seconds']:.1f}x"
            )
        for n in self.notes:
            console.print(f"note: {n}")


# ------------------------------------------------------------------------------------------------------ checkpoint
def real_config(layers: int) -> dict:
    config = json.loads((ORGANISM / "body" / "config.json").read_text())
    text = {**config["text_config"], **TEXT}
    text["num_hidden_layers"] = layers
    # 5 sliding : 1 full; transformers forces the last layer to full attention (the real model's layer 29 is)
    text["layer_types"] = [
        "full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention" for i in range(layers)
    ]
    config["text_config"] = text
    config["vision_config"] = {**config["vision_config"], **VISION}
    return config


def make_checkpoint(path: Path, layers: int, device: str, shard_gb: float) -> dict:
    """Random BF16 weights in the release layout, ~shard_gb shards, tokenizer files from the release organism."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    config = Gemma4Config.from_dict(real_config(layers))
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    del model
    pattern = lambda names: {re.sub(r"\.\d+\.", ".N.", k) for k in names}  # noqa: E731
    organism = safe_open(ORGANISM / "body" / "model.safetensors", "pt").keys()  # the same layout, at tiny size
    if not pattern(shapes) <= pattern(organism):  # (one layer, full attention only, has no v_proj: a subset)
        raise RuntimeError(f"layout differs from the organism's: {sorted(pattern(shapes) - pattern(organism))[:5]}")
    fixed = sum(_numel(s) for k, s in shapes.items() if ".layers." not in k or "vision" in k)
    per_layer = (sum(_numel(s) for s in shapes.values()) - fixed) / layers
    path.mkdir(parents=True, exist_ok=True)
    limit = int(shard_gb * 1e9)
    groups: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        nbytes = _numel(s) * 2
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    gen_device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    weight_map = {}
    for i, names in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for k in names:
            t = torch.empty(shapes[k], dtype=torch.bfloat16, device=gen_device)
            if len(shapes[k]) <= 1:  # norms, scalars, router scales
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02)
            tensors[k] = t.cpu()
            weight_map[k] = file
        save_file(tensors, path / file, metadata={"format": "pt"})
        del tensors
        console.print(f"  wrote {file}")
    total = sum(_numel(s) * 2 for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.dtype = "bfloat16"
    config.architectures = ["Gemma4ForConditionalGeneration"]
    (path / "config.json").write_text(config.to_json_string())
    for f in (ORGANISM / "body").iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, path / f.name)
    return {"total_params": total // 2, "fixed": fixed, "per_layer_avg": per_layer, "shards": len(groups)}


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def study_config(path: Path, target: Path, layers: int, args: argparse.Namespace) -> Path:
    """configs/organism-release.toml (prompts, draft) with the target config's settings, pointed at `target`."""
    import tomli_w

    from mtp_abliterate.search.config_merge import load_merged

    raw = load_merged(REPO / "configs" / "organism-release.toml").raw  # with organism.toml, which it extends
    real = tomllib.loads((REPO / "configs" / "gemma4-26b-a4b.toml").read_text())
    absolute = lambda p: str((REPO / "configs" / p).resolve())  # noqa: E731
    raw["name"] = "bench-memory"
    raw["runs_dir"] = str(path / "runs")
    raw["model"].update(target=str(target), draft=absolute(raw["model"]["draft"]), dtype="bfloat16")
    for key, ps in raw["prompts"].items():
        ps["source"] = absolute(ps["source"])
        if key.endswith("train"):
            ps["split"] = f"[:{args.train_prompts}]"
    for s in raw["acceptance"]["sets"]:
        s["prompts"]["source"] = absolute(s["prompts"]["source"])
    raw["serving"]["python"] = absolute(raw["serving"]["python"])
    raw["abliteration"].update(real["abliteration"], rank=args.rank, batch_size=args.batch_size)
    raw["quantization"] = real["quantization"]
    raw["search"]["enqueue"] = [
        dict(start_layer_index=0, end_layer_index=layers, preserve_w=1.0, steer_w=0.05, overcorrect_w=1.0, k=5)
    ]
    out = path / "study.toml"
    out.write_text(tomli_w.dumps(raw))
    return out


# ------------------------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> None:
    out = args.out or Path(os.environ.get("OUT") or args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.workdir / "runs", ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rec = Recorder(args, out)
    rec.meta = {
        "layers": args.layers,
        "device": torch.cuda.get_device_name() if rec.cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
    }
    skip = set(filter(None, args.skip.split(",")))
    ckpt = args.workdir / "model"
    if args.reuse and (ckpt / "config.json").is_file():
        rec.meta["params"] = json.loads((args.workdir / "params.json").read_text())
        rec.note(f"reused the checkpoint in {ckpt}")
    else:
        shutil.rmtree(ckpt, ignore_errors=True)
        with rec.phase("0 random checkpoint (setup, not a study phase)", per_layer=True):
            rec.meta["params"] = make_checkpoint(ckpt, args.layers, args.device, args.shard_gb)
        (args.workdir / "params.json").write_text(json.dumps(rec.meta["params"]))
    console.print(rec.meta["params"])
    if rec.cuda:
        torch.cuda.empty_cache()
    try:
        if not args.reference_only:
            trial_phases(args, rec, ckpt, skip)
        reference_phase(args, rec, ckpt, skip)
    finally:
        rec.table()
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


def trial_phases(args: argparse.Namespace, rec: Recorder, ckpt: Path, skip: set[str]) -> None:
    from mtp_abliterate.search.candidate.ara import AraParameters
    from mtp_abliterate.search.candidate.fp8_base import write_candidate
    from mtp_abliterate.search.candidate.resident import Resident
    from mtp_abliterate.search.config import load_config
    from mtp_abliterate.search.trial.pipeline import fp8_base

    cfg = load_config(study_config(args.workdir, ckpt, args.layers, args), check_paths=False)
    run_dir = args.workdir / "runs" / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)

    with rec.phase("1 resident load (heretic Model + adapters)"):
        resident = Resident(cfg, cache_dir=run_dir / "cache")
    rec.meta["model_device"] = str(next(resident.model.model.parameters()).device)
    with rec.phase("2 module I/O capture (first apply)") as row:
        io, hit = resident.module_io()
        row["from_disk_cache"] = hit
    params = AraParameters(**cfg.search.enqueue[0])
    with rec.phase("3 ARA (apply)"):
        resident.apply(params)
    with rec.phase("4 KL (kld.compute)") as row:
        row["kl"] = resident.kld.compute().value
    with rec.phase("5 FP8 base, streamed (prepare_base, once per study)"):
        base = fp8_base(cfg, resident, run_dir)
    rec.meta["fp8_base_gb"] = round(sum(f.stat().st_size for f in base.iterdir() if f.is_file()) / 1e9, 2)
    with rec.phase("6 merge (merged_weights)"):
        weights = resident.abliterator.merged_weights()
    with rec.phase("7 candidate write (write_candidate)"):
        write_candidate(base, run_dir / "candidate", weights)
    del weights
    avg = {r["phase"]: r["seconds"] for r in rec.rows}

    # heretic generates max_response_length tokens per harmful eval prompt; in a study vLLM answers them.
    if fits(rec, args, skip, "refusals", 60.0 + 40 * avg["4 KL (kld.compute)"]):
        try:
            with rec.phase("8 refusals, heretic side (NOT in a study: vLLM serves them)") as row:
                row["refusal_rate"] = resident.refusal.compute().value
        except Exception as e:  # noqa: BLE001
            rec.note(f"refusals failed: {type(e).__name__}: {e}")
    else:
        rec.note("refusals: served by vLLM, not in the study process")
    resident.abliterator.reset()
    shutil.rmtree(run_dir / "candidate", ignore_errors=True)
    rec.meta["fp8_streamed_s"] = avg["5 FP8 base, streamed (prepare_base, once per study)"]


def fits(rec: Recorder, args: argparse.Namespace, skip: set[str], name: str, estimate: float) -> bool:
    if name in skip:
        rec.note(f"{name}: skipped (--skip)")
        return False
    if args.budget_s and rec.elapsed() + estimate > args.budget_s:
        rec.note(
            f"{name}: skipped, ~{estimate:.0f} s would overrun --budget-s {args.budget_s:.0f} (t={rec.elapsed():.0f} s)"
        )
        return False
    return True


def reference_phase(args: argparse.Namespace, rec: Recorder, ckpt: Path, skip: set[str]) -> None:
    """tests/llmcompressor_reference.py: the whole BF16 model in RAM, oneshot, save_pretrained (the old path)."""
    import gc as _gc

    _gc.collect()
    ignore = tomllib.loads((REPO / "configs" / "gemma4-26b-a4b.toml").read_text())["quantization"]["ignore"]
    src_gb = rec.meta["params"]["total_params"] * 2 / 1e9
    free_gb = shutil.disk_usage(args.workdir).free / 1e9
    need_ram = src_gb * 1.1 + _status_kib("VmRSS") * 1024 / 1e9
    estimate = 3 * rec.meta.get("fp8_streamed_s", 60) + 30
    if free_gb < src_gb * 0.6:
        rec.note(f"reference: skipped, {free_gb:.0f} GB free disk < {src_gb * 0.6:.0f} GB for a second FP8 copy")
    elif rec.meta["ram_gib"] * GIB / 1e9 < need_ram:
        rec.note(f"reference: skipped, {rec.meta['ram_gib']} GiB RAM < ~{need_ram:.0f} GB (a second whole BF16 model)")
    elif fits(rec, args, skip, "reference", estimate):
        sys.path.insert(0, str(REPO / "tests"))
        from llmcompressor_reference import whole_model_fp8

        try:
            with rec.phase("9 FP8 whole model, llm-compressor oneshot (old path; resident still on GPU)"):
                whole_model_fp8(ckpt, args.workdir / "reference-fp8", list(ignore))
        except Exception as e:  # noqa: BLE001
            rec.note(f"reference failed: {type(e).__name__}: {e}")
        shutil.rmtree(args.workdir / "reference-fp8", ignore_errors=True)


if __name__ == "__main__":
    main(ARGS)
