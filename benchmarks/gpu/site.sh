#!/usr/bin/env bash
# Builds .gpuwhl/site.tar.xz (~22 MB): what the study process (`bench_gpu.py study`) needs on the GPU machine beyond
# that machine's own packages (torch 2.11.0+cu130, transformers 5.17.0, peft, accelerate, pandas, matplotlib...,
# /work/.library/device/KINDS.md), for its Python 3.12 on x86_64: the product's pins from pyproject.toml, and from the
# vLLM payload (.whl/vx.0?, ../shared/gpu-vllm/prep.sh) the pydantic/OpenTelemetry/FastAPI stack MLflow and heretic
# import, so the study needs no payload on its path. Left out: optuna-dashboard, plotly's Jupyter files, MLflow's web
# UI (mlflow/server/js) and bitsandbytes' libraries other than CUDA 13.0's and the CPU one (heretic imports it; the
# study never quantizes to 4 bits). Run from the repository root, where pip reaches a package index.
set -euo pipefail
out=.gpuwhl
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
wheels=(heretic-llm==1.4.0 optuna==4.9.0 alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 colorlog==6.12.0
        mlflow==3.17.2 plotly==6.9.0 datasets==4.8.5 multiprocess==0.70.19 questionary==2.1.1 prompt_toolkit==3.0.53
        wcwidth==0.9.5 tomli_w==1.2.0 bitsandbytes==0.50.2 llmcompressor==0.14.0.1 compressed-tensors==0.19.0
        databricks-sdk==0.167.0 google-auth==2.63.1 importlib_metadata==9.1.0 sqlparse==0.6.1 pytz==2026.6)
from_payload=(opentelemetry_api opentelemetry_sdk opentelemetry_proto opentelemetry_semantic_conventions pydantic
              pydantic_core annotated_types typing_inspection pydantic_settings python_dotenv cachetools dill loguru
              fastapi starlette cryptography cffi pycparser)
mkdir -p $out/wheels
python3 -m pip download -q --no-deps "${plat[@]}" -d $out/wheels "${wheels[@]}"
rm -rf $out/site $out/payload
python3 -m pip install -q --no-deps --no-index --no-compile --target $out/site "${plat[@]}" $out/wheels/*.whl
mkdir $out/payload && cat .whl/vx.0? | tar -xJ -C $out/payload
python3 - $out/payload $out/site "${from_payload[@]}" <<'EOF'
import csv, shutil, sys
from pathlib import Path

src, dst, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
for name in names:  # each distribution's files, as its RECORD lists them
    (info,) = [d for d in src.glob("*.dist-info") if d.name.split("-")[0].lower() == name]
    for row in csv.reader((info / "RECORD").open()):
        if (src / row[0]).is_file():
            (dst / row[0]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / row[0], dst / row[0])
EOF
rm -rf $out/payload $out/site/share $out/site/mlflow/server/js
find $out/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
find $out/site -name __pycache__ -prune -exec rm -rf {} +
tar -c -C $out/site . | xz -T0 -6 > $out/site.tar.xz
ls -l $out/site.tar.xz
