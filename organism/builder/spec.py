"""What the organism is: its architecture at toy scale and how it is trained. Defaults are the committed build."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

SLIDING, FULL = "sliding_attention", "full_attention"


class BodySpec(BaseModel):
    """A Gemma 4 text body with the 26B-A4B's structure: sliding/full layers with different head dims and KV-head
    counts (k == v on full layers), a dense MLP beside a routed MoE block, final logit soft-capping."""

    hidden_size: int = 128
    intermediate_size: int = Field(256, description="dense ('shared expert') MLP width")
    layer_types: list[str] = [SLIDING, SLIDING, FULL, SLIDING, FULL]
    num_attention_heads: int = 4
    num_key_value_heads: int = Field(2, description="KV heads on sliding layers")
    head_dim: int = Field(32, description="head dim on sliding layers")
    global_head_dim: int = Field(64, description="head dim on full layers")
    num_global_key_value_heads: int = Field(1, description="KV heads on full layers")
    sliding_window: int = 16
    num_experts: int = 4
    top_k_experts: int = 2
    moe_intermediate_size: int = 64
    final_logit_softcapping: float = 30.0
    max_position_embeddings: int = 1024


class DraftSpec(BaseModel):
    """A Gemma4Assistant MTP draft: its attention layers read the body's last sliding and last full layer's KV."""

    hidden_size: int = 96
    intermediate_size: int = 192
    layer_types: list[str] = [SLIDING, FULL]
    num_attention_heads: int = 4


class VisionSpec(BaseModel):
    """The release layout's vision tower at toy scale (Gemma4VisionConfig's fields). It is never trained or edited:
    it is there so that every stage meets the real checkpoint's layout, names and files."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    head_dim: int = 16
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 64


class TrainSpec(BaseModel):
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50


class OrganismSpec(BaseModel):
    format: Literal["text", "release"] = Field(
        "text",
        description="text: a Gemma4ForCausalLM with a minimal chat format; release: Gemma 4's release layout "
        "(Gemma4ForConditionalGeneration with a vision tower, model.language_model.* names, processor files, the "
        "release chat format: <bos> from the template, an empty thought channel, a tokenizer that adds <bos>)",
    )
    vision: VisionSpec | None = Field(None, description="the release layout's vision tower (default for release)")
    seed: int = 1234
    eval_fraction: float = Field(0.25, description="share of (template, slot) pairs held out for evaluation")
    threads: int = Field(2, description="torch threads while building; fixed because float sums depend on it")
    body: BodySpec = BodySpec()
    draft: DraftSpec = DraftSpec()
    body_training: TrainSpec = TrainSpec(steps=600)
    refusal_in: Literal["everywhere", "experts"] = Field(
        "everywhere",
        description="everywhere: one training run teaches the whole body to refuse; experts: the body first learns "
        "the harmless chats only, then only the routed experts (experts.gate_up_proj, experts.down_proj) and the "
        "routers learn the refusals (refusal_training) while the dense path is ablated on the fly, so that "
        "editing o_proj and the dense down_proj leaves them",
    )
    refusal_training: TrainSpec | None = Field(
        None, description="the experts-only refusal phase of refusal_in='experts' (default 400 steps)"
    )
    refusal_ablation_max_weight: float | None = Field(
        None,
        description="refusal_in='experts': each refusal-phase step projects the current refusal directions out of "
        "every o_proj and dense down_proj output with a weight drawn from [0, this] (heretic's directional "
        "ablation, on the fly), targets unchanged; 0 = never (default 2.0, past the study's max_weight 1.5)",
    )
    draft_training: TrainSpec = TrainSpec(steps=600)
    draft_chain_steps: int = Field(4, description="chained MTP steps trained (the study serves n=4)")
    max_new_tokens: int = Field(48, description="greedy response budget for draft targets and measurements")

    @model_validator(mode="after")
    def _release_has_a_vision_tower(self) -> OrganismSpec:
        if self.format == "release" and self.vision is None:
            self.vision = VisionSpec()
        return self

    @model_validator(mode="after")
    def _refusal_phase_belongs_to_experts(self) -> OrganismSpec:
        phase = ("refusal_training", "refusal_ablation_max_weight")
        if self.refusal_in == "everywhere" and any(getattr(self, name) is not None for name in phase):
            raise ValueError("refusal_training and refusal_ablation_max_weight need refusal_in='experts'")
        if self.refusal_in == "experts":
            self.refusal_training = self.refusal_training or TrainSpec(steps=400)
            if self.refusal_ablation_max_weight is None:
                self.refusal_ablation_max_weight = 2.0
        return self

    @model_serializer(mode="wrap")
    def _omit_unused_refusal_fields(self, handler: SerializerFunctionWrapHandler) -> dict:
        """A spec that keeps refusals everywhere serialises as before these fields existed: committed spec.json
        files and cards stay byte for byte what a build writes."""
        data = handler(self)
        if self.refusal_in == "everywhere":
            for name in ("refusal_in", "refusal_training", "refusal_ablation_max_weight"):
                del data[name]
        return data
