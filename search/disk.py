"""Free disk space under the study's folder: a full disk stops the study instead of failing trial after trial."""

from __future__ import annotations

import shutil
from pathlib import Path

from mtp_abliterate.search.errors import UserError


class DiskFullError(UserError, RuntimeError):
    """No space left under the study's folder; the message names the fix."""


def free_gb(path: Path) -> float:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / 1e9


def require_free_space(path: Path, min_gb: float) -> None:
    """Raise DiskFullError when less than `min_gb` is free under `path` (retention.min_free_gb)."""
    if (free := free_gb(path)) < min_gb:
        raise DiskFullError(
            f"only {free:.1f} GB free under {path} (retention.min_free_gb = {min_gb}); free space, move runs_dir, or "
            "keep fewer checkpoints (retention.keep)"
        )
