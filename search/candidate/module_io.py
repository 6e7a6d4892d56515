"""Inputs and outputs of every abliterable module at the last prompt token, for harmless and harmful prompts.

Captured once per study from the vanilla model with forward hooks on the modules' base layers, and cached on disk
under a key of model identity + prompts + capture settings, so a resumed study (or the next one-shot) reuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from heretic.model import Model
from heretic.utils import Prompt, batchify
from safetensors.torch import load_file, save_file

ModuleKey = tuple[int, str, int]  # (layer, component, index within the component's module list)
ModuleIO = dict[ModuleKey, dict[str, torch.Tensor]]


def cache_key(
    model_id: str, weights_digest: str, good: Sequence[Prompt], bad: Sequence[Prompt], batch_size: int
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([model_id, weights_digest, batch_size]).encode())
    for p in (*good, None, *bad):
        h.update(json.dumps(None if p is None else [p.system, p.user]).encode())
    return h.hexdigest()[:24]


def _flat(key: ModuleKey, name: str) -> str:
    layer, component, index = key
    return f"{layer}|{component}|{index}|{name}"


def _capture(model: Model, modules: dict[ModuleKey, torch.nn.Module], prompts: Sequence[Prompt]) -> dict:
    """Last-token input/output of each module (the base layer, adapters bypassed) over `prompts`."""
    rows: dict[ModuleKey, dict[str, list[torch.Tensor]]] = {k: {"in": [], "out": []} for k in modules}
    hooks = []
    for key, module in modules.items():

        def hook(_mod, args, output, key=key) -> None:
            rows[key]["in"].append(args[0][:, -1, :].detach().cpu())
            rows[key]["out"].append(output[:, -1, :].detach().cpu())

        hooks.append(module.register_forward_hook(hook))
    try:
        for batch in batchify(list(prompts), model.settings.batch_size):
            model.generate(batch, max_new_tokens=1, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: {side: torch.cat(v[side]) for side in ("in", "out")} for k, v in rows.items()}


def base_layers(model: Model) -> dict[ModuleKey, torch.nn.Module]:
    """Every abliterable module's vanilla Linear (heretic's discovery; PEFT's base_layer inside the adapter)."""
    out = {}
    for layer in range(len(model.get_layers())):
        for component, modules in model.get_layer_modules(layer).items():
            for index, module in enumerate(modules):
                out[(layer, component, index)] = getattr(module, "base_layer", module)
    return out


@torch.no_grad()
def load_or_capture(
    model: Model, good: Sequence[Prompt], bad: Sequence[Prompt], cache_dir: Path | None, key: str
) -> tuple[ModuleIO, bool]:
    """Module I/O from `cache_dir/module_io-<key>.safetensors`, captured and written there if absent.

    Returns (io, whether it came from the cache)."""
    path = cache_dir / f"module_io-{key}.safetensors" if cache_dir else None
    modules = base_layers(model)
    if path is not None and path.is_file():
        flat = load_file(path)
        return {k: {n: flat[_flat(k, n)] for n in ("good_in", "good_out", "bad_in", "bad_out")} for k in modules}, True
    good_io, bad_io = _capture(model, modules, good), _capture(model, modules, bad)
    io = {
        k: {
            "good_in": good_io[k]["in"],
            "good_out": good_io[k]["out"],
            "bad_in": bad_io[k]["in"],
            "bad_out": bad_io[k]["out"],
        }
        for k in modules
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({_flat(k, n): t.contiguous() for k, d in io.items() for n, t in d.items()}, tmp)
        tmp.replace(path)  # atomic: a killed capture never leaves a half-written cache
    return io, False
