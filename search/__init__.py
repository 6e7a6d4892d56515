"""mtp-abliterate: an Optuna study over ARA abliterations of Gemma 4 scored on refusal rate, KL divergence and MTP
draft acceptance. The pipeline, stage by stage: docs/architecture.md."""
