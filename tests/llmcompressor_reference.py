"""llm-compressor's own whole-model FP8_DYNAMIC run: the reference the streamed quantizer
(search/candidate/quantize.py) and the incremental candidates (search/candidate/fp8_base.py) are compared with,
tensor by tensor. It loads the whole model, which is why the project never runs it in a study process."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def whole_model_fp8(source: Path, out: Path, ignore: list[str]) -> Path:
    """`oneshot` + `save_pretrained(save_compressed=True)` on the whole BF16 model; other files copied."""
    from compressed_tensors.utils import impl_backend
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    # On a GPU with triton, compressed-tensors' fused kernel divides by the scale in fp32; its eager path divides in
    # the weight's dtype, as the formula does (the CT_ENFORCE_EAGER switch, which the library reads only at import).
    impl_backend.ENFORCE_EAGER = True
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=list(ignore)))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    return out
