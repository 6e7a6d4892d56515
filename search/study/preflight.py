"""What a study checks before anything heavy loads: the method and both stores. `study run` runs these before it
imports the model stack (heretic, transformers, peft: about 12 s of imports on a CPU core), so a broken config or an
unreachable database fails in seconds; the runner runs them too, for its other callers."""

from __future__ import annotations

from optuna.storages import RDBStorage

from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.study.errors import StudyError
from mtp_abliterate.search.study.storage import StorageError, open_storage, tracking_uri
from mtp_abliterate.search.study.tracking import TrackingError, check_tracking


def check_method(cfg: StudyConfig) -> None:
    """The study searches ARA parameters (and heretic's directional ablation through `search.methods`)."""
    if cfg.abliteration.method != "ara":
        raise StudyError(
            f"the study searches ARA parameters, but abliteration.method = {cfg.abliteration.method!r}; "
            "set it to 'ara' (the study searches heretic's directional ablation too: `search.methods`)"
        )


def open_stores(cfg: StudyConfig) -> RDBStorage:
    """The study's Optuna storage, once both it and the MLflow store answered. Raises StudyError naming the fix."""
    try:
        storage = open_storage(cfg)
        check_tracking(tracking_uri(cfg))
    except (StorageError, TrackingError) as e:
        raise StudyError(str(e)) from None
    return storage
