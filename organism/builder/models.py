"""The organism's two transformers models: configs from its spec, the release (multimodal) layout, loading.

How the MTP draft is wired to a body (the forward passes vLLM's MTP path runs) is search/draft/wiring.py, shared
with `draft-tune`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Gemma4AssistantConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    PreTrainedModel,
)

from mtp_abliterate.organism.spec import FULL, SLIDING, OrganismSpec
from mtp_abliterate.organism.tokenizer import AUDIO, BOA, BOI, BOS, END_OF_TURN, EOA, EOI, EOS, IMAGE, PAD, VIDEO
from mtp_abliterate.search.draft.wiring import text_body


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
