"""Where a model's files are, what identifies them, and what layout they have.

A model is named by a local folder or by a Hugging Face hub id. Hub ids are looked up in the local HF cache only
(`HF_HOME/hub/models--org--name/snapshots/<commit>/`, as `hf download` leaves it), never downloaded: a study must
not depend on the network at 23:00. A hub id's identity is its snapshot's commit, so a snapshot update invalidates
the FP8 base and the module I/O cache like a changed local checkpoint does.

Gemma 4's release checkpoints are `Gemma4ForConditionalGeneration`: a `text_config` and a `vision_config`, the
language model under `model.language_model.*`. `text_only_view` gives a runtime that cannot load the multimodal
architecture (vLLM's CPU build has no torchvision) the same files as a `Gemma4ForCausalLM`: a rewritten config.json
beside symlinks to everything else (vLLM's text model maps `model.language_model.*` and skips the towers itself).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from mtp_abliterate.search.config import HF_ID
from mtp_abliterate.search.errors import UserError

CONFIG = "config.json"


class CheckpointError(UserError, RuntimeError):
    """A model that cannot be found or read; the message names the fix."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the local folder with config.json
    hub_id: str | None = None  # when named by hub id
    revision: str | None = None  # the cached snapshot's commit (hub ids)

    @property
    def identity(self) -> str:
        """Changes whenever the weights may have: the snapshot commit, or the local weight files' sizes+mtimes."""
        if self.hub_id:
            return f"{self.hub_id}@{self.revision}"
        files = sorted(self.path.glob("*.safetensors"))
        return json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def locate(ref: str | Path) -> Checkpoint:
    """A local folder as is; a hub id from the local HF cache (never downloaded)."""
    path = Path(ref)
    if path.is_dir():
        return Checkpoint(path)
    if not HF_ID.match(str(ref)):
        raise CheckpointError(
            f"{ref} does not exist; fix the path (or name a hub id such as google/gemma-4-26B-A4B-it)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        snapshot = Path(snapshot_download(str(ref), local_files_only=True, cache_dir=cache))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{ref} is not in the local Hugging Face cache ({cache}); download it first with "
            f"`hf download {ref}` (set HF_HOME to the cache that holds it), or name its folder instead"
        ) from None
    return Checkpoint(snapshot, hub_id=str(ref), revision=snapshot.name)


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub resolves it, read now (its own constant is fixed at import)."""
    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{CONFIG} cannot be read ({e}); is this a model folder?") from None


def is_multimodal(path: Path) -> bool:
    """A release-layout checkpoint (text_config + vision/audio towers), heretic's and transformers' criterion."""
    cfg = read_config(path)
    return "text_config" in cfg and any(cfg.get(k) for k in ("vision_config", "audio_config"))


def text_config(path: Path) -> dict:
    cfg = read_config(path)
    return cfg.get("text_config", cfg)


def text_only_view(path: Path, out: Path) -> Path:
    """`out`: the text model of the multimodal checkpoint `path`, every file but config.json a symlink into `path`."""
    cfg = read_config(path)
    text = dict(cfg["text_config"])
    text["architectures"] = [a.replace("ForConditionalGeneration", "ForCausalLM") for a in cfg.get("architectures", [])]
    for key in ("quantization_config", "tie_word_embeddings", "dtype", "torch_dtype"):
        if key in cfg:
            text[key] = cfg[key]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in sorted(path.iterdir()):
        if f.name != CONFIG:
            os.symlink(f.absolute(), out / f.name)
    (out / CONFIG).write_text(json.dumps(text, indent=2, sort_keys=True) + "\n")
    return out


def tensor_layout(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor's (dtype, shape), from the safetensors headers only."""
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                out[key] = (s.get_dtype(), tuple(s.get_shape()))
    return out
