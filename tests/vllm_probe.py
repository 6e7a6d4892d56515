"""Run inside the vLLM environment (not the tool's): greedy chats through vLLM with the MTP draft.

usage: python vllm_probe.py BODY DRAFT N_SPEC PROMPTS_JSON OUT_JSON; writes to OUT_JSON
{"texts": [...], "num_drafts": int, "accepted_per_pos": [...]} (vLLM logs to stdout, so not there).
"""

import json
import sys
from pathlib import Path

from vllm import LLM, SamplingParams


def main() -> None:
    body, draft, n_spec, prompts_json, out = sys.argv[1:6]
    chats = json.loads(prompts_json)
    llm = LLM(
        model=body,
        speculative_config={"method": "mtp", "model": draft, "num_speculative_tokens": int(n_spec)},
        dtype="bfloat16",
        max_model_len=512,
        block_size=32,
        enforce_eager=True,
        disable_log_stats=False,
        seed=0,
    )
    outs = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=64))
    metrics = {m.name: m for m in llm.get_metrics()}
    result = {
        "texts": [o.outputs[0].text for o in outs],
        "num_drafts": metrics["vllm:spec_decode_num_drafts"].value,
        "accepted_per_pos": list(metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values),
    }
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
