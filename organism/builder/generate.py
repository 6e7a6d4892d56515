"""Chat encoding and batched greedy generation with plain forward passes (left padding, explicit positions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Gemma4ForCausalLM, PreTrainedTokenizerBase


def chat_messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system_prompt: str | None) -> list[int]:
    text = tokenizer.apply_chat_template(
        chat_messages(prompt, system_prompt), add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def stop_ids(model: Gemma4ForCausalLM) -> set[int]:
    eos = model.config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


@torch.no_grad()
def greedy_generate(
    model: Gemma4ForCausalLM,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    pad_id: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy responses (stop token included when reached). No KV cache: sequences are short and this keeps the
    computation identical to one full forward over prompt + response, which is what the draft is measured on."""
    stops = stop_ids(model)
    responses: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in chunk])[:, None]).long()
        out: list[list[int]] = [[] for _ in chunk]
        done = torch.zeros(len(chunk), dtype=torch.bool)
        for _ in range(max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t in stops
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        responses += out
    return responses
