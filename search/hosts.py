"""Which host this process is: the key of everything a study keeps per machine.

Several hosts share one study (PostgreSQL storage); what each builds for itself (the FP8 base, the module I/O cache,
the swap self-check's verdict) is keyed by this name so no host ever reuses another's. Default: the machine's
hostname. `MTP_ABLITERATE_HOST` overrides it where the hostname is not stable (a docker container gets a new one
per run) or not unique (two study processes on one machine, each with its own GPU and runs folder).
"""

from __future__ import annotations

import os
import socket

HOST_ENV = "MTP_ABLITERATE_HOST"


def host_id() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()
