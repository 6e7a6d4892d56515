"""Routed experts that stay unquantized go back into transformers' fused layout in an FP8 export.

llm-compressor (and the incremental FP8 writer, which matches it byte for byte) linearises fused MoE experts into
per-expert Linear modules and saves them split, `<experts>.<e>.{gate,up,down}_proj.weight`, quantized or not. vLLM
reads that layout, but transformers 5.x has no conversion from it for Gemma 4: `from_pretrained` reports the fused
`experts.gate_up_proj` / `experts.down_proj` MISSING and initialises them randomly. Experts that the ignore list
keeps in BF16 (all of them on CPU) are plain tensors, so the export writes them fused again, exactly as the BF16
candidate holds them; vLLM reads the fused names as it reads the vanilla checkpoint. Quantized experts keep
llm-compressor's split layout: their scales are per expert.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtp_abliterate.search.candidate.quantize import EXPERT, SCALE, weight_files, write_index


def fuse_unquantized_experts(folder: Path, source: Path) -> list[str]:
    """Replace, in the FP8 checkpoint `folder`, each experts module whose split weights are all unquantized by its
    fused tensors from the BF16 checkpoint `source` it was quantized from, one weight file in memory at a time.
    Returns the fused modules' names."""
    file_of = weight_files(folder)
    source_of = weight_files(source)
    split: dict[str, list[str]] = {}
    for name in file_of:
        if m := EXPERT.fullmatch(name):
            split.setdefault(m["experts"], []).append(name)
    fused_of = {
        experts: [s for s in source_of if s.startswith(experts + ".") and not EXPERT.fullmatch(s)]
        for experts, names in split.items()
        if not any(n + SCALE in file_of for n in names)
    }
    fused_of = {experts: fused for experts, fused in fused_of.items() if fused}
    if not fused_of:
        return []
    dropped = {name for experts in fused_of for name in split[experts]}
    home = {fused: file_of[split[experts][0]] for experts, names in fused_of.items() for fused in names}
    for file in sorted({file_of[name] for name in dropped}):
        tensors = {k: v for k, v in load_file(folder / file).items() if k not in dropped}
        for fused in (f for f, h in home.items() if h == file):
            with safe_open(source / source_of[fused], "pt") as f:
                tensors[fused] = f.get_tensor(fused)
        save_file(tensors, folder / file, metadata={"format": "pt"})
    write_index(folder, {k: v for k, v in file_of.items() if k not in dropped} | home)
    return sorted(fused_of)
