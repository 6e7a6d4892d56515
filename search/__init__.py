"""mtp-abliterate: an Optuna study over ARA abliterations of Gemma 4 scored on refusal rate, KL divergence and MTP
draft acceptance. The pipeline, stage by stage: docs/architecture.md."""

import logging

# bitsandbytes (imported by heretic.model) warns at import that a CPU kernel could not be fetched from the hub, the
# normal state of a machine without internet (its CPU ops work without it). Set before any submodule imports heretic.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
