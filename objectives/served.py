"""Shared by the served objectives: one chat completion (chat template applied by the server; with its own
spec-decode histogram and verify steps when the server reports per-request metrics), and a digest of answers that
lets two measurements be compared text for text."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import httpx
from heretic.utils import Prompt


class Reply(NamedTuple):
    text: str
    completion_tokens: int
    token_ids: list[int] | None  # the answer's tokens, when asked for and the server returns them
    prompt_token_ids: list[int] | None = None  # the tokens the server scored for the chat, likewise
    spec_histogram: list[int] | None = None  # verify steps by accepted draft tokens (a server with a draft and
    # --per-request-spec-decode-metrics); None when nothing was drafted
    spec_draft_tokens: int = 0
    spec_steps: list[int] | None = None  # accepted draft tokens of each verify step, in order (`detailed` metrics)


def chat(
    client: httpx.Client,
    base_url: str,
    model: str,
    prompt: Prompt,
    max_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    token_ids: bool = False,
) -> Reply:
    """The answer to `prompt`'s system and user turns (the system turn always sent, as heretic renders it)."""
    messages = [{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.user}]
    payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    if seed is not None:
        payload["seed"] = seed
    if token_ids:
        payload["return_token_ids"] = True  # a vLLM extension; older servers ignore it (token_ids stays None)
    reply = client.post(f"{base_url}/v1/chat/completions", json=payload)
    reply.raise_for_status()
    body = reply.json()
    choice = body["choices"][0]
    spec = (body.get("metrics") or {}).get("speculative_decoding") or {}
    return Reply(
        choice["message"]["content"] or "",
        body["usage"]["completion_tokens"],
        choice.get("token_ids"),
        body.get("prompt_token_ids"),
        spec.get("acceptance_histogram"),
        spec.get("num_draft_tokens", 0),
        spec.get("per_step_accepted"),
    )


REQUEST_TIMEOUT_S = 600.0  # serving.request_timeout_s's default: an answer not back by then, the server is hung


def answer_all(
    base_url: str,
    model: str,
    prompts: Sequence[Prompt],
    max_tokens: int,
    concurrency: int,
    timeout: float = REQUEST_TIMEOUT_S,
) -> list[Reply]:
    """Greedy answers to `prompts`, in order, `concurrency` in flight; httpx.TimeoutException when one is not back
    within `timeout` seconds (queued requests are cancelled: a hung server costs one timeout, not one per prompt)."""
    with httpx.Client(timeout=timeout) as client, ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(chat, client, base_url, model, p, max_tokens) for p in prompts]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 over texts in order: equal digests mean identical answers."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()
