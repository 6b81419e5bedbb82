#!/usr/bin/env bash
# GPU check (issue 9), in one go on a CUDA machine, within 8 minutes: the GPU-marked tests,
# bench_embed.py (DOFA-Base, bf16, 20,736 tiles) and the GPU part of bench_train.py, printing
# every figure.
#
# The lent GPU machines have Python 3.12 and torch but neither Prefect, rasterio nor zarr, and no
# network. This script imports only torch, numpy and the Zarr stack (zarr, numcodecs, xarray,
# dask), writes its own synthetic image store, and runs botaclip from the working tree
# (PYTHONPATH, nothing installed). The Zarr stack travels as wheels in benchmarks/wheels/,
# which git ignores (benchmarks/wheels/.gitignore); fetch them once on a machine with pip:
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d benchmarks/wheels \
#     zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 xarray==2026.9.0 \
#     dask==2026.8.0 partd==1.4.2 locket==1.0.0 affine==3.0.1 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
#
# and have the device tool send them: run(command="bash benchmarks/gpu_check.sh",
# carry=["benchmarks/wheels"], timeout_s=540). (pydantic is for bench_train.py's settings.)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! $PY -c "import zarr, numcodecs, xarray, dask, affine" 2>/dev/null; then
  if ! ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    echo "the Zarr stack is missing and benchmarks/wheels/ holds no wheels (see this script's header)"
    exit 2
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/botaclip-site benchmarks/wheels/*.whl || exit 2
  export PYTHONPATH=/tmp/botaclip-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 2

status=0
start=$(date +%s)
echo "== GPU tests (pytest -m gpu tests/test_gpu.py)"
# the project's addopts name plugins a bare machine may lack; the GPU tests need none of them
timeout 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_gpu.py || status=1

echo "== bench_embed.py: DOFA-Base, bf16, batch 256, 20,736 tiles (and the 4x region for RSS)"
timeout 300 $PY benchmarks/bench_embed.py --device cuda || status=1

echo "== bench_train.py: the GPU part (full fine-tuning steps of DOFA-Base, bf16 autocast)"
if $PY -c "import botaclip_core.finetune" 2>/tmp/bench_train_import.txt; then
  timeout 90 $PY benchmarks/bench_train.py --device cuda --steps 10 || status=1
else
  echo "bench_train.py skipped: botaclip_core.finetune does not import here:"
  tail -n 1 /tmp/bench_train_import.txt
  status=1
fi
echo "== gpu_check: $(( $(date +%s) - start )) s, status $status"
exit $status
