#!/usr/bin/env bash
# The GPU check (issue 27 item 5): on a CUDA machine with nothing but this repository, in under 10 minutes, fp16
# txt2img with an embedding and a hypernetwork on random full-size SD 1.5 (512 px) and SDXL (1024 px) models, textual
# inversion 50 steps (diffusers' example's step, ours eager, ours compiled) with peak memory, printed as one table.
# Nothing is downloaded but the Python packages: the models are random weights built on the GPU from the configs in
# sdconcepts/assets/configs (tools/gpu_check.py says what each row does).
#
#   tools/gpu_check.sh            # CUDA; creates .venv with the project (and pip's default torch, a CUDA build on
#                                 # Linux x86-64) when no Python here can import it
#   tools/gpu_check.sh --cpu      # the same rows on the tiny test models on the CPU (CI runs this, ~1-2 min)
#   PYTHON=/path/to/python tools/gpu_check.sh ...   # an environment that already has the project installed
#
# Other options go to tools/gpu_check.py (--parts txt2img,train, --train-steps N, --batch N, --compile-backend B).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

importable() { "$1" -c 'import torch, diffusers, transformers, sdconcepts' >/dev/null 2>&1; }

python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in .venv/bin/python python3; do
        if command -v "$candidate" >/dev/null 2>&1 && importable "$candidate"; then python=$candidate; break; fi
    done
fi
if [ -z "$python" ]; then
    echo "gpu_check: no Python here imports the project; creating .venv (pip install -e .)" >&2
    python3 -m venv .venv
    .venv/bin/pip install -q -e . || { echo "gpu_check: installing the project into .venv failed" >&2; exit 1; }
    python=.venv/bin/python
fi
# Where the project is imported from: this checkout, whatever was installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" tools/gpu_check.py "$@"
