"""How a trial gets a vLLM server for its candidate: a cold start per candidate, or one study server with swaps.

Both give the trial pipeline the same narrow interface: `open(candidate, log_path)` returns a healthy server
serving that checkpoint with the vanilla draft, `release(server, failed)` after the measurement, `close()` at the
end of the study; `log_path_for(trial_log)` says where the server's log for a trial is. Their servers run beside
the resident model, so they take `serving.resident_gpu_memory_utilization` when it is set. They raise `ServerError`
(including `SwapError`) and know nothing of Optuna or MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mtp_abliterate.search.config import Serving as ServingSettings
from mtp_abliterate.search.serving.server import VllmServer

MEMORY_FLAG = "--gpu-memory-utilization"


def beside_resident(serving: ServingSettings) -> ServingSettings:
    """The serving settings for a server that shares the machine with the study's resident model."""
    share = serving.resident_gpu_memory_utilization
    if share is None:
        return serving
    args = [a for a in serving.vllm_args if not a.startswith(MEMORY_FLAG + "=")]
    if MEMORY_FLAG in args:
        i = args.index(MEMORY_FLAG)
        args = args[:i] + args[i + 2 :]
    return serving.model_copy(update={"vllm_args": [*args, MEMORY_FLAG, str(share)]})


class ServingMode(Protocol):
    """How a trial gets a server for its candidate (see the module doc)."""

    name: str

    def log_path_for(self, trial_log: Path) -> Path: ...

    def open(self, candidate: Path, log_path: Path) -> VllmServer: ...

    def release(self, server: VllmServer, failed: bool) -> None: ...

    def close(self) -> None: ...


class ColdServing:
    """A fresh server per candidate, stopped after its measurement: the reference behaviour. `draft`: the vanilla
    draft (config.model.draft), `label`: the study (docker labels its containers with it)."""

    name = "cold"

    def __init__(self, serving: ServingSettings, draft: str, label: str) -> None:
        self.serving, self.draft, self.label = serving, draft, label

    def log_path_for(self, trial_log: Path) -> Path:
        return trial_log

    def open(self, candidate: Path, log_path: Path) -> VllmServer:
        server = VllmServer(
            beside_resident(self.serving),
            str(candidate),
            self.draft,
            log_path,
            mounts=(candidate.parent,),  # a trial folder (an incremental candidate links into the FP8 base)
            label=self.label,
        )
        return server.start()

    def release(self, server: VllmServer, failed: bool) -> None:
        server.stop()

    def close(self) -> None:
        pass


class SwapServing:
    """One server for the study, started on the vanilla checkpoint `base`; each candidate is swapped in place.

    The server is (re)started lazily: at the first candidate, and after it died or was closed (a failed trial,
    the cold self-check, which needs the memory). `draft` and `label` as for `ColdServing`."""

    name = "swap"

    def __init__(self, serving: ServingSettings, draft: str, label: str, base: Path, log_path: Path) -> None:
        self.serving, self.draft, self.label = serving, draft, label
        self.base, self.log_path = base, log_path
        self.server: VllmServer | None = None

    def log_path_for(self, trial_log: Path) -> Path:
        return self.log_path  # the study server's log holds every swap

    def open(self, candidate: Path, log_path: Path) -> VllmServer:
        if self.server is None or not self.server.alive():
            self.close()
            self.server = VllmServer(
                beside_resident(self.serving),
                str(self.base),
                self.draft,
                self.log_path,
                swappable=True,
                mounts=(self.base.parent,),  # the study folder: candidates are swapped in from trials/
                label=self.label,
            ).start()
        self.server.swap(candidate)
        return self.server

    def release(self, server: VllmServer, failed: bool) -> None:
        if failed and not server.alive():
            self.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
