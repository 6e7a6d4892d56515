"""Inputs and outputs of every abliterable module at the last prompt token, for harmless and harmful prompts.

Captured once per study from the vanilla model with forward hooks on the modules' base layers, and cached on disk
under a key of model identity + prompts + capture settings, so a resumed study (or the next one-shot) reuses them.
Fused routed experts (search/candidate/experts.py) are recorded as what their layer routes: the experts' input rows
and each row's top-k experts (key `(layer, "experts.routed", 0)`), from which every expert's own I/O follows.
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

from mtp_abliterate.search.candidate.experts import ROUTED, FusedExperts

ModuleKey = tuple[int, str, int]  # (layer, component, index within the component's module list)
ModuleIO = dict[ModuleKey, dict[str, torch.Tensor]]


def cache_key(
    model_id: str, weights_digest: str, good: Sequence[Prompt], bad: Sequence[Prompt], batch_size: int, host: str
) -> str:
    """Identity of a capture: the model, the prompts, the batch and the host (another machine's kernels round
    differently: a copied or shared runs folder is never reused across hosts)."""
    h = hashlib.sha256()
    h.update(json.dumps([model_id, weights_digest, batch_size, host]).encode())
    for p in (*good, None, *bad):
        h.update(json.dumps(None if p is None else [p.system, p.user]).encode())
    return h.hexdigest()[:24]


def _flat(key: ModuleKey, name: str) -> str:
    layer, component, index = key
    return f"{layer}|{component}|{index}|{name}"


def _capture(
    model: Model, modules: dict[ModuleKey, torch.nn.Module], experts: dict[int, FusedExperts], prompts: Sequence[Prompt]
) -> dict[ModuleKey, dict[str, torch.Tensor]]:
    """Last-token input/output of each module (the base layer, adapters bypassed), and each fused experts layer's
    last-token input rows and their top-k experts, over `prompts`."""
    rows: dict[ModuleKey, dict[str, list[torch.Tensor]]] = {}
    hooks = []
    batch = [0]  # prompts in the forward pass: fused experts see [batch * seq, H] rows
    for key, module in modules.items():
        rows[key] = {"in": [], "out": []}

        def hook(_mod, args, output, key=key) -> None:
            rows[key]["in"].append(args[0][:, -1, :].detach().cpu())
            rows[key]["out"].append(output[:, -1, :].detach().cpu())

        hooks.append(module.register_forward_hook(hook))
    for layer, fused in experts.items():
        key = (layer, ROUTED, 0)
        rows[key] = {"x": [], "topk": []}

        def routed(_mod, args, _output, key=key) -> None:
            x, topk = args[0], args[1]
            rows[key]["x"].append(x.view(batch[0], -1, x.shape[-1])[:, -1, :].detach().cpu())
            rows[key]["topk"].append(topk.view(batch[0], -1, topk.shape[-1])[:, -1, :].detach().cpu())

        hooks.append(fused.module.register_forward_hook(routed))
    try:
        for chunk in batchify(list(prompts), model.settings.batch_size):
            batch[0] = len(chunk)
            model.generate(chunk, max_new_tokens=1, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: {name: torch.cat(v) for name, v in sides.items()} for k, sides in rows.items()}


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
    model: Model,
    experts: dict[int, FusedExperts],
    good: Sequence[Prompt],
    bad: Sequence[Prompt],
    cache_dir: Path | None,
    key: str,
) -> tuple[ModuleIO, bool]:
    """Module I/O from `cache_dir/module_io-<key>.safetensors`, captured and written there if absent.

    Returns (io, whether it came from the cache)."""
    path = cache_dir / f"module_io-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        io: ModuleIO = {}
        for flat, tensor in load_file(path).items():
            layer, component, index, name = flat.split("|")
            io.setdefault((int(layer), component, int(index)), {})[name] = tensor
        if all((layer, ROUTED, 0) in io for layer in experts):  # a cache from before experts were recorded: recapture
            return io, True
    good_io = _capture(model, base_layers(model), experts, good)
    bad_io = _capture(model, base_layers(model), experts, bad)
    io = {
        k: {f"good_{n}": t for n, t in good_io[k].items()} | {f"bad_{n}": t for n, t in bad_io[k].items()}
        for k in good_io
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({_flat(k, n): t.contiguous() for k, d in io.items() for n, t in d.items()}, tmp)
        tmp.replace(path)  # atomic: a killed capture never leaves a half-written cache
    return io, False
