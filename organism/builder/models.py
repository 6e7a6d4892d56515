"""The organism's two transformers models and the forward passes that wire the MTP draft to the body.

The wiring mirrors Gemma 4's assistant (and vLLM's `gemma4_mtp`): for a query at position p the draft reads
cat(body's scaled input embedding of token p, body's final normed hidden state at p-1), attends to the body's KV of
positions < p (the last sliding and last full layer's, RoPE'd and k-normed), keeps position p for every chained
step, and feeds its own `post_projection` output as the next step's state. Every position p is drafted in one
batched pass, so training and measurement cost a handful of forwards per batch, not one per round.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    PreTrainedModel,
)

from mtp_abliterate.organism.spec import FULL, SLIDING, OrganismSpec
from mtp_abliterate.organism.tokenizer import AUDIO, BOA, BOI, BOS, END_OF_TURN, EOA, EOI, EOS, IMAGE, PAD, VIDEO

KVStates = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _text_config(spec: OrganismSpec, vocab_size: int, special_ids: dict[str, int], **overrides) -> Gemma4TextConfig:
    b = spec.body
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_hidden_layers=len(b.layer_types),
        layer_types=list(b.layer_types),
        num_attention_heads=b.num_attention_heads,
        num_key_value_heads=b.num_key_value_heads,
        head_dim=b.head_dim,
        global_head_dim=b.global_head_dim,
        num_global_key_value_heads=b.num_global_key_value_heads,
        attention_k_eq_v=True,
        sliding_window=b.sliding_window,
        max_position_embeddings=b.max_position_embeddings,
        final_logit_softcapping=b.final_logit_softcapping,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        enable_moe_block=True,
        num_experts=b.num_experts,
        top_k_experts=b.top_k_experts,
        moe_intermediate_size=b.moe_intermediate_size,
        tie_word_embeddings=True,
        pad_token_id=special_ids[PAD],
        bos_token_id=special_ids[BOS],
        eos_token_id=[special_ids[EOS], special_ids[END_OF_TURN]],
    )
    fields.update(overrides)
    return Gemma4TextConfig(**fields)


def body_config(spec: OrganismSpec, vocab_size: int, special_ids: dict[str, int]) -> Gemma4TextConfig:
    return _text_config(spec, vocab_size, special_ids)


def draft_config(spec: OrganismSpec, vocab_size: int, special_ids: dict[str, int]) -> Gemma4AssistantConfig:
    d = spec.draft
    if set(d.layer_types) != {SLIDING, FULL}:
        raise ValueError("the draft needs one sliding and one full attention layer to read both of the body's KVs")
    text = _text_config(
        spec,
        vocab_size,
        special_ids,
        hidden_size=d.hidden_size,
        intermediate_size=d.intermediate_size,
        num_hidden_layers=len(d.layer_types),
        layer_types=list(d.layer_types),
        num_attention_heads=d.num_attention_heads,
        enable_moe_block=False,
        num_experts=None,
        top_k_experts=None,
        moe_intermediate_size=None,
        final_logit_softcapping=None,
        num_kv_shared_layers=len(d.layer_types),
    )
    return Gemma4AssistantConfig(
        text_config=text, backbone_hidden_size=spec.body.hidden_size, use_ordered_embeddings=False
    )


def media_token_ids(special_ids: dict[str, int]) -> dict[str, int]:
    """The release config's image/audio/video token ids (the top-level fields of Gemma4Config)."""
    return {
        "image_token_id": special_ids[IMAGE],
        "boi_token_id": special_ids[BOI],
        "eoi_token_id": special_ids[EOI],
        "video_token_id": special_ids[VIDEO],
        "audio_token_id": special_ids[AUDIO],
        "boa_token_id": special_ids[BOA],
        "eoa_token_index": special_ids[EOA],
    }


def release_model(body: Gemma4ForCausalLM, spec: OrganismSpec, special_ids: dict[str, int]) -> PreTrainedModel:
    """The trained text body inside Gemma 4's release architecture: a Gemma4ForConditionalGeneration whose language
    model is `body` (weights under model.language_model.*, lm_head tied), beside a seeded, untrained vision tower
    and no audio tower, as in 26B-A4B."""
    v = spec.vision
    vision = Gemma4VisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        num_key_value_heads=v.num_key_value_heads,
        head_dim=v.head_dim,
        patch_size=v.patch_size,
        pooling_kernel_size=v.pooling_kernel_size,
        position_embedding_size=v.position_embedding_size,
    )
    config = Gemma4Config(
        text_config=body.config, vision_config=vision, audio_config=None, **media_token_ids(special_ids)
    )
    config.architectures = ["Gemma4ForConditionalGeneration"]
    torch.manual_seed(spec.seed + 2)
    model = Gemma4ForConditionalGeneration(config)
    model.model.language_model.load_state_dict(body.model.state_dict())
    model.tie_weights()
    return model.to(body.dtype).eval()


def text_body(model: PreTrainedModel) -> Gemma4ForCausalLM:
    """A Gemma4ForCausalLM over `model`'s own language model modules (a release model's, or `model` itself)."""
    if isinstance(model, Gemma4ForCausalLM):
        return model
    body = Gemma4ForCausalLM(model.config.get_text_config())
    body.model = model.model.language_model
    body.lm_head = model.lm_head
    return body.to(model.dtype).eval()


def load_text_body(path: Path) -> Gemma4ForCausalLM:
    """The organism's body from either format, as the text model the draft is wired to."""
    config = json.loads((path / "config.json").read_text())
    cls = Gemma4ForConditionalGeneration if "text_config" in config else Gemma4ForCausalLM
    return text_body(cls.from_pretrained(path).eval())


def write_hub_style_config(model_dir: Path, spec: OrganismSpec) -> None:
    """Store head-dim overrides the way Google's checkpoints do (`global_head_dim`, `num_global_key_value_heads`)
    instead of transformers' derived `per_layer_config`, which other readers (vLLM) do not know."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    text = cfg.get("text_config", cfg)
    text.pop("per_layer_config", None)
    text["global_head_dim"] = spec.body.global_head_dim
    text["num_global_key_value_heads"] = spec.body.num_global_key_value_heads
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def body_states(body: Gemma4ForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
    """Right-padded sequences -> (logits, final normed hidden states, shared KV of the last sliding/full layers)."""
    out = body.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_shared_kv_states=True)
    logits = body.lm_head(out.last_hidden_state)
    cap = body.config.final_logit_softcapping
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, out.last_hidden_state, dict(out.shared_kv_states)


def draft_masks(batch: int, length: int, sliding_entries: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Boolean masks (True = attend) for queries at every position p over the body's KV.

    Full layers see kv < p; sliding layers the last `sliding_entries` of those (HF's assistant uses
    sliding_window + 1). Position 0 has nothing to attend to; it sees kv 0 so that no row is empty (an all-masked
    row gives NaN), and it is never scored.
    """
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    full = k < q
    sliding = full & (k >= q - sliding_entries)
    full[0, 0] = sliding[0, 0] = True
    return {
        FULL: full.expand(batch, 1, length, length),
        SLIDING: sliding.expand(batch, 1, length, length),
    }


def draft_chain(
    draft: Gemma4AssistantForCausalLM,
    embed: torch.nn.Module,
    input_ids: torch.Tensor,
    hidden: torch.Tensor,
    kv: KVStates,
    steps: int,
    sliding_entries: int,
    teacher: torch.Tensor | None = None,
    position_offset: int = 0,
) -> list[torch.Tensor]:
    """Chained draft logits for a query at every position: element j is [B, T, V], the prediction of token p+1+j.

    Step 0's state is the body's hidden state at p-1. Later steps take the draft's own projected state and, as
    input token, `teacher[:, :, j-1]` when given (training) or the previous step's argmax (measurement).
    The query's RoPE position is p + position_offset: HF's assistant uses p (the new token's position), vLLM's
    proposer p - 1 (the position of the hidden state it was given).
    """
    batch, length = input_ids.shape
    masks = draft_masks(batch, length, sliding_entries, input_ids.device)
    positions = (torch.arange(length, device=input_ids.device) + position_offset).clamp(min=0)
    position_ids = positions.expand(batch, length)
    state = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
    tokens = input_ids
    logits_per_step = []
    for j in range(steps):
        x = draft.pre_projection(torch.cat([embed(tokens), state], dim=-1))
        out = draft.model(
            inputs_embeds=x, attention_mask=masks, position_ids=position_ids, shared_kv_states=kv, use_cache=False
        )
        logits = draft.lm_head(out.last_hidden_state)
        logits_per_step.append(logits)
        state = draft.post_projection(out.last_hidden_state)
        tokens = teacher[:, :, j] if teacher is not None else logits.argmax(-1)
    return logits_per_step
