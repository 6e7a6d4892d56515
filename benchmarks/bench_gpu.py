"""The fast path on a real GPU vLLM: cold starts, in-place swaps vs cold starts, and Gemma 4 26B-A4B's real shapes.

Steps on two machines (issue #37):

  # HERE (CPU, the product's .venv): checkpoints made by the product itself, and the real shapes' plan
  .venv/bin/python benchmarks/bench_gpu.py prep --out .gpu
  # THERE (GPU machine, vLLM 0.32.0 payload on PYTHONPATH, ../shared/gpu-vllm/README.md), one command each:
  python3 benchmarks/bench_gpu.py organism --ckpts .gpu --out $OUT        # organism matrix, ~7 min on an H100
  python3 benchmarks/bench_gpu.py shapes --ckpts .gpu --out $OUT          # real shapes, random FP8 weights
  python3 benchmarks/bench_gpu.py study --payload DIR --out $OUT          # the product's `study run`, organism
  # HERE again: one table from the JSON files
  python3 benchmarks/bench_gpu.py report OUT1/organism.json OUT2/shapes.json --md benchmarks/results/gpu-DATE.md

`prep` writes, with the product's own code: an ARA candidate of the organism (`mtp-abliterate abliterate`, the
first enqueued trial of configs/organism.toml), and FP8_DYNAMIC checkpoints of the body and the candidate made by the
product's streamed quantizer (`search/candidate/quantize.py`, byte-identical to llm-compressor) with the MoE experts
in FP8 (the GPU config's ignore list) and in BF16 (the CPU config's); the release organism in FP8 (GPU ignore list);
and for the real shapes the plan llm-compressor takes for Gemma 4 26B-A4B (which tensors are FP8, config.json with
its quantization_config, recipe.yaml) on a meta-device model: every tensor's name, shape and dtype.

`organism` drives vLLM with the product's serving module (`VllmServer`: its command line, worker extension,
`swap` = /pause, reload_weights, repair_after_reload, /reset_prefix_cache, /resume) and its objectives
(`RefusalRate`, `AcceptanceSets` at the fixed budget, `swap_check.swap_verdict` with its 2x cold-vs-cold rule), for
experts in FP8 and in BF16, eager (--enforce-eager) and compiled (torch.compile + CUDA graphs): base server, swap
the candidate in, measure; two cold servers of the candidate, measure; compare answers, per-request spec-decode
histograms and the product's fingerprint. Several servers run at once on the one GPU (4 GiB each), so start times
are under load: they are upper bounds. heretic is not on the GPU machine: its `config.py` travels (the refusal
markers the product imports) and `heretic.utils.Prompt` is a two-field dataclass, written here identically.

`study` runs the product's own CLI (`mtp-abliterate study run`, then `study status`) on configs/organism.toml with
the GPU settings written at run time (experts in FP8, vLLM's default CUDA graphs, serving.mode auto, the self-check
beside the study server, the payload as the servers' PYTHONPATH) and keeps what the study recorded: the vanilla and
each trial's metrics and stage times, how each was served, the swap self-check's verdict, its servers' log facts. The
study process needs the product's dependencies (benchmarks/gpu/site.sh builds them; benchmarks/gpu/device.sh runs
the steps there, one call at a time). `study --probe` checks that environment before the payload is there.

`shapes` writes a random-weight FP8 checkpoint at the real shapes in the fast path's layout (every editable matrix
in its own `edit-*.safetensors`, the rest in ~5 GB `base-*` shards), a candidate (the edited files re-drawn, the
rest linked) and a BF16 draft at the released assistant's config, then per server: cold start, peak GPU memory
(nvidia-smi), decode tokens/s single-stream and 8 in flight, and on the swap server a full reload_weights (every
file) and a partial one (only the edited files), checked against each other token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant."
GPU_IGNORE = [
    "lm_head",
    "re:.*router.*",
    "re:.*vision_tower.*",
    "re:.*audio_tower.*",
    "re:.*embed_vision.*",
    "re:.*embed_audio.*",
]  # configs/gemma4-26b-a4b.toml: experts in FP8
CPU_IGNORE = ["lm_head", "re:.*router.*", "re:.*experts.*"]  # configs/organism.toml: experts in BF16
ARA = {"start_layer_index": 1, "end_layer_index": 4, "preserve_w": 1.0, "steer_w": 0.05, "overcorrect_w": 1.0, "k": 5}
GPU_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1"}  # the slim payload has no flashinfer
GPU_ARGS = ["--attention-backend", "TRITON_ATTN"]  # else FlashAttention 4 (CUTLASS DSL, not in the payload)
SPARK_BYTES = 0.30 * 128e9  # resident_gpu_memory_utilization 0.30 of a 128 GB DGX Spark


# ----------------------------------------------------------------------------------------------------- prep (CPU)
def prep(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from mtp_abliterate.search.candidate.quantize import quantize_fp8_dynamic

    out = Path(args.out).resolve()
    org = out / "org"
    org.mkdir(parents=True, exist_ok=True)
    cand = org / "cand-bf16"
    if not (cand / "config.json").exists():  # the product's CLI: one ARA candidate, merged BF16
        cli = REPO / ".venv" / "bin" / "mtp-abliterate"
        subprocess.run(
            [
                str(cli),
                "abliterate",
                str(REPO / "configs/organism.toml"),
                "--params",
                json.dumps(ARA),
                "--out",
                str(cand),
            ],
            check=True,
        )
    jobs = {
        "body-fp8e": (REPO / "organism/body", GPU_IGNORE),
        "cand-fp8e": (cand, GPU_IGNORE),
        "body-bf16e": (REPO / "organism/body", CPU_IGNORE),
        "cand-bf16e": (cand, CPU_IGNORE),
        "release-fp8e": (REPO / "organism-release/body", GPU_IGNORE),
    }
    for name, (src, ignore) in jobs.items():
        if not (org / name / "config.json").exists():
            done = quantize_fp8_dynamic(src, org / name, ignore)
            print(f"{name}: {len(done.fp8)} FP8 weights, {len(done.bf16)} BF16 tensors")
    snap = out / "src"  # the product's code as checked here (others edit the tree while the GPU runs)
    shutil.rmtree(snap, ignore_errors=True)
    for folder in ("search", "objectives"):
        shutil.copytree(REPO / folder, snap / folder, ignore=shutil.ignore_patterns("__pycache__"))
    status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--short", "search", "objectives"], capture_output=True, text=True
    ).stdout
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    (snap / "SNAPSHOT").write_text(f"HEAD {head}uncommitted at the snapshot:\n{status}")
    import heretic.config

    shutil.copy2(heretic.config.__file__, out / "heretic_config.py")  # the refusal markers the product imports
    prep_shapes(out / "shapes")


def prep_shapes(out: Path) -> None:
    """llm-compressor's plan for the real shapes on a meta model: names, shapes, dtypes, FP8 or not, configs."""
    import tempfile

    import torch
    from bench_draft_tune import ASSISTANT_TEXT
    from bench_memory import REAL_LAYERS, TEXT, real_config
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes
    from llmcompressor.transformers.compression.compressed_tensors_utils import resave_config
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Gemma4AssistantConfig,
        Gemma4AssistantForCausalLM,
        Gemma4TextConfig,
    )

    from mtp_abliterate.search.candidate.quantize import plan

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = real_config(REAL_LAYERS)
        cfg["architectures"] = ["Gemma4ForConditionalGeneration"]
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        the_plan = plan(Path(tmp), GPU_IGNORE)
        config = AutoConfig.from_pretrained(tmp)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        for name, experts in get_non_linearized_moes(model):  # as plan() does: the per-expert Linear modules
            linear = LinearExperts2D.get_linear_experts_cls(type(experts))
            with torch.device("meta"):
                model.set_submodule(name, linear(getattr(experts, "config", model.config)))
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    tensors = {k: [shapes[k], str(dt).removeprefix("torch."), k in the_plan.fp8] for k, dt in the_plan.dtypes.items()}
    (out / "manifest.json").write_text(json.dumps(tensors))
    the_plan.config.save_pretrained(out)  # as quantize_fp8_dynamic writes them
    resave_config(the_plan.config, str(out))
    the_plan.compressor.update_config(str(out))
    the_plan.recipe.yaml(file_path=str(out / "recipe.yaml"))
    for f in (REPO / "organism-release/body").iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    draft = out / "draft"
    draft.mkdir(exist_ok=True)
    dcfg = Gemma4AssistantConfig(
        text_config=Gemma4TextConfig(**ASSISTANT_TEXT), backbone_hidden_size=TEXT["hidden_size"]
    )
    with torch.device("meta"):
        dmodel = Gemma4AssistantForCausalLM(dcfg)
    tied = dmodel.lm_head.weight is dmodel.get_input_embeddings().weight
    dshapes = {k: list(v.shape) for k, v in dmodel.state_dict().items() if not (tied and k == "lm_head.weight")}
    from safetensors import safe_open

    pattern = lambda names: {re.sub(r"\.\d+\.", ".N.", k) for k in names}  # noqa: E731
    organism = safe_open(REPO / "organism-release/draft/model.safetensors", "pt").keys()
    if pattern(dshapes) != pattern(organism):
        raise SystemExit(f"draft layout differs from the organism's: {pattern(dshapes) ^ pattern(organism)}")
    dcfg.architectures = ["Gemma4AssistantForCausalLM"]
    dcfg.dtype = "bfloat16"
    (draft / "config.json").write_text(dcfg.to_json_string())
    (draft / "manifest.json").write_text(json.dumps(dshapes))
    for f in (REPO / "organism-release/draft").iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, draft / f.name)
    n_fp8 = sum(v[2] for v in tensors.values())
    print(f"shapes: {len(tensors)} tensors ({n_fp8} FP8), draft {len(dshapes)} tensors -> {out}")


# ------------------------------------------------------------------------------------------- GPU-side helpers
def link_product(root: Path, src: Path = REPO) -> Path:
    """`root/mtp_abliterate`: links to the folders the editable install maps (pyproject.toml), for a python that
    has the product's dependencies but not the product; returns `root` (put it on the path)."""
    pkg = root / "mtp_abliterate"
    if not pkg.exists():
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        for name, folder in (("search", "search"), ("objectives", "objectives"), ("organism", "organism/builder")):
            (pkg / name).symlink_to(src / folder)
    return root


def product_on_path(ckpts: Path) -> None:
    """`mtp_abliterate` from this checkout (links), heretic's config.py (carried) and a Prompt dataclass."""
    src = ckpts / "src" if (ckpts / "src").is_dir() else REPO  # `prep --snapshot`: the code checked here
    root = link_product(Path("/tmp/mtpa"), src)
    try:
        import heretic.config  # noqa: F401
    except ImportError:
        h = root / "heretic"
        h.mkdir(exist_ok=True)
        (h / "__init__.py").write_text("")
        shutil.copy2(ckpts / "heretic_config.py", h / "config.py")
        (h / "utils.py").write_text(
            "from dataclasses import dataclass\n\n\n@dataclass\nclass Prompt:\n    system: str\n    user: str\n"
        )
    sys.path.insert(0, str(root))


def gpu_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


def versions() -> dict:
    import torch
    import transformers

    v = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": gpu_name(),
        "cuda": torch.version.cuda,
    }
    try:
        import vllm

        v["vllm"] = vllm.__version__
    except Exception as e:  # noqa: BLE001
        v["vllm"] = f"not importable: {e}"
    return v


def snapshot(ckpts: Path) -> str:
    f = ckpts / "src" / "SNAPSHOT"
    return f.read_text() if f.exists() else "the working tree as it was"


class GpuMemory:
    """Peak GPU memory of processes (nvidia-smi, every 0.5 s) while a `with` block runs."""

    def __init__(self) -> None:
        self.peak_mib, self.samples, self._stop = 0, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                q = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout.split()
                self.peak_mib = max(self.peak_mib, int(q[0]))
                self.samples += 1
            except Exception:  # noqa: BLE001
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def log_facts(log: Path) -> dict:
    """What vLLM says about itself in its log: MoE backend, KV cache, reload time, graph capture, errors."""
    text = log.read_text(errors="replace") if log.exists() else ""
    facts = {}
    for key, pat in (
        ("moe_backend", r"[Uu]sing (\S+) (?:Fp8 |FP8 )?MoE backend[^\n]*"),
        ("kv_cache_tokens", r"GPU KV cache size: ([\d,]+) tokens"),
        ("model_load_gib", r"Model loading took ([\d.]+) GiB"),
        ("model_load_s", r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) seconds"),
        ("graph_capture", r"Graph capturing finished in ([\d.]+) secs?[^\n]*"),
        ("compile_s", r"torch.compile t(?:akes|ook) ([\d.]+) s in total"),  # vLLM 0.32: "took"
        ("init_engine_s", r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
        ("reload_s", r"Reloading and processing weights took ([\d.]+) seconds"),
    ):
        m = re.findall(pat, text)
        if m:
            facts[key] = m[-1] if key not in ("reload_s", "compile_s") else m  # per reload, per compiled model
    errors = [
        line.strip()[:300]
        for line in text.splitlines()
        if re.search(r"illegal memory access|CUDA error|Traceback|EngineDeadError|RuntimeError", line)
    ]
    if errors:
        facts["errors"] = errors[:6]
    return facts


# ------------------------------------------------------------------------------------------- organism (GPU)
def organism(args: argparse.Namespace) -> None:
    ckpts = Path(args.ckpts).resolve()
    product_on_path(ckpts)
    from heretic.utils import Prompt

    from mtp_abliterate.objectives.acceptance import AcceptanceSets
    from mtp_abliterate.objectives.refusal import RefusalRate, served_responder
    from mtp_abliterate.search.config import Serving
    from mtp_abliterate.search.serving.server import VllmServer
    from mtp_abliterate.search.trial.swap_check import Measured, swap_verdict

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    org = ckpts / "org"
    prompts = {
        s: [
            Prompt(SYSTEM, line.strip())
            for line in (REPO / f"organism/prompts/{s}_eval.txt").read_text().splitlines()
            if line.strip()
        ]
        for s in ("harmless", "harmful")
    }
    t_start = time.time()
    deadline = t_start + args.budget_s

    def serving(mode: str, tag: str) -> Serving:
        vargs = [
            "--max-model-len",
            "512",
            "--dtype",
            "bfloat16",
            "--gpu-memory-utilization",
            str(args.util),
            "--max-num-seqs",
            "64",
            # a fixed KV cache: no memory profiling, which other servers starting beside it would disturb
            "--kv-cache-memory-bytes",
            str(512 * 2**20),
            *GPU_ARGS,
        ] + (["--enforce-eager"] if mode == "eager" else [])
        if tag == "rel":  # the GPU config's: no image/audio/video inputs (no multimodal profiling run)
            vargs += ["--limit-mm-per-prompt", '{"image":0,"audio":0,"video":0}']
        env = {**GPU_ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "VLLM_CACHE_ROOT": f"/tmp/vc-{tag}"}
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "4"  # up to 8 servers compile at once on 16 cores
        python = sys.executable
        if cpu_test:
            vargs = ["--max-model-len", "512", "--dtype", "bfloat16", "--block-size", "32", "--enforce-eager"]
            env = {
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "HF_HUB_OFFLINE": "1",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_WORKER_MULTIPROC_METHOD": "fork",
            }
            python = str(REPO / ".venv-vllm/bin/python")
        return Serving(
            launcher="python",
            python=python,
            vllm_args=vargs,
            env=env,
            startup_timeout_s=600,
            num_speculative_tokens=4,
            multimodal="as_is",
        )

    def measure(server) -> tuple[Measured, dict]:
        t0 = time.perf_counter()
        refusal = RefusalRate(
            served_responder(server.base_url, server.served_name, 100, 32), prompts["harmful"]
        ).compute()
        t1 = time.perf_counter()
        acc = AcceptanceSets(
            server.base_url,
            server.served_name,
            [("harmless", prompts["harmless"], 0.5), ("harmful", prompts["harmful"], 0.5)],
            4,
            100,
            0.0,
            (0,),
            32,
            keep_replies=("harmless", "harmful"),
        )
        result = acc.compute()
        t2 = time.perf_counter()
        replies = [r for name in ("harmless", "harmful") for r in acc.replies[name]]
        extra = {
            "refusal_s": round(t1 - t0, 2),
            "acceptance_s": round(t2 - t1, 2),
            "refusal_rate": refusal.value,
            "mean_accepted_tokens": result.value,
            "tok_s": round(result.details["output_tokens"] / max(t2 - t1, 1e-9), 1),
            "texts": [r.text for r in replies],
            "hists": [r.spec_histogram for r in replies],
            "steps": [getattr(r, "spec_steps", None) for r in replies],
            "per_position": {n: s["per_position"] for n, s in result.details["sets"].items()},
        }
        return Measured(refusal, result), extra

    cells = {  # name: (base, candidate, draft, mode, kind)
        "bf16e-eager": ("body-bf16e", "cand-bf16e", "eager"),
        "bf16e-compiled": ("body-bf16e", "cand-bf16e", "compiled"),
        "fp8e-eager": ("body-fp8e", "cand-fp8e", "eager"),
        "fp8e-compiled": ("body-fp8e", "cand-fp8e", "compiled"),
    }
    draft = str(REPO / "organism/draft")
    results: dict = {"versions": versions(), "cells": {}, "jobs": {}, "snapshot": snapshot(ckpts)}
    cpu_test = os.environ.get("BENCH_CPU_TEST") == "1"  # a dry run of this harness on vllm-cpu (one cell)
    lock = threading.Lock()

    def job(
        name: str, model: Path, mode: str, tag: str, swap_to: Path | None = None, keep: bool = False, drft: str = draft
    ) -> None:
        rec: dict = {
            "model": model.name,
            "mode": mode,
            "swap_to": swap_to.name if swap_to else None,
            "keep_kernels": keep,
        }
        log = logs / f"{name}.log"
        server = VllmServer(serving(mode, tag), str(model), drft, log, swappable=swap_to is not None)
        try:
            if time.time() > deadline:
                rec["skipped"] = "budget"
                return
            t0 = time.perf_counter()
            server.start()
            rec["start_s"] = round(time.perf_counter() - t0, 1)
            m, x = measure(server)
            rec["first"] = x
            rec["first_fp"] = m.fingerprint()
            rec["_measured"] = m
            if swap_to is not None:
                if keep:
                    import httpx

                    r = httpx.post(f"{server.base_url}/collective_rpc", json={"method": "prepare_reload"}, timeout=60)
                    rec["prepare_reload"] = r.json() if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
                rec["swap_s"] = round(server.swap(swap_to), 3)
                try:
                    m2, x2 = measure(server)
                    rec["swapped"] = x2
                    rec["_swapped"] = m2
                except Exception as e:  # noqa: BLE001
                    rec["swapped_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    time.sleep(2)
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            rec["trace"] = traceback.format_exc()[-1500:]
        finally:
            rec["alive_at_end"] = server.alive()
            server.stop()
            rec["log"] = log_facts(log)
            with lock:
                results["jobs"][name] = rec
                (out / "organism.partial.json").write_text(json.dumps(results["jobs"], indent=1, default=str))

    if cpu_test:
        cells = {"bf16e-eager": cells["bf16e-eager"]}
    jobs = []
    for cell, (base, cand, mode) in cells.items():
        tag = cell
        jobs.append((f"{cell}-swap", org / base, mode, tag, org / cand, False))
        if cell == "fp8e-compiled":
            jobs.append((f"{cell}-swap-kept", org / base, mode, tag + "-k", org / cand, True))
        jobs.append((f"{cell}-cold", org / cand, mode, tag, None, False))
        jobs.append((f"{cell}-cold2", org / cand, mode, tag, None, False))
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = []
        for i, j in enumerate(jobs):
            futures.append(pool.submit(job, *j))
            if i < args.parallel:
                time.sleep(1)  # stagger the first wave's start-ups
        if not cpu_test:  # the release organism, served as it is (a GPU vLLM has torchvision)
            futures.append(
                pool.submit(
                    job,
                    "release-bf16-eager",
                    REPO / "organism-release/body",
                    "eager",
                    "rel",
                    None,
                    False,
                    str(REPO / "organism-release/draft"),
                )
            )
            futures.append(
                pool.submit(
                    job,
                    "release-fp8e-eager",
                    org / "release-fp8e",
                    "eager",
                    "rel",
                    None,
                    False,
                    str(REPO / "organism-release/draft"),
                )
            )
        for f in futures:
            f.result()

    def diff(a: dict, b: dict, key: str) -> int | None:
        if not a or not b:
            return None
        return sum(x != y for x, y in zip(a[key], b[key], strict=True))

    for cell in cells:
        cold, cold2 = results["jobs"].get(f"{cell}-cold", {}), results["jobs"].get(f"{cell}-cold2", {})
        for variant in ("swap", "swap-kept"):
            sw = results["jobs"].get(f"{cell}-{variant}")
            if sw is None:
                continue
            c: dict = {}
            sx, cx, c2x = sw.get("swapped"), cold.get("first"), cold2.get("first")
            c["swap_vs_cold_text_differ"] = diff(sx, cx, "texts")
            c["swap_vs_cold_hist_differ"] = diff(sx, cx, "hists")
            c["cold_vs_cold_text_differ"] = diff(cx, c2x, "texts")
            c["cold_vs_cold_hist_differ"] = diff(cx, c2x, "hists")
            c["swap_vs_cold_steps_differ"] = diff(sx, cx, "steps")
            c["cold_vs_cold_steps_differ"] = diff(cx, c2x, "steps")
            c["base_vs_cand_text_differ"] = diff(sw.get("first"), cx, "texts")
            c["n_answers"] = len(cx["texts"]) if cx else None
            try:
                if "_swapped" in sw and "_measured" in cold:
                    v = swap_verdict(sw["_swapped"], cold["_measured"], cold2.get("_measured"))
                    c["verdict"] = v
            except Exception as e:  # noqa: BLE001
                c["verdict_error"] = f"{type(e).__name__}: {e}"
            if "swapped_error" in sw or "error" in sw:
                c["verdict"] = {
                    "passed": False,
                    "rule": "the swapped server failed: " + str(sw.get("swapped_error") or sw.get("error"))[:200],
                }
            results["cells"][f"{cell}" + ("" if variant == "swap" else "-kept")] = c
    for rec in results["jobs"].values():
        for k in [k for k in rec if k.startswith("_")]:
            del rec[k]
        for k in ("first", "swapped"):
            if isinstance(rec.get(k), dict):
                rec[k]["texts_sample"] = rec[k]["texts"][:2]
                rec[k]["hists_sample"] = rec[k]["hists"][:2]
                del rec[k]["texts"], rec[k]["hists"], rec[k]["steps"]
    results["wall_s"] = round(time.time() - t_start, 1)
    (out / "organism.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results["cells"], indent=1, default=str))
    for n, r in results["jobs"].items():
        print(
            n,
            {k: r.get(k) for k in ("start_s", "swap_s", "error", "swapped_error", "skipped")},
            (r.get("first") or {}).get("tok_s"),
            r.get("log", {}).get("moe_backend"),
        )


# --------------------------------------------------------------------------------------------- shapes (GPU)
def write_shapes(ckpts: Path, root: Path, layers: int, device: str = "cuda") -> dict:
    """The FP8 base (fast-path layout), a candidate (edited files re-drawn + links) and its edited files alone, and
    the BF16 draft, all random, generated on the GPU."""
    import torch
    from safetensors.torch import save_file

    from mtp_abliterate.search.candidate.quantize import quantize_rows

    src = ckpts / "shapes"
    manifest = json.loads((src / "manifest.json").read_text())
    keep = lambda k: (m := re.search(r"\.layers\.(\d+)\.", k)) is None or "vision" in k or int(m[1]) < layers  # noqa
    manifest = {k: v for k, v in manifest.items() if keep(k)}
    editable = {
        k
        for k in manifest
        if re.search(
            r"language_model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)"
            r"\.weight$",
            k,
        )
    }
    base, cand, part = root / "base", root / "cand", root / "cand-edited-only"
    for d in (base, cand, part):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    gen = torch.Generator(device=device).manual_seed(0)
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}

    def make(k: str) -> dict:
        shape, dtype, fp8 = manifest[k]
        if fp8:
            w = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
            q, s = quantize_rows(w)
            return {k: q.cpu(), k + "_scale": s.cpu()}
        t = torch.empty(shape, device=device, dtype=dt.get(dtype, torch.bfloat16))
        t.fill_(1.0) if len(shape) <= 1 else t.normal_(0, 0.02, generator=gen)
        return {k: t.cpu()}

    t0 = time.perf_counter()
    weight_map, shard, size, n_shard, total = {}, {}, 0, 0, 0

    def flush() -> None:
        nonlocal shard, size, n_shard
        if shard:
            n_shard += 1
            f = f"base-{n_shard:05d}.safetensors"
            save_file(shard, base / f, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, f))
            shard, size = {}, 0

    for k in manifest:
        part_t = make(k)
        nbytes = sum(t.numel() * t.element_size() for t in part_t.values())
        total += nbytes
        if k in editable:
            f = f"edit-{k.removesuffix('.weight')}.safetensors"
            save_file(part_t, base / f, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part_t, f))
            continue
        shard.update(part_t)
        size += nbytes
        if size > 5e9:
            flush()
    flush()
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = json.loads((src / "config.json").read_text())
    tc = config["text_config"]
    tc["num_hidden_layers"] = layers
    tc["layer_types"] = tc["layer_types"][: layers - 1] + ["full_attention"]  # layers = 6k: the real pattern
    tc["per_layer_config"] = {k: v for k, v in tc.get("per_layer_config", {}).items() if int(k) < layers}
    config["text_config"] = tc
    (base / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.name not in ("manifest.json", "config.json"):
            shutil.copy2(f, base / f.name)
    write_s = time.perf_counter() - t0
    # candidate: a study trial edits layers [start, end): o_proj and down_proj of the middle half, re-drawn
    edited = sorted(k for k in editable if layers // 4 <= int(re.search(r"\.layers\.(\d+)\.", k)[1]) < 3 * layers // 4)
    edited_bytes = 0
    for k in edited:
        f = f"edit-{k.removesuffix('.weight')}.safetensors"
        t = make(k)
        edited_bytes += sum(x.numel() * x.element_size() for x in t.values())
        save_file(t, cand / f, metadata={"format": "pt"})
        shutil.copy2(cand / f, part / f)
    for f in base.iterdir():
        if not (cand / f.name).exists():
            (cand / f.name).symlink_to(os.path.relpath(f, cand))
    shutil.copy2(base / "config.json", part / "config.json")
    # draft, BF16, at the released assistant's config
    draft = root / "draft"
    shutil.rmtree(draft, ignore_errors=True)
    draft.mkdir()
    dman = json.loads((src / "draft" / "manifest.json").read_text())
    dt_ = {}
    for k, shape in dman.items():
        t = torch.empty(shape, device=device, dtype=torch.bfloat16)
        t.fill_(1.0) if len(shape) <= 1 else t.normal_(0, 0.02, generator=gen)
        dt_[k] = t.cpu()
    save_file(dt_, draft / "model.safetensors", metadata={"format": "pt"})
    for f in (src / "draft").iterdir():
        if f.name != "manifest.json":
            shutil.copy2(f, draft / f.name)
    return {
        "layers": layers,
        "base_gb": round(total / 1e9, 2),
        "base_files": len(set(weight_map.values())),
        "edited_files": len(edited),
        "edited_gb": round(edited_bytes / 1e9, 3),
        "write_s": round(write_s, 1),
        "draft_params_m": round(sum(torch.Size(s).numel() for s in dman.values()) / 1e6, 1),
    }


def shapes(args: argparse.Namespace) -> None:
    ckpts = Path(args.ckpts).resolve()
    product_on_path(ckpts)
    import httpx
    import torch

    from mtp_abliterate.search.config import Serving
    from mtp_abliterate.search.serving.server import VllmServer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    root = Path(args.root)
    results: dict = {"versions": versions(), "servers": {}, "snapshot": snapshot(ckpts)}
    if (root / "base" / "config.json").exists() and (root / "meta.json").exists():
        results["checkpoint"] = json.loads((root / "meta.json").read_text()) | {"reused": True}
    else:
        results["checkpoint"] = write_shapes(ckpts, root, args.layers)
        (root / "meta.json").write_text(json.dumps(results["checkpoint"]))
    torch.cuda.empty_cache()
    print("checkpoint", results["checkpoint"], flush=True)
    total = torch.cuda.mem_get_info()[1]
    util = round(min(0.9, SPARK_BYTES / total), 3) if args.util is None else args.util
    results["gpu_memory_utilization"] = util
    results["gpu_total_gib"] = round(total / 2**30, 1)
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)

    def gen(url: str, n: int, max_tokens: int) -> dict:
        body = {
            "model": "candidate",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }

        def one(_):
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
            r.raise_for_status()
            j = r.json()
            return j["usage"]["completion_tokens"], j["choices"][0].get("token_ids")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            rs = list(pool.map(one, range(n)))
        dt = time.perf_counter() - t0
        return {
            "n": n,
            "tokens": sum(r[0] for r in rs),
            "s": round(dt, 2),
            "tok_s": round(sum(r[0] for r in rs) / dt, 1),
            "ids": rs[0][1],
        }

    def rpc(url: str, route: str, body: dict | None = None, params: dict | None = None) -> float:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}{route}", json=body, params=params, timeout=900)
        if r.status_code != 200:
            raise RuntimeError(f"{route}: {r.status_code} {r.text[:300]}")
        return time.perf_counter() - t0

    def reload(url: str, path: Path, keep: bool) -> dict:
        t = {"pause": rpc(url, "/pause", params={"mode": "wait"})}
        if keep:
            t["prepare_reload"] = rpc(url, "/collective_rpc", {"method": "prepare_reload"})
        t["reload_weights"] = rpc(
            url, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(path)}}
        )
        t["repair_after_reload"] = rpc(url, "/collective_rpc", {"method": "repair_after_reload"})
        t["reset_prefix_cache"] = rpc(url, "/reset_prefix_cache")
        t["resume"] = rpc(url, "/resume")
        t["total"] = sum(t.values())
        return {k: round(v, 3) for k, v in t.items()}

    plans = [p for p in args.servers.split(",") if p]
    for spec in plans:  # e.g. eager-n4-swap, compiled-n4, compiled-n0
        mode, n, *rest = spec.split("-")
        n_spec = int(n[1:])
        swap, keep = "swap" in rest, "kept" in rest
        remaining = args.budget_s - (time.time() - t_start)
        if remaining < (150 if mode == "eager" else 330):
            results["servers"][spec] = {"skipped": f"{remaining:.0f} s of the budget left"}
            continue
        vargs = [
            "--max-model-len",
            "8192",
            "--gpu-memory-utilization",
            str(util),
            "--max-num-seqs",
            "32",
            "--limit-mm-per-prompt",
            '{"image":0,"audio":0,"video":0}',
            *GPU_ARGS,
        ]
        if args.fp8_kv:
            vargs += ["--kv-cache-dtype", "fp8"]
        if mode == "eager":
            vargs.append("--enforce-eager")
        serving = Serving(
            launcher="python",
            python=sys.executable,
            vllm_args=vargs,
            startup_timeout_s=900,
            env={**GPU_ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "VLLM_CACHE_ROOT": "/tmp/vc-shapes"},
            num_speculative_tokens=max(n_spec, 1),
            multimodal="as_is",
        )
        log = out / f"shapes-{spec}.log"
        server = VllmServer(serving, str(root / "base"), str(root / "draft") if n_spec else None, log, swappable=swap)
        rec: dict = {"mode": mode, "num_speculative_tokens": n_spec, "keep_kernels": keep}
        try:
            with GpuMemory() as mem:
                t0 = time.perf_counter()
                server.start()
                rec["start_s"] = round(time.perf_counter() - t0, 1)
                rec["peak_after_start_mib"] = mem.peak_mib
                gen(server.base_url, 1, 16)  # warm-up
                rec["single"] = gen(server.base_url, 1, 256)
                rec["in_flight_8"] = gen(server.base_url, 8, 256)
                base_ids = rec["single"].pop("ids")
                rec["in_flight_8"].pop("ids")
                if swap:
                    rec["full_reload_cand"] = reload(server.base_url, root / "cand", keep)
                    full_ids = gen(server.base_url, 1, 64)["ids"]
                    rec["full_reload_base"] = reload(server.base_url, root / "base", keep)
                    back_ids = gen(server.base_url, 1, 64)["ids"]
                    rec["partial_reload_cand"] = reload(server.base_url, root / "cand-edited-only", keep)
                    part_ids = gen(server.base_url, 1, 64)["ids"]
                    rec["single_after_swaps"] = gen(server.base_url, 1, 256)
                    rec["single_after_swaps"].pop("ids")
                    rec["base_back_equals_base"] = back_ids == base_ids[:64]
                    rec["cand_differs_from_base"] = full_ids != base_ids[:64]
                    rec["partial_equals_full"] = part_ids == full_ids
                rec["peak_mib"] = mem.peak_mib
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        finally:
            server.stop()
            rec["log"] = log_facts(log)
            results["servers"][spec] = rec
            print(spec, json.dumps(rec, default=str)[:1500], flush=True)
            (out / "shapes.partial.json").write_text(json.dumps(results, indent=1, default=str))
    results["wall_s"] = round(time.time() - t_start, 1)
    (out / "shapes.json").write_text(json.dumps(results, indent=1, default=str))


# ---------------------------------------------------------------------------------------------- study (GPU)
STUDY_CLI = "import sys; from mtp_abliterate.search.cli import app; sys.argv[0] = 'mtp-abliterate'; app()"
PATH_KEYS = {"model": ("target", "draft")}  # configs/organism.toml's paths besides runs_dir and prompt sources
STAGE_METRICS = ("refusal_rate", "kld", "accepted_per_step", "vllm_mean_accepted_tokens", "aggregate_tok_s")


def gpu_study_config(args: argparse.Namespace, toml_out: Path, runs: Path) -> str:
    """configs/organism.toml (merged with what it extends) with the GPU machine's serving settings and FP8 experts,
    paths made absolute; written whole to `toml_out`, not as a file extending it: `extends` merges tables key by key,
    and the CPU serving.env (one-process engine, forked worker) must not reach a GPU server. Returns the overrides as
    TOML text (the results keep them)."""
    import tomli_w

    from mtp_abliterate.search.config_merge import load_merged

    src = REPO / "configs" / "organism.toml"
    raw = load_merged(src).raw
    here = lambda value: str((src.parent / value).resolve())  # noqa: E731
    for section, keys in PATH_KEYS.items():
        for key in keys:
            raw[section][key] = here(raw[section][key])
    for spec in [*raw["prompts"].values(), *(s["prompts"] for s in raw["acceptance"]["sets"])]:
        spec["source"] = here(spec["source"])
    for spec in raw.get("draft_tune", {}).get("prompts", []):
        spec["source"] = here(spec["source"])
    vllm_args = [
        *("--max-model-len", "512", "--dtype", "bfloat16", "--max-num-seqs", "64"),
        # each server asks for 0.1 of the GPU and takes a fixed KV cache (no profiling run beside the other server)
        *("--gpu-memory-utilization", "0.1", "--kv-cache-memory-bytes", str(512 * 2**20)),
        *GPU_ARGS,
    ] + (["--enforce-eager"] if args.eager else [])
    overrides = {
        "name": "organism-gpu",
        "runs_dir": str(runs),
        "search": {"n_trials": args.trials},
        "quantization": {"ignore": GPU_IGNORE},
        "serving": {
            "python": sys.executable,
            "vllm_args": vllm_args,
            # the payload is the server's only extra path (the study's own compressed-tensors is newer than
            # vLLM 0.32's); one compile cache for the study server and the self-check's cold server
            "env": {**GPU_ENV, "PYTHONPATH": args.payload, "VLLM_CACHE_ROOT": str(runs / "vllm-cache")},
            "startup_timeout_s": 600,
            "mode": "auto",
            "self_check_beside": True,
        },
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    toml_out.write_text(tomli_w.dumps(raw))
    return tomli_w.dumps(overrides)


def run_cli(words: list[str], log: Path, budget_s: float, env: dict[str, str]) -> dict:
    """`mtp-abliterate WORDS` (the console script's own entry point), output appended to `log`; killed after
    `budget_s`."""
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ mtp-abliterate {' '.join(words)}\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, "-c", STUDY_CLI, *words], stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"rc": proc.returncode, "s": round(time.perf_counter() - t0, 1)}


def detached_study_run(words: list[str], runs: Path, env: dict[str, str], budget_s: float) -> dict:
    """`mtp-abliterate study run ...` in its own session, so it outlives this call (a call has 10 minutes; the
    machine stays held between calls): started unless it runs or ran already, then waited for up to `budget_s`.
    Its output goes to runs/study-run.log, its start time to .started and its exit status to .rc."""
    log, started, rc = (runs / f"study-run.{ext}" for ext in ("log", "started", "rc"))
    if not started.exists():
        started.write_text(str(time.time()))
        with log.open("a") as f:
            f.write(f"$ mtp-abliterate {' '.join(words)}\n")
        command = shlex.join([sys.executable, "-c", STUDY_CLI, *words])
        subprocess.Popen(
            ["sh", "-c", f"{command} >> {shlex.quote(str(log))} 2>&1; echo $? > {shlex.quote(str(rc))}"],
            env=env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.time() + budget_s
    while not rc.exists() and time.time() < deadline:
        time.sleep(2)
    t0 = float(started.read_text())
    if not rc.exists():
        return {"running": True, "s_so_far": round(time.time() - t0, 1)}
    return {"rc": int(rc.read_text()), "s": round(rc.stat().st_mtime - t0, 1)}


def study(args: argparse.Namespace) -> None:
    """The product's own `study run` on the organism, its vLLM on this GPU; then what the study recorded."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs).resolve() / ("probe" if args.probe else "")  # the probe's folder is never resumed
    if args.probe:
        shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    shim = link_product(runs / "shim")
    sys.path.insert(0, str(shim))
    toml = runs / "organism-gpu.toml"
    overrides = gpu_study_config(args, toml, runs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    env["PYTHONUNBUFFERED"] = "1"
    log = out / "study.log"
    calls = {}
    if args.probe:  # before the payload is here: the model stack, ARA on the GPU and the stores; no server
        calls["dry_run"] = run_cli(["study", "run", str(toml), "--dry-run"], log, 120, env)
        words = ["abliterate", str(toml), "--params", json.dumps(ARA), "--out", str(runs / "candidate")]
        calls["abliterate"] = run_cli(words, log, 300, env)
        calls["until_serving"] = run_cli(["study", "run", str(toml)], log, 300, env)  # fails at the first server
    else:
        words = ["study", "run", str(toml), "--n-trials", str(args.trials)]
        if args.restart:  # `study run` again after an earlier one ended: it resumes the study
            for ext in ("started", "rc"):
                (runs / f"study-run.{ext}").unlink(missing_ok=True)
        calls["study_run"] = detached_study_run(words, runs, env, args.budget_s)
        shutil.copy2(runs / "study-run.log", log)
        if "rc" in calls["study_run"]:
            calls["study_status"] = run_cli(["study", "status", str(toml)], log, 120, env)
    result = {"overrides_toml": overrides, "calls": calls, "versions": versions_of_study(args.payload, env)}
    if "study_status" in calls:
        result |= study_records(toml, runs / "organism-gpu", env)
    (out / ("study-probe.json" if args.probe else "study.json")).write_text(json.dumps(result, indent=1, default=str))
    print(log.read_text()[-6000:])
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}, indent=1, default=str)[:5000])


def versions_of_study(payload: str, env: dict[str, str]) -> dict:
    """The study process's software (the product's own record) and the server's vLLM."""
    probe = "import json; from mtp_abliterate.search.versions import software_versions as v; print(json.dumps(v()))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    v = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}
    vllm = subprocess.run(
        [sys.executable, "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": payload},
    )
    return v | {"vllm": vllm.stdout.strip() or vllm.stderr[-200:], "gpu": gpu_name()}


def study_records(toml: Path, run_dir: Path, env: dict[str, str]) -> dict:
    """What the study recorded (read in a python that has Optuna), and the facts of its servers' logs."""
    reader = f"""
import json
from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.storage import load_existing_study
study = load_existing_study(load_config({str(toml)!r}))
keep = lambda m: {{k: v for k, v in m.items() if k.startswith("stage_") or k in {STAGE_METRICS + ("trial_s",)!r}}}
trials = [dict(number=r.number, state=r.state.name, params=r.params, values=r.values, serving=r.serving_mode,
               metrics=keep(r.metrics), fail=r.fail_reason, failed_stage=r.failed_stage, retry_of=r.retry_of,
               not_measured=r.not_measured, invalid=r.invalid_reason) for r in records.records(study)]
print(json.dumps(dict(vanilla=keep(records.vanilla(study) or {{}}), swap_checks=records.swap_checks(study),
                      trials=trials), default=str))
"""
    done = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, env=env)
    rec = json.loads(done.stdout) if done.returncode == 0 else {"records_error": done.stderr[-1500:]}
    logs = {str(p.relative_to(run_dir)): log_facts(p) for p in sorted(run_dir.rglob("*server*.log"))}
    return rec | {"server_logs": logs}


# -------------------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace) -> None:
    parts = []
    for p in args.files:  # one benchmark's JSON, or a results file holding both ({"meta", "organism", "shapes"})
        r = json.loads(Path(p).read_text())
        parts += [r[k] for k in ("organism", "study", "shapes") if k in r] if "meta" in r else [r]
    lines = []
    for r in parts:
        v = r.get("versions", {})
        lines.append(
            f"GPU: {v.get('gpu')}; vLLM {v.get('vllm')}; torch {v.get('torch')}; "
            f"transformers {v.get('transformers')}; commit {args.commit}\n"
        )
        if "cells" in r:
            lines += [
                "| job | start s | swap s | refusal s | acceptance s | tok/s | mean acc. tokens | error |",
                "|---|---:|---:|---:|---:|---:|---:|---|",
            ]
            for n, j in r["jobs"].items():
                f = j.get("swapped") or j.get("first") or {}
                err = j.get("swapped_error") or j.get("error") or ""
                lines.append(
                    f"| {n} | {j.get('start_s', '')} | {j.get('swap_s', '')} | {f.get('refusal_s', '')} | "
                    f"{f.get('acceptance_s', '')} | {f.get('tok_s', '')} | "
                    f"{round(f['mean_accepted_tokens'], 3) if 'mean_accepted_tokens' in f else ''} | "
                    f"{err[:80]} |"
                )
            lines += [
                "",
                "| cell | swap vs cold: texts / histograms differ | cold vs cold: texts / histograms | verdict |",
                "|---|---|---|---|",
            ]
            for n, c in r["cells"].items():
                v = c.get("verdict", {})
                lines.append(
                    f"| {n} | {c.get('swap_vs_cold_text_differ')} / {c.get('swap_vs_cold_hist_differ')} of "
                    f"{c.get('n_answers')} | {c.get('cold_vs_cold_text_differ')} / "
                    f"{c.get('cold_vs_cold_hist_differ')} | "
                    f"{'PASS' if v.get('passed') else 'FAIL'}: {str(v.get('rule', c.get('verdict_error')))[:160]} |"
                )
            lines.append("")
        if "swap_checks" in r:
            lines += study_lines(r)
        if "servers" in r:
            ck = r["checkpoint"]
            lines.append(
                f"Checkpoint: {ck}; --gpu-memory-utilization {r['gpu_memory_utilization']} of "
                f"{r['gpu_total_gib']} GiB\n"
            )
            lines += [
                "| server | start s | single tok/s | 8 in flight tok/s | full reload s | partial reload s | "
                "peak GPU MiB | KV tokens |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for n, s in r["servers"].items():
                lines.append(
                    f"| {n} | {s.get('start_s', s.get('skipped', s.get('error', ''))[:60])} | "
                    f"{(s.get('single') or {}).get('tok_s', '')} | "
                    f"{(s.get('in_flight_8') or {}).get('tok_s', '')} | "
                    f"{(s.get('full_reload_cand') or {}).get('total', '')} | "
                    f"{(s.get('partial_reload_cand') or {}).get('total', '')} | {s.get('peak_mib', '')} | "
                    f"{s.get('log', {}).get('kv_cache_tokens', '')} |"
                )
            lines.append("")
    text = "\n".join(line.replace("\n", " ") if line.startswith("|") else line for line in lines)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")


def study_lines(r: dict) -> list[str]:
    """The study's vanilla measurement and trials (how each was served, its stage times) and its swap verdicts."""
    stages = ("abliterate", "kld", "quantize", "serve", "refusals", "acceptance", "swap_check")
    lines = [
        "| run | served by | refusal | KL | acc./step | vLLM mean acc. | tok/s | "
        + " | ".join(f"{s} s" for s in stages)
        + " | total s |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * (len(stages) + 1),
    ]
    runs = [("vanilla", "the study server's cold start", r["vanilla"])]
    runs += [(f"trial {t['number']} ({t['params'].get('method')})", t["serving"], t["metrics"]) for t in r["trials"]]
    for name, served, m in runs:
        cells = [m.get(k) for k in ("refusal_rate", "kld", "accepted_per_step", "vllm_mean_accepted_tokens")]
        times = [m.get(f"stage_{s}_s") for s in stages] + [m.get("trial_s")]
        lines.append(
            f"| {name} | {served} | "
            + " | ".join("" if v is None else f"{v:.4g}" for v in cells)
            + f" | {m.get('aggregate_tok_s', 0):.0f} | "
            + " | ".join("" if v is None else f"{v:.3g}" for v in times)
            + " |"
        )
    lines.append("")
    for host, v in r["swap_checks"].items():
        lines.append(
            f"Swap self-check ({host}, trial {v['trial']}): {'passed' if v['passed'] else 'FAILED'}, {v['rule']}"
            + (
                f"; differences {v['differences']}, gap {v.get('gap')}, noise {v.get('noise')}"
                if v["differences"]
                else ""
            )
        )
    lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep")
    p.add_argument("--out", default=".gpu")
    p = sub.add_parser("organism")
    p.add_argument("--ckpts", default=".gpu")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--util", type=float, default=0.05)
    p.add_argument("--parallel", type=int, default=15)
    p.add_argument("--budget-s", type=float, default=480)
    p = sub.add_parser("shapes")
    p.add_argument("--ckpts", default=".gpu")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--root", default="/tmp/real")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--util", type=float, default=None)
    p.add_argument("--fp8-kv", action="store_true")
    p.add_argument("--servers", default="eager-n4-swap,compiled-n4,compiled-n0")
    p.add_argument("--budget-s", type=float, default=540)
    p = sub.add_parser("study")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--runs", default="/root/gpu-runs", help="the study's folder; a later call resumes it")
    p.add_argument("--payload", default="/root/vllm", help="the unpacked vLLM payload (the server's PYTHONPATH)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="--enforce-eager servers (default: CUDA graphs)")
    p.add_argument("--budget-s", type=float, default=540, help="wait this long; the next call waits on")
    p.add_argument("--probe", action="store_true", help="no vLLM yet: dry run, ARA on the GPU, the stores")
    p.add_argument("--restart", action="store_true", help="run `study run` again once an earlier one ended")
    p = sub.add_parser("report")
    p.add_argument("files", nargs="+")
    p.add_argument("--md")
    p.add_argument("--commit", default="")
    args = ap.parse_args()
    {"prep": prep, "organism": organism, "shapes": shapes, "study": study, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
