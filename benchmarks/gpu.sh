#!/usr/bin/env bash
# What only an NVIDIA GPU can check or measure, in two parts that each fit in a few minutes on an H100:
#
#   bash benchmarks/gpu.sh checks   # the whole test suite (its 6 GPU-only tests included), then the CLI on
#                                   # CUDA: train with and without the CUDA graph (same loss?), fp16 with
#                                   # its gradient scaler, --compile, resume, sampling on every spacing,
#                                   # guidance, editing, interpolation, explore, diffusers export/import
#   bash benchmarks/gpu.sh speed    # benchmarks/train_speed.py (the README's GPU table), attention.py
#                                   # (SDPA's fused kernels against its math path), forms.py (upsampling) and
#                                   # diffusers_import.py (our sampler against DDPMPipeline and DDIMPipeline)
#
# Each part writes one log per step to $OUT (default gpu-logs/) and prints a summary; it goes on past
# a failing step and exits non-zero if any failed. The project need not be installed: it runs from this
# checkout with PYTHONPATH. The speed part needs diffusers (`pip install -e '.[bench]'`); on a machine
# without an index, carry its wheels and install them first, e.g. from a machine with one:
#   pip download --no-deps --only-binary=:all: -d .whl diffusers importlib_metadata
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# QUICK=1 runs one row of each benchmark and fewer steps (to check this script itself, on any device).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-checks}
out=${OUT:-gpu-logs}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()

step() {  # step NAME COMMAND...: run it, log it, remember a failure
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-6}" "$out/$name.log"
  echo "-- $name: exit $rc, $((SECONDS - start)) s"
  [ $rc -eq 0 ] || failed+=("$name")
}
diffuse() { "$py" -m diffuse_cli "$@"; }
final_loss() { "$py" -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["loss"])' "$1"; }

"$py" - <<'EOF' | tee "$out/machine.log"
import platform, torch
from diffuse_cli.network.device import cuda_has_bf16
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"bf16 in hardware: {'yes' if cuda_has_bf16(torch.device('cuda', i)) else 'no'}")
if not torch.cuda.is_available():
    print("no CUDA GPU here: the GPU-only tests skip and the benchmarks run on the CPU")
EOF

if [ "${QUICK:-0}" = 1 ]; then
  grid=(--presets small --batches 16 --precisions bf16); steps=40; budget=20s
else
  grid=(); steps=600; budget=60s
fi

case $part in
checks)
  step tests "$py" -m pytest -q -p no:cacheprovider -rs
  # The README's claim: the graph replays the eager step, so both runs end at the same loss.
  common=(--model small --image-size 32 --batch-size 64 --steps "$steps" --save-every 100000 --sample-every 100000)
  step train-graph diffuse train "${common[@]}" --out "$work/graph"
  step train-eager diffuse train "${common[@]}" --out "$work/eager" --no-cuda-graph
  if [ -f "$work/graph/metrics.jsonl" ] && [ -f "$work/eager/metrics.jsonl" ]; then
    echo "final loss: graph $(final_loss "$work/graph/metrics.jsonl"), eager $(final_loss "$work/eager/metrics.jsonl")" \
      | tee "$out/graph-vs-eager.log"
  fi
  if "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then  # fp16 is for GPUs alone
    step train-fp16 diffuse train --precision fp16 --steps 200 --out "$work/fp16"
  fi
  step train-compile diffuse train --compile --steps 100 --out "$work/compile"
  step train-budget diffuse train --max-time "$budget" --out "$work/budget"
  step resume diffuse train --resume "$work/budget" --steps 2000 --max-time 15s
  for sampler in dpm++3m-sde heun unipc ddim; do  # trailing, karras and logsnr spacings; fractional steps
    step "sample-$sampler" diffuse sample -n 256 --sampler "$sampler" --checkpoint "$work/budget" --out "$work/s-$sampler"
  done
  step sample-bf16 diffuse sample -n 256 --precision bf16 --checkpoint "$work/budget" --out "$work/s-bf16"
  # The built-in shapes are classes: guidance (one batched call a step, under the graph too), then editing,
  # interpolation, the explorer's frames, and a diffusers round trip (export needs channels in 32s: base)
  step sample-guided diffuse sample -n 64 --class all --guidance 3 --checkpoint "$work/budget" --out "$work/s-guided"
  "$py" -c 'import sys, torch; from diffuse_cli.images.pictures import save_png
m = torch.zeros(1, 16, 16, dtype=torch.uint8); m[:, :, 8:] = 255; save_png(m, sys.argv[1])' "$work/mask.png"
  init="$work/s-dpm++3m-sde/0000.png"
  step edit-sdedit diffuse sample -n 16 --init "$init" --strength 0.5 --class circle --checkpoint "$work/budget" --out "$work/e-sdedit"
  step edit-inpaint diffuse sample -n 16 --init "$init" --mask "$work/mask.png" --checkpoint "$work/budget" --out "$work/e-inpaint"
  step interpolate diffuse interpolate --seeds 3 17 --checkpoint "$work/budget" --out "$work/interp"
  step explore diffuse explore --checkpoint "$work/budget" --out "$work/explore.html"
  step train-base diffuse train --model base --image-size 32 --steps 20 --out "$work/base"
  step export diffuse export "$work/base" "$work/base-diffusers"
  step import diffuse import "$work/base-diffusers" --out "$work/reimported"
  step sample-imported diffuse sample -n 16 --checkpoint "$work/reimported" --out "$work/s-imported"
  cp "$work/s-dpm++3m-sde/grid.png" "$out/grid.png" 2>/dev/null
  ;;
speed)
  step train_speed "$py" benchmarks/train_speed.py "${grid[@]}"
  step attention "$py" benchmarks/attention.py "${grid[@]}"
  step forms "$py" benchmarks/forms.py "${grid[@]}"
  device=$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
  step diffusers_import "$py" benchmarks/diffusers_import.py --device "$device" \
    $([ "${QUICK:-0}" = 1 ] && echo --ddpm-steps 20)
  ;;
*)
  echo "usage: bash benchmarks/gpu.sh checks|speed" >&2
  exit 2
  ;;
esac

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]} (logs in $out/)"
  exit 1
fi
echo "all passed (logs in $out/)"
