"""The quantization stage: a BF16 checkpoint -> an FP8_DYNAMIC checkpoint (llm-compressor, data-free).

Per output channel FP8 E4M3 weights with a BF16 scale, dynamic per-token activation scales. Modules matching the
ignore list stay BF16; what was actually written is verified per tensor on the saved checkpoint, never assumed.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

FP8 = "F8_E4M3"


class QuantizationError(RuntimeError):
    """The saved checkpoint is not what the scheme and ignore list promise."""


@dataclass
class QuantizedCheckpoint:
    path: Path
    fp8: list[str] = field(default_factory=list)  # weights stored as FP8 (each with a `_scale`)
    bf16: list[str] = field(default_factory=list)  # every other tensor


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
        if key.endswith("_scale"):
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


def quantize_fp8_dynamic(source: Path, out: Path, ignore: list[str]) -> QuantizedCheckpoint:
    """Quantize `source` (a BF16 HF folder) into `out` and verify it. Non-weight files are copied unchanged."""
    from compressed_tensors.utils import impl_backend
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    # On a GPU with triton, compressed-tensors' fused kernel divides by the scale in fp32; its eager path divides in
    # the weight's dtype, as the incremental formula (search/fp8.py) does. Eager keeps the two byte-identical on
    # every platform (the CT_ENFORCE_EAGER switch, which the library reads only at import).
    impl_backend.ENFORCE_EAGER = True
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=list(ignore)))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    return verify(out, ignore)
