"""The abliteration stage: revertible edits of the resident model, and merged checkpoints of a candidate.

heretic 1.4.0's `Model` loads the model, discovers the abliterable modules (`attn.o_proj`, `mlp.down_proj`) and
wraps them in PEFT adapters; this stage chooses the adapter (rank-r LoRA, or DoRA with frozen magnitudes for
row-norm-preserving ARA), writes its weights, and resets it. Reset zeroes every adapter and switches it off, so the
model computes exactly the vanilla function (bit-identical logits) without reloading anything. Routed experts,
which heretic does not discover, are edited in place and written back on reset (search/candidate/experts.py).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from heretic.config import RowNormalization, Settings
from heretic.model import AbliterationParameters, Model
from heretic.utils import load_prompts
from peft import LoraConfig, get_peft_model
from pydantic import BaseModel, ConfigDict, Field

from mtp_abliterate.search.candidate import methods
from mtp_abliterate.search.candidate.ara import (
    AbliterationError,
    AraParameters,
    ModelShape,
    ModuleTask,
    edited_weight,
    module_seed,
    optimise_modules,
)
from mtp_abliterate.search.candidate.experts import (
    COMPONENT as EXPERTS,
)
from mtp_abliterate.search.candidate.experts import (
    ROUTED,
    ExpertEdits,
    chosen_experts,
    directional_weight,
    expert_io,
    find_experts,
    layer_direction,
)
from mtp_abliterate.search.candidate.heretic_bridge import ServedTokenization, load_errors
from mtp_abliterate.search.candidate.module_io import ModuleIO, ModuleKey
from mtp_abliterate.search.candidate.quantize import EXPERT

ADAPTER = "default"


class AdapterModel(ServedTokenization):
    """heretic's Model with this project's adapters: rank `rank` on every abliterable module, DoRA if `dora`; chats
    tokenized as vLLM serves them."""

    def __init__(self, settings: Settings, rank: int, dora: bool) -> None:
        self.adapter_rank, self.dora = rank, dora
        super().__init__(settings)

    def _apply_lora(self) -> None:
        names = {id(module): name for name, module in self.model.named_modules()}
        targets = sorted(
            names[id(m)]
            for layer in range(len(self.get_layers()))
            for modules in self.get_layer_modules(layer).values()
            for m in modules
        )
        self.peft_config = LoraConfig(
            r=self.adapter_rank,
            lora_alpha=self.adapter_rank,
            target_modules=targets,
            lora_dropout=0,
            bias="none",
            use_dora=self.dora,
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(self.model, self.peft_config)


class DirectionalParameters(BaseModel):
    """heretic 1.4.0's directional ablation: a refusal direction (one global index, or per layer when None) and a
    per-component weight kernel over layers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    direction_index: float | None = Field(
        description="fractional layer index of the global direction; null = per layer"
    )
    parameters: dict[str, dict[str, float]] = Field(
        description="component -> max_weight, max_weight_position, min_weight, min_weight_distance"
    )

    def check_against(self, shape: ModelShape, available: list[str]) -> None:
        num_layers = shape.num_layers
        problems = []
        if self.direction_index is not None and not 0 <= self.direction_index <= num_layers - 1:
            problems.append(f"direction_index={self.direction_index} is outside [0, {num_layers - 1}]")
        components = [*available, *([EXPERTS] if shape.num_experts else [])]
        unknown = sorted(set(self.parameters) - set(components))
        if unknown:
            problems.append(f"components {unknown} are not among this model's {components}")
        fields = set(AbliterationParameters.__dataclass_fields__)
        for component, values in self.parameters.items():
            if set(values) != fields:
                problems.append(f"{component} needs exactly {sorted(fields)}")
            elif values["min_weight_distance"] <= 0:
                problems.append(f"{component}.min_weight_distance must be > 0")
        if problems:
            raise AbliterationError("; ".join(problems))


class Abliterator:
    """Applies a candidate to the resident model and reverts it; knows nothing of studies or tracking."""

    def __init__(self, model: AdapterModel, seed: int, workers: int = 1) -> None:
        self.model = model
        self.seed = seed
        self.workers = workers
        base = model.model.get_base_model()
        names = {id(m): n for n, m in base.named_modules()}
        self.adapters: dict[ModuleKey, Any] = {}
        self.module_names: dict[ModuleKey, str] = {}
        for layer in range(len(model.get_layers())):
            for component, modules in model.get_layer_modules(layer).items():
                for index, module in enumerate(modules):
                    self.adapters[(layer, component, index)] = module
                    self.module_names[(layer, component, index)] = names[id(module)]
        self.edited: set[ModuleKey] = set()
        self._dora_variants: dict[int, Any] = {}  # each module's DoRA variant while a directional candidate lifts it
        self.experts = ExpertEdits(find_experts(base, model.get_layers()))
        self.reset()

    @property
    def num_layers(self) -> int:
        return len(self.model.get_layers())

    @property
    def components(self) -> list[str]:
        return self.model.get_abliterable_components()

    @property
    def num_experts(self) -> int:
        """Routed experts per layer (0 for a dense model)."""
        return self.experts.num_experts

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.num_layers, self.num_experts)

    def reset(self) -> None:
        """Back to vanilla: adapters zeroed and switched off, so forward passes are the base layers' own; DoRA back
        on where a directional candidate switched it off."""
        with torch.no_grad():
            for module in self.adapters.values():
                a, b, rank = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight, module.r[ADAPTER]
                if a.shape[0] != rank:  # heretic writes rank-1 factors unless its row normalisation is "full"
                    a.data, b.data = a.new_zeros(rank, a.shape[1]), b.new_zeros(b.shape[0], rank)
                a.zero_()
                b.zero_()
                module.enable_adapters(False)
                self._plain_lora(module, self.model.dora is False)
        self.experts.reset()
        self.edited = set()

    def _plain_lora(self, module, plain: bool) -> None:
        """Switch one DoRA module between DoRA and plain LoRA: PEFT's forward takes DoRA's path only while the module
        holds its DoRA variant."""
        key = id(module)
        self._dora_variants.setdefault(key, module.lora_variant.get(ADAPTER))
        if plain:
            module.lora_variant.pop(ADAPTER, None)
        elif self._dora_variants[key] is not None:
            module.lora_variant[ADAPTER] = self._dora_variants[key]
        module.use_dora[ADAPTER] = ADAPTER in module.lora_variant

    def _magnitude(self, module) -> torch.Tensor | None:
        return module.lora_magnitude_vector[ADAPTER].weight if ADAPTER in module.lora_variant else None

    def apply_ara(self, params: AraParameters, io: ModuleIO) -> dict[str, Any]:
        """Reset, then optimise and install the adapter of every module in the layer range. Returns details."""
        params.check_against(self.shape, self.components)
        self.reset()
        t0 = time.perf_counter()
        keys = [
            key
            for key in self.adapters
            if params.start_layer_index <= key[0] < params.end_layer_index and key[1] in params.components
        ]
        tasks = [
            ModuleTask(
                self.adapters[key].base_layer.weight,
                io[key],
                module_seed(self.seed, *key),
                self._magnitude(self.adapters[key]),
            )
            for key in keys
        ]
        losses = {}
        for key, (a, b, loss) in zip(
            keys, optimise_modules(tasks, params, self.model.adapter_rank, self.workers), strict=True
        ):
            module = self.adapters[key]
            with torch.no_grad():
                module.lora_A[ADAPTER].weight.copy_(a)
                module.lora_B[ADAPTER].weight.copy_(b)
            module.enable_adapters(True)
            self.edited.add(key)
            losses[self.module_names[key]] = loss
        losses |= self._apply_experts(params, io)
        modules = len(self.edited) + len(self.experts.edited())
        return {"modules": modules, "ara_s": time.perf_counter() - t0, "losses": losses}

    def _apply_experts(self, params: AraParameters, io: ModuleIO) -> dict[str, float]:
        """ARA on the down projections of the experts that harmful prompts reach most, in the candidate's layers;
        row norms kept (the DoRA case) when the adapters are DoRA."""
        if params.experts_per_layer == 0:
            return {}
        chosen = [
            (layer, expert)
            for layer, fused in self.experts.experts.items()
            if params.start_layer_index <= layer < params.end_layer_index
            for expert in chosen_experts(io[(layer, ROUTED, 0)], fused.num_experts, params.experts_per_layer)
        ]
        tasks = []
        for layer, expert in chosen:
            fused = self.experts.experts[layer]
            w0 = fused.module.down_proj[expert]
            magnitude = w0.detach().float().norm(p=2, dim=1) if self.model.dora else None
            tasks.append(
                ModuleTask(
                    w0,
                    expert_io(fused, io[(layer, ROUTED, 0)], expert),
                    module_seed(self.seed, layer, EXPERTS, expert),
                    magnitude,
                )
            )
        losses = {}
        results = optimise_modules(tasks, params, self.model.adapter_rank, self.workers)
        for (layer, expert), task, (a, b, loss) in zip(chosen, tasks, results, strict=True):
            weight = edited_weight(task.w0.float(), a.float(), b.float(), task.magnitude)
            self.experts.write(layer, expert, weight, a, b)
            losses[self.experts.experts[layer].weight_name(expert).removesuffix(".weight")] = loss
        return losses

    def apply_directional(self, params: DirectionalParameters, directions: torch.Tensor) -> dict[str, Any]:
        """Reset, then heretic's own `abliterate`: plain LoRA of the adapter rank, heretic's row normalisation. On a
        DoRA model (ARA's) the adapters run as plain LoRA until the next reset, so the weight heretic writes is
        the weight served, as with heretic's own adapters."""
        params.check_against(self.shape, self.components)
        self.reset()
        for module in self.adapters.values():
            module.enable_adapters(True)
            self._plain_lora(module, True)
        kernel = {c: AbliterationParameters(**v) for c, v in params.parameters.items() if c != EXPERTS}
        self.model.abliterate(directions, params.direction_index, kernel)
        self.edited = {k for k, m in self.adapters.items() if bool(m.lora_B[ADAPTER].weight.any())}
        if EXPERTS in params.parameters:
            self._directional_experts(AbliterationParameters(**params.parameters[EXPERTS]), params, directions)
        return {"modules": len(self.edited) + len(self.experts.edited())}

    def _directional_experts(
        self, kernel: AbliterationParameters, params: DirectionalParameters, directions: torch.Tensor
    ) -> None:
        """heretic's kernel over layers, applied to every expert's down projection of each layer it reaches."""
        keep_norms = self.model.settings.row_normalization == RowNormalization.FULL
        for layer, fused in self.experts.experts.items():
            distance = abs(layer - kernel.max_weight_position)
            if distance > kernel.min_weight_distance:
                continue
            weight = kernel.max_weight + distance / kernel.min_weight_distance * (kernel.min_weight - kernel.max_weight)
            if weight == 0:
                continue
            v = layer_direction(directions, params.direction_index, layer)
            for expert in range(fused.num_experts):
                w = directional_weight(fused.module.down_proj[expert], v, weight, keep_norms)
                self.experts.write(layer, expert, w, v, torch.tensor([weight]))

    def adapter_digest(self) -> str:
        """sha256 of every edited module's adapter tensors: equal digests mean equal candidates."""
        h = hashlib.sha256()
        for key in sorted(self.edited):
            module = self.adapters[key]
            h.update(self.module_names[key].encode())
            for t in (module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight):
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        for layer, expert in self.experts.edited():
            h.update(self.experts.experts[layer].weight_name(expert).encode())
            for t in self.experts.factors[(layer, expert)]:
                h.update(t.float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def merged_digest(self, weights: dict[str, torch.Tensor] | None = None) -> str:
        """sha256 of the edited modules' deployed weights (BF16 bytes as written to a checkpoint); pass
        `merged_weights()` when it is at hand, to compute them once."""
        h = hashlib.sha256()
        for name, tensor in (self.merged_weights() if weights is None else weights).items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def merged_weights(self) -> dict[str, torch.Tensor]:
        """Full weights of the edited modules as deployed, in the base weights' dtype, keyed by parameter name."""
        out = {}
        for key in sorted(self.edited):
            module = self.adapters[key]
            w0 = module.base_layer.weight
            scaling = module.scaling[ADAPTER]
            w = edited_weight(
                w0.float(),
                module.lora_A[ADAPTER].weight.float(),
                module.lora_B[ADAPTER].weight.float() * scaling,
                None if (m := self._magnitude(module)) is None else m.float(),
            )
            out[f"{self.module_names[key]}.weight"] = w.to(w0.dtype)
        return out | self.experts.merged_weights()

    @contextmanager
    def deployed(self) -> Iterator[None]:
        """The candidate as its checkpoint holds it, for the duration: each edited module's merged weight
        (`merged_weights()`, the base dtype) in its base layer and its adapter off; the adapters are back after.
        These are the weights `save_merged` writes, FP8 is quantized from, and heretic's `--evaluate-model` loads.
        The adapters' own forward is not: DoRA in BF16 rounds each row's scale (magnitude / norm) to BF16, which
        moved the organism's first-token KL by 5 % (docs/parity.md)."""
        weights = self.merged_weights()
        swapped = []
        try:
            with torch.no_grad():
                for key in sorted(self.edited):
                    module = self.adapters[key]
                    swapped.append((module, module.base_layer.weight.data))
                    module.base_layer.weight.data = weights[f"{self.module_names[key]}.weight"]
                    module.enable_adapters(False)
            yield
        finally:
            for module, vanilla in swapped:
                module.base_layer.weight.data = vanilla
                module.enable_adapters(True)

    def save_merged(self, out: Path, source: str | Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """A standalone checkpoint of the current candidate; the resident model keeps its adapters. `weights`:
        `merged_weights()` when the caller already has them.

        Non-weight files (config, tokenizer, chat template, generation config) are copied from a local `source`
        unchanged, so the candidate's config is byte-identical to the vanilla one. Edited experts are saved in
        their fused parameter, written from `weights` (the resident may have been reset since).
        """
        base = self.model.model.get_base_model()
        state = {}
        for name, tensor in base.state_dict().items():
            if "lora_" in name:
                continue
            state[name.replace(".base_layer.", ".")] = tensor
        merged = self.merged_weights() if weights is None else weights
        copied: set[str] = set()
        for name, tensor in merged.items():
            if name in state:
                state[name] = tensor
            elif m := EXPERT.fullmatch(name):  # an expert's slice, written into a copy of its fused parameter
                fused = f"{m['experts']}.{m['proj']}"
                if fused not in copied:
                    state[fused] = state[fused].clone()
                    copied.add(fused)
                state[fused][int(m["index"])] = tensor
        out.mkdir(parents=True, exist_ok=True)
        base.save_pretrained(out, state_dict=state)
        self.model.tokenizer.save_pretrained(out)
        src = Path(source)
        if src.is_dir():
            for f in src.iterdir():
                if (
                    f.is_file()
                    and not f.name.endswith((".safetensors", ".bin"))
                    and f.name != "model.safetensors.index.json"
                ):
                    shutil.copy2(f, out / f.name)
        return out


def refusal_directions(model: Model, settings: Settings) -> torch.Tensor:
    """heretic 1.4.0's per-layer directions: normalised mean difference, orthogonalised against the harmless mean."""
    good = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    bad = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    directions = F.normalize(bad - good, p=2, dim=1)
    good_dir = F.normalize(good, p=2, dim=1)
    directions = directions - (directions * good_dir).sum(dim=1, keepdim=True) * good_dir
    return F.normalize(directions, p=2, dim=1)


def load_adapter_model(settings: Settings, method: str, rank: int) -> AdapterModel:
    """The adapters `method` edits (its registered `adapter`: ARA's rank-`rank` LoRA or DoRA, heretic's own LoRA for
    the directional method)."""
    adapter_rank, dora = methods.method(method).adapter(settings, rank)
    with load_errors(settings.model):
        return AdapterModel(settings, rank=adapter_rank, dora=dora)
