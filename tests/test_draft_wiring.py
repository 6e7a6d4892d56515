"""The batched draft pass equals transformers' own Gemma4Assistant forward, query by query and step by step; the
chunked loss draft-tune trains with equals the whole-batch cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

from mtp_abliterate.organism.acceptance_sim import AcceptanceCounts, replay_rounds
from mtp_abliterate.organism.models import body_config, draft_config
from mtp_abliterate.organism.spec import OrganismSpec
from mtp_abliterate.search.draft.distill import chain_loss, chunked_cross_entropy
from mtp_abliterate.search.draft.wiring import Example, body_states, draft_chain, pad_batch

IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<turn|>": 5}
VOCAB = 97


@pytest.fixture(scope="module")
def random_pair() -> tuple[Gemma4ForCausalLM, Gemma4AssistantForCausalLM, OrganismSpec]:
    torch.manual_seed(0)
    spec = OrganismSpec()
    body = Gemma4ForCausalLM(body_config(spec, VOCAB, IDS)).eval()
    draft = Gemma4AssistantForCausalLM(draft_config(spec, VOCAB, IDS)).eval()
    return body, draft, spec


def _hf_chain(body, draft, ids, hidden, kv, p: int, steps: int) -> list[torch.Tensor]:
    """transformers' assistant, one query at position p over KV < p, chained on its own argmax and state."""
    kv_before = {k: (v[0][:, :, :p], v[1][:, :, :p]) for k, v in kv.items()}
    token, state, out = ids[:, p : p + 1], hidden[:, p - 1 : p], []
    for _ in range(steps):
        res = draft(
            inputs_embeds=torch.cat([body.get_input_embeddings()(token), state], dim=-1),
            shared_kv_states=kv_before,
            position_ids=torch.full((ids.shape[0], 1), p),
            attention_mask=torch.ones(ids.shape[0], p, dtype=torch.long),
        )
        out.append(res.logits[:, 0])
        token, state = res.logits.argmax(-1), res.last_hidden_state
    return out


@torch.no_grad()
def test_batched_chain_matches_transformers_assistant(random_pair) -> None:
    body, draft, spec = random_pair
    window = spec.body.sliding_window
    ids = torch.randint(7, VOCAB, (2, 3 * window))
    _, hidden, kv = body_states(body, ids, torch.ones_like(ids))
    ours = draft_chain(draft, body.get_input_embeddings(), ids, hidden, kv, 4, sliding_entries=window + 1)
    other_window = draft_chain(draft, body.get_input_embeddings(), ids, hidden, kv, 1, sliding_entries=window)
    for p in (1, 7, window, window + 2, 3 * window - 1):
        for j, ref in enumerate(_hf_chain(body, draft, ids, hidden, kv, p, 4)):
            torch.testing.assert_close(ours[j][:, p], ref, rtol=1e-4, atol=1e-4)
    # The window's edge matters once the history is longer than the window: HF covers window + 1 entries.
    p = 3 * window - 1
    assert not torch.allclose(other_window[0][:, p], _hf_chain(body, draft, ids, hidden, kv, p, 1)[0], atol=1e-4)


def test_body_states_are_the_models_own_logits(random_pair) -> None:
    body, _, _ = random_pair
    ids = torch.randint(7, VOCAB, (2, 20))
    logits, _, kv = body_states(body, ids, torch.ones_like(ids))
    with torch.no_grad():
        torch.testing.assert_close(logits, body(input_ids=ids).logits)
    assert set(kv) == {"sliding_attention", "full_attention"}


def test_the_chunked_loss_is_the_whole_batch_cross_entropy(random_pair) -> None:
    """A chunk of rows at a time, each chunk's logits recomputed in the backward pass: the same mean and gradients as
    the cross-entropy over all rows at once (37 rows in chunks of 5, the last one short)."""
    _, draft, _ = random_pair
    torch.manual_seed(1)
    rows = torch.randn(37, draft.lm_head.in_features)
    target = torch.randint(0, VOCAB, (37,))
    results = []
    for loss_of in (
        lambda x: F.cross_entropy(draft.lm_head(x), target),
        lambda x: chunked_cross_entropy(draft.lm_head, x, target, 5),
    ):
        x = rows.clone().requires_grad_(True)
        draft.zero_grad(set_to_none=True)
        loss = loss_of(x)
        loss.backward()
        results.append((loss.detach(), x.grad, draft.lm_head.weight.grad.clone()))
    for whole, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, whole)


def test_the_answer_rows_loss_equals_the_full_logits_loss(random_pair) -> None:
    """draft-tune's loss (the draft's states at answer positions, chunked) equals the loss over [B, T, V] logits."""
    body, draft, spec = random_pair
    torch.manual_seed(2)
    ids = torch.randint(7, VOCAB, (2, 30))
    attn, resp = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 12:] = True
    window = spec.body.sliding_window
    losses = [
        chain_loss(draft, body, ids, attn, resp, 4, 0, window, -1, answer_logits_only=only) for only in (False, True)
    ]
    torch.testing.assert_close(losses[1], losses[0])


def test_the_tail_past_the_answer_is_a_target_and_never_a_query(random_pair) -> None:
    """An example's tail (the body's tokens after its stop token, which vLLM scores the last round's proposals
    against) is a target of the answer's queries and not a query itself: draft-tune's loss equals the cross-entropy,
    written out here, over every (answer position p, step j) whose target p+1+j lies in the answer or the tail."""
    body, draft, spec = random_pair
    torch.manual_seed(3)
    tokens = torch.randint(7, VOCAB, (30,)).tolist()
    batch = [Example(tokens[:27], 12, tuple(tokens[27:])), Example(tokens[:20], 9)]
    ids, attn, resp = pad_batch(batch, 0)
    assert (
        ids[0].tolist() == tokens and attn[0].sum() == 30 and resp[0].nonzero().flatten().tolist() == [*range(12, 27)]
    )
    window, steps = spec.body.sliding_window, 4
    loss = chain_loss(draft, body, ids, attn, resp, steps, 0, window, -1, answer_logits_only=True)

    teacher = torch.zeros(*ids.shape, steps, dtype=torch.long)
    rows: list[list[tuple[int, int]]] = [[] for _ in range(steps)]  # (example, query position) per step
    for b, e in enumerate(batch):
        scored = [*e.ids, *e.tail]
        for p in range(len(scored)):
            for j in range(steps):
                if p + 1 + j < len(scored):
                    teacher[b, p, j] = scored[p + 1 + j]
                    if e.prompt_len <= p < len(e.ids):
                        rows[j].append((b, p))
    with torch.no_grad():
        _, hidden, kv = body_states(body, ids, attn)
        chain = draft_chain(
            draft, body.get_input_embeddings(), ids, hidden, kv, steps, window, teacher=teacher, position_offset=-1
        )
    written_out = sum(
        F.cross_entropy(
            torch.stack([chain[j][b, p] for b, p in rows[j]]), torch.stack([teacher[b, p, j] for b, p in rows[j]])
        )
        for j in range(steps)
    )
    torch.testing.assert_close(loss.detach(), written_out)
    no_tail = chain_loss(draft, body, *pad_batch([Example(tokens[:27], 12), batch[1]], 0), steps, 0, window, -1, True)
    assert not torch.isclose(loss, no_tail)  # the tail's targets count


def _replay(tokens: list[int], prompt_len: int, proposals: dict[int, list[int]]) -> AcceptanceCounts:
    counts = AcceptanceCounts(accepted_per_pos=[0] * 4)
    replay_rounds(tokens, prompt_len, [proposals.get(p, [-1] * 4) for p in range(len(tokens))], counts)
    return counts


def test_replay_counts_rounds_like_vllm() -> None:
    # prompt of 2 tokens, answer 10..19 (positions 2..11).
    tokens = [0, 1, *range(10, 20)]
    perfect = {p: [tokens[q] if q < len(tokens) else -1 for q in range(p + 1, p + 5)] for p in range(len(tokens))}
    c = _replay(tokens, 2, perfect)
    # rounds at p=2 (accept 4 -> p=7), p=7 (accept 4 -> p=12 > last 11): 2 drafts, all 4 accepted each time.
    assert (c.num_drafts, c.accepted_per_pos) == (2, [2, 2, 2, 2])
    assert c.mean_accepted_tokens == 4.0

    c = _replay(tokens, 2, {})  # the draft is always wrong: one round per emitted token after the first
    assert (c.num_drafts, c.accepted_per_pos) == (9, [0, 0, 0, 0])

    # first two right, third wrong at p=2 -> p=5; then perfect from 5: accept 4 -> p=10; at 10 only 1 token left.
    c = _replay(tokens, 2, {2: [11, 12, 99, 14], 5: [14, 15, 16, 17], 10: [19, 99, 99, 99]})
    assert (c.num_drafts, c.accepted_per_pos) == (3, [3, 2, 1, 1])
    assert c.rates == [1.0, 2 / 3, 1 / 3, 1 / 3]
