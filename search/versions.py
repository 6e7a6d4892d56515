"""Versions of the software a result depends on, recorded next to every result."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import optuna

from mtp_abliterate.search.errors import UserError

PACKAGES = ("torch", "transformers", "heretic-llm", "llmcompressor", "compressed-tensors", "optuna", "mlflow")


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


class OptunaVersionError(UserError, RuntimeError):
    """The installed Optuna is older than the study code needs."""


def require_optuna_5() -> None:
    """Samplers read each trial's constraints through Optuna 5's `Trial.set_constraint`. heretic-llm 1.4.0 caps
    Optuna below 5 (`optuna~=4.7`, a cap, not an incompatibility), so a plain `pip install` resolves Optuna 4."""
    if int(optuna.__version__.split(".")[0]) < 5:
        raise OptunaVersionError(
            f"Optuna {optuna.__version__} is installed and the study needs Optuna 5 (heretic-llm 1.4.0 caps it below "
            "5): run `pip install --no-deps optuna==5.1.0` in this environment, as `make venv` does"
        )
