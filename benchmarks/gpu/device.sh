#!/usr/bin/env bash
# The GPU machine's side of benchmarks/bench_gpu.py (issue #37), run from the repository root there, one call at a
# time while the machine is held: keep what this call carried under /root/gpu-bench (the vLLM payload's chunks,
# .whl/vx.0?; the study's Python packages, .gpuwhl/site.tar.xz; the real shapes' plan, .gpu/shapes), unpack the
# payload once its four chunks are there, then run one step:
#   benchmarks/gpu/device.sh stage              keep this call's files, nothing else
#   benchmarks/gpu/device.sh probe  [ARGS...]   bench_gpu.py study --probe (no vLLM needed)
#   benchmarks/gpu/device.sh study  [ARGS...]   bench_gpu.py study (the product's `study run`)
#   benchmarks/gpu/device.sh shapes [ARGS...]   bench_gpu.py shapes
# The study process gets the carried packages only (their compressed-tensors is newer than vLLM 0.32's); its vLLM
# servers get the payload (bench_gpu.py writes it into serving.env). .gpuwhl/site.tar.xz: the wheels the study needs
# beyond the machine's packages (README of benchmarks/gpu/), installed with pip --target for Python 3.12 x86_64.
set -uo pipefail
step=${1:?usage: device.sh stage|probe|study|shapes [ARGS...]}
shift
keep=${GPU_BENCH_KEEP:-/root/gpu-bench}  # survives between calls while the machine is held
mkdir -p $keep/chunks $keep/ckpts
for f in .whl/vx.0? .whl/vx.sha256; do
    if [ -f "$f" ]; then cp "$f" $keep/chunks/; fi
done
if [ -f .gpuwhl/site.tar.xz ] && [ ! -d $keep/site ]; then
    mkdir -p $keep/site.part && tar -xJf .gpuwhl/site.tar.xz -C $keep/site.part && mv $keep/site.part $keep/site
fi
if [ -d .gpu/shapes ]; then cp -r .gpu/shapes .gpu/heretic_config.py $keep/ckpts/; fi
chunks=$(ls $keep/chunks/vx.0? 2>/dev/null | wc -l)
if [ ! -d $keep/vllm ] && [ "$chunks" = 4 ]; then
    sum=$(cat $keep/chunks/vx.0? | sha256sum | cut -d' ' -f1)
    if [ "$sum" != "$(cut -d' ' -f1 $keep/chunks/vx.sha256)" ]; then echo "payload sha256 differs: $sum"; exit 3; fi
    mkdir -p $keep/vllm.part && cat $keep/chunks/vx.0? | tar -xJ -C $keep/vllm.part && mv $keep/vllm.part $keep/vllm
fi
echo "kept: $chunks of 4 payload chunks; payload unpacked: $([ -d $keep/vllm ] && echo yes || echo no);" \
    "study packages: $([ -d $keep/site ] && echo yes || echo no)"
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
case $step in
    stage) ;;
    probe) PYTHONPATH=$keep/site exec python3 benchmarks/bench_gpu.py study --probe --payload $keep/vllm \
        --runs $keep/runs "$@" ;;
    study) PYTHONPATH=$keep/site exec python3 benchmarks/bench_gpu.py study --payload $keep/vllm --runs $keep/runs "$@" ;;
    # the payload first (vLLM's own compressed-tensors); the carried packages after it for the product's config
    # loader (tomli-w)
    shapes) PYTHONPATH=$keep/vllm:$keep/site exec python3 benchmarks/bench_gpu.py shapes --ckpts $keep/ckpts "$@" ;;
    *) echo "unknown step $step: stage, probe, study or shapes"; exit 2 ;;
esac
