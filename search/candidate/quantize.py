"""The quantization stage: a checkpoint -> an FP8_DYNAMIC checkpoint, streamed one source shard at a time.

Per output channel FP8 E4M3 weights with a BF16 scale, dynamic per-token activation scales; modules matching the
ignore list stay BF16. The output is byte-identical to llm-compressor's whole-model `oneshot` + `save_pretrained`
(tests/llmcompressor_reference.py runs that and the tests compare every tensor and config), without a second copy
of the model in memory: a study process already holds the resident model, and the real target is ~52 GB in BF16.

What llm-compressor decides is taken from llm-compressor, on a weightless (meta-device) model of the checkpoint's
architecture: which modules are Linear and quantized (its MoE linearisation splits fused experts into per-expert
Linear layers), the `quantization_config` it writes (compressed-tensors' ModelCompressor), the recipe it saves, the
config it re-saves. The values follow llm-compressor's FP8_DYNAMIC formula, verified bit for bit
(tests/test_quantize.py): per output row `scale = amax(|w|) / 448` in the weight's dtype, a zero scale replaced by the
dtype's eps, and `q = clamp(w / scale + 0, -448, 448)` cast to float8_e4m3fn (`+ 0` is oneshot's zero point: +0
where the bare division gives -0). What was written is verified per tensor on the saved checkpoint, never assumed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtp_abliterate.search.errors import UserError

FP8 = "F8_E4M3"
FP8_MAX = 448.0
SCALE = "_scale"
INDEX = "model.safetensors.index.json"
EXPERT = re.compile(r"(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")


class QuantizationError(UserError, RuntimeError):
    """The checkpoint cannot be quantized as the scheme and ignore list promise; the message says why."""


@dataclass
class QuantizedCheckpoint:
    path: Path
    fp8: list[str] = field(default_factory=list)  # weights stored as FP8 (each with a `_scale`)
    bf16: list[str] = field(default_factory=list)  # every other tensor


@torch.no_grad()
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, per-row scale) exactly as llm-compressor's FP8_DYNAMIC writes them, in `w`'s dtype."""
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = amax / torch.tensor(FP8_MAX, dtype=w.dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype), scale)
    q = torch.clamp(w / scale + torch.zeros((), dtype=w.dtype), -FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale


def _ignored(module: str, ignore: list[str]) -> bool:
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module):
                return True
        elif module == pattern or module.endswith("." + pattern):
            return True
    return False


def _tensor_dtypes(path: Path) -> dict[str, str]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                out[key] = f.get_slice(key).get_dtype()
    return out


def verify(path: Path, ignore: list[str]) -> QuantizedCheckpoint:
    """Every Linear weight outside `ignore` is FP8 with a per-channel scale; everything else is BF16."""
    dtypes = _tensor_dtypes(path)
    result = QuantizedCheckpoint(path)
    problems = []
    for key, dtype in sorted(dtypes.items()):
        if key.endswith(SCALE):
            continue
        module = key.removesuffix(".weight")
        if dtype == FP8:
            result.fp8.append(key)
            if _ignored(module, ignore):
                problems.append(f"{key} is FP8 but matches the ignore list")
            if f"{module}.weight_scale" not in dtypes:
                problems.append(f"{key} has no weight_scale")
        else:
            result.bf16.append(key)
            if dtype != "BF16":
                problems.append(f"{key} is {dtype}, expected BF16")
    if not result.fp8:
        problems.append("no tensor was quantized")
    if problems:
        raise QuantizationError(f"{path}: " + "; ".join(problems))
    return result


@dataclass
class Fp8Plan:
    """What llm-compressor would write for a checkpoint: every tensor's name and dtype, which are FP8, the configs."""

    dtypes: dict[str, torch.dtype]  # every saved tensor (tied duplicates dropped), in the model's naming
    fp8: set[str]  # weights written as FP8 with a `_scale`
    transposed: dict[str, bool]  # fused experts module -> whether its 3D weights are stored (in, out)
    compressor: object  # compressed_tensors ModelCompressor: writes quantization_config
    recipe: object  # llmcompressor Recipe: writes recipe.yaml
    config: object  # the loaded model's transformers config: saved, then patched as llm-compressor does


def plan(source: Path, ignore: list[str]) -> Fp8Plan:
    """llm-compressor's decisions for `source`, taken on a meta-device model (no weights are read)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.recipe import Recipe
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # llm-compressor's linearize_moe, less the weight copy (there are no weights): the same per-expert modules.
    transposed = {}
    for name, experts in get_non_linearized_moes(model):
        linear = LinearExperts2D.get_linear_experts_cls(type(experts))
        with torch.device("meta"):
            model.set_submodule(name, linear(getattr(experts, "config", model.config)))
        transposed[name] = bool(getattr(experts, "is_transposed", False))
    # Before quantization parameters (scales) are attached: the checkpoint's tensors only.
    seen: set[int] = set()
    dtypes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # a tied weight is saved once, under its first name
            seen.add(id(tensor))
            dtypes[name] = tensor.dtype
    modifier = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=list(ignore))
    apply_quantization_config(model, modifier.resolve_quantization_config())
    fp8 = set()
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is not None:
            module.quantization_status = QuantizationStatus.COMPRESSED  # what save_pretrained(save_compressed) sets
            fp8.add(f"{name}.weight")
    if not fp8:
        raise QuantizationError(f"{source}: no Linear module outside the ignore list {ignore}; nothing to quantize")
    return Fp8Plan(
        dtypes=dtypes,
        fp8=fp8,
        transposed=transposed,
        compressor=ModelCompressor.from_pretrained_model(model),
        recipe=Recipe.from_modifiers(modifier),
        config=model.config,
    )


def weight_files(folder: Path) -> dict[str, str]:
    """Every tensor's name -> its safetensors file in `folder`: the index's map, else read from each file."""
    index = folder / INDEX
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    file_of = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            file_of.update(dict.fromkeys(f.keys(), shard.name))
    return file_of


def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    """The index a sharded checkpoint needs (none for one file), as transformers writes it."""
    files = set(weight_map.values())
    if len(files) > 1:
        total = sum((folder / f).stat().st_size for f in files)
        (folder / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        )


class _Source:
    """The source checkpoint's tensors by name, opened one shard at a time."""

    def __init__(self, source: Path) -> None:
        self.file_of = weight_files(source)
        if not self.file_of:
            raise QuantizationError(f"{source} holds no .safetensors weights")
        self.source = source

    def shards(self) -> list[str]:
        return sorted(set(self.file_of.values()))


def _origin(name: str, plan: Fp8Plan, file_of: dict[str, str]) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Which source tensor `name` comes from and how it is cut out of it (llm-compressor's expert linearisation)."""
    if name in file_of:
        return name, lambda t: t
    m = EXPERT.fullmatch(name)
    if m and m["experts"] in plan.transposed:
        experts, index, proj, transposed = m["experts"], int(m["index"]), m["proj"], plan.transposed[m["experts"]]
        gated = f"{experts}.gate_up_proj" in file_of  # else experts without a gate: up_proj and down_proj only
        fused = f"{experts}.{'gate_up_proj' if gated and proj != 'down_proj' else proj}"

        def cut(t: torch.Tensor) -> torch.Tensor:
            w = t[index].T if transposed else t[index]  # (out, in), as the per-expert Linear holds it
            if fused.endswith("gate_up_proj"):
                half = w.shape[0] // 2
                w = w[:half] if proj == "gate_proj" else w[half:]
            return w

        if fused in file_of:
            return fused, cut
    raise QuantizationError(
        f"{plan.config._name_or_path}: tensor {name} of the model has no source in the checkpoint; "
        "is the checkpoint complete and of the architecture its config.json names?"
    )


def _quantized_shards(src: _Source, plan: Fp8Plan) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(source shard, its output tensors), one source shard in memory at a time."""
    by_shard: dict[str, list[tuple[str, str, Callable]]] = {}
    for name in plan.dtypes:
        origin, cut = _origin(name, plan, src.file_of)
        by_shard.setdefault(src.file_of[origin], []).append((name, origin, cut))
    for shard in src.shards():
        out: dict[str, torch.Tensor] = {}
        with safe_open(src.source / shard, "pt") as f:
            for name, origin, cut in by_shard.get(shard, []):
                w = cut(f.get_tensor(origin)).to(plan.dtypes[name])
                if name in plan.fp8:
                    q, scale = quantize_rows(w)
                    out[name], out[name + SCALE] = q.contiguous(), scale.contiguous()
                else:
                    out[name] = w.contiguous()
        yield shard, out


def quantize_fp8_dynamic(
    source: Path, out: Path, ignore: list[str], file_for: Callable[[str, str], str] | None = None
) -> QuantizedCheckpoint:
    """Quantize `source` into `out`, one shard at a time, and verify it. `file_for(tensor, source shard)` names
    each tensor's output file (default: the source shard's name). Other files are copied unchanged; config.json and
    recipe.yaml are written as llm-compressor writes them."""
    from llmcompressor.transformers.compression.compressed_tensors_utils import resave_config
    from llmcompressor.transformers.utils.helpers import infer_recipe_from_model_path

    file_for = file_for or (lambda name, shard: shard)
    the_plan = plan(source, ignore)
    src = _Source(source)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for shard, tensors in _quantized_shards(src, the_plan):
        files: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            owner = name.removesuffix(SCALE) if name.endswith(".weight" + SCALE) else name
            files.setdefault(file_for(owner, shard), {})[name] = tensor
        for file, part in files.items():
            save_file(part, out / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        del tensors, files
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX, "recipe.yaml"):
            shutil.copy2(f, out / f.name)
    the_plan.config.save_pretrained(out)  # what save_pretrained writes; llm-compressor then patches it
    resave_config(the_plan.config, str(out))
    the_plan.compressor.update_config(str(out))
    the_plan.recipe.yaml(file_path=str(out / "recipe.yaml"), existing_recipe_path=infer_recipe_from_model_path(source))
    write_index(out, weight_map)
    return verify(out, ignore)
