"""One chat completion from a vLLM server, shared by the served objectives (chat template applied by the server)."""

from __future__ import annotations

import httpx
from heretic.utils import Prompt


def chat(
    client: httpx.Client,
    base_url: str,
    model: str,
    prompt: Prompt,
    max_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
) -> tuple[str, int]:
    """(answer text, completion tokens) for `prompt`'s system and user turns."""
    messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [
        {"role": "user", "content": prompt.user}
    ]
    payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    if seed is not None:
        payload["seed"] = seed
    reply = client.post(f"{base_url}/v1/chat/completions", json=payload)
    reply.raise_for_status()
    body = reply.json()
    return body["choices"][0]["message"]["content"] or "", body["usage"]["completion_tokens"]
