#!/usr/bin/env bash
# The GPU checks, as one call to a lent device machine (/work/.library/device/README.md).
#
# The device image has torch, timm, peft and safetensors but not pydantic, and no network, so:
#   1. here, once:  pip download "pydantic>=2.5,<3" -d .whl --python-version 3.12 \
#                     --platform manylinux_2_17_x86_64 --only-binary=:all:
#   2. run(command="bash benchmarks/device_checks.sh", carry=[".whl"], timeout_s=560)
#
# It runs the CUDA cases of the device tests (merging on the GPU against peft and float64
# references; engine runs in fp32, bf16 autocast and torch.compile against the CPU's accuracy
# matrices), then the GPU benchmarks: the merge from disk and of checkpoints already in GPU
# memory (against peft per tensor there), with GB/s next to the copy bandwidths measured in
# the same run, the LoRA training step and MultiLoRA serving. Logs land
# under $OUT; the figures go into benchmarks/RESULTS.md with the date and these commands.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=${OUT:-/tmp/device_checks}
mkdir -p "$out"

python3 -m pip install -q --no-index --find-links .whl "pydantic>=2.5,<3" \
  && python3 -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "install failed: was .whl carried?"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } | tee "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the whole log, show its end
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "exit $?"; tail -n 14 "$out/$name.log"
}

step tests 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_engine_devices.py tests/merging/test_merge_devices.py \
  tests/merging/test_merge_fused.py
step merge_bench 200 python3 benchmarks/merge_bench.py --size full --models 8 --device cuda --repeats 3 \
  --cases ta/baseline,ta/clpeft,ties/clpeft,ties-topk/clpeft,ta/baseline-memory,ta/clpeft-memory,ta/clpeft-memory-opbyop
step lora_step_bench 60 python3 benchmarks/lora_step_bench.py --device cuda
step multilora_bench 60 python3 benchmarks/multilora_bench.py --device cuda
