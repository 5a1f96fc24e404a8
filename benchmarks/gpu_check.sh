#!/usr/bin/env bash
# One prepared GPU check, sized for about 8 minutes on one card (each step has its own time limit).
# Writes 7 result files under $OUT (8 with its own output tee'd there as a log).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh            # on a machine with CuPy and a CUDA device
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --dry-run        # anywhere: says what it would run, runs the CPU parts
#   STEPS="paper conv" OUT=... bash benchmarks/gpu_check.sh  # only these steps (a rerun of what failed)
#
# Steps: tests (gpu-marked tests, ~2.5 min), paper (the authors' search at minibatch 5000, fast engine and
# PyTorch), conv (convolution kernel against PyTorch's), bench (both engines and PyTorch at minibatch 256),
# train (train --preset paper for 50 s), parity (NumPy against CuPy, decision by decision).
#
# MNIST: the four .gz files in gpu_data/mnist (a git-ignored folder; copy them there before the run),
# else $RSO_NP_DATA/mnist. rso_np is used from this checkout (PYTHONPATH), nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
DATA=gpu_data/mnist
if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
  DATA=${RSO_NP_DATA:+$RSO_NP_DATA/mnist}
  if [ -z "$DATA" ] || [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
    echo "no MNIST files: copy the four .gz files into gpu_data/mnist (and name gpu_data in carry) or set RSO_NP_DATA" >&2
    DATA=gpu_data/mnist
  fi
fi
export RSO_NP_DATA=$(dirname "$DATA")       # the tests' real-MNIST cases look in $RSO_NP_DATA/mnist
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PYTHON:-$(command -v python3 || command -v python)}
STEPS=${STEPS:-tests paper conv bench train parity}
step() { echo; echo "=== $* ($(date +%T))"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

step "card, driver, CuPy"
if [ $DRY = 1 ] || ! $PY -c "from rso_np.backend import gpu_available as g; raise SystemExit(0 if g() else 1)"; then
  echo "no usable GPU (or --dry-run): GPU steps are skipped, CPU parts still run"
  GPU=0
else
  GPU=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import cupy, numpy, json; print(json.dumps({'cupy': cupy.__version__, 'numpy': numpy.__version__, 'cuda_runtime': cupy.cuda.runtime.runtimeGetVersion(), 'device': cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}))" | tee "$OUT/cupy.json"
fi

step "tests: gpu-marked (kernels against SciPy and loops, engine equality, on CuPy)"
if ! want tests; then echo "not in STEPS"
elif [ $GPU = 1 ]; then
  timeout 200 $PY -m pytest -q -m gpu -p no:cacheprovider --durations=12 >"$OUT/gpu_tests.txt" 2>&1
  echo "pytest exit $?"; tail -25 "$OUT/gpu_tests.txt"
else
  echo "skipped: no GPU"
fi

step "paper: the authors' search on paper_mnist_bn, minibatch 5000: fast engine and PyTorch, both on the device"
if ! want paper; then echo "not in STEPS"
elif [ $GPU = 1 ]; then
  timeout 100 $PY benchmarks/bench_rso.py --device gpu --preset paper --engines fast --torch --data-dir "$DATA" \
    --trials 5 --out "$OUT/bench_gpu_paper.json" >/dev/null
  echo "exit $?"; $PY -c "import json; r=json.load(open('$OUT/bench_gpu_paper.json')); print(r['round_s'])"
else
  echo "skipped: no GPU"
fi

step "conv: functional.conv2d (im2col + cuBLAS) against PyTorch's conv2d (cuDNN)"
if ! want conv; then echo "not in STEPS"
elif [ $GPU = 1 ]; then
  timeout 40 $PY benchmarks/bench_conv.py --device gpu --torch >"$OUT/bench_conv_gpu.json"
  echo "exit $?"; tail -12 "$OUT/bench_conv_gpu.json"
else
  echo "skipped: no GPU"
fi

step "bench: both engines and PyTorch on the device, paper_mnist, minibatch 256"
if ! want bench; then echo "not in STEPS"
elif [ $GPU = 1 ]; then
  timeout 60 $PY benchmarks/bench_rso.py --device gpu --data-dir "$DATA" --trials 10 --torch --out "$OUT/bench_gpu.json" \
    >/dev/null 2>&1
  echo "exit $?"; $PY -c "import json; print(json.load(open('$OUT/bench_gpu.json'))['round_s'])"
else
  echo "skipped: no GPU"
fi

step "train: --preset paper on full MNIST for about 50 seconds"
RUN=${TMPDIR:-/tmp}/rso_np_paper_run
if ! want train; then echo "not in STEPS"
elif [ $GPU = 1 ]; then
  RESUME=""
  [ -f "$RUN/checkpoint.npz" ] && RESUME="--resume"
  timeout 50 $PY -m rso_np train --preset paper --device gpu --data-dir "$DATA" --out "$RUN" $RESUME
  echo "(a stop by the time limit keeps the last finished layer pass in $RUN/checkpoint.npz)"
  cp "$RUN/history.json" "$OUT/paper_run_history.json" 2>/dev/null
else
  echo "skipped: no GPU (would run: $PY -m rso_np train --preset paper --device gpu --data-dir $DATA --out $RUN)"
fi

step "parity: NumPy against CuPy, small_mnist, 500 images, minibatch 50, one round"
if ! want parity; then echo "not in STEPS"
elif [ $GPU = 1 ]; then
  timeout 60 $PY benchmarks/parity.py --model small_mnist --data-dir "$DATA" --train-limit 500 --batch-size 50 \
    --out "$OUT/parity.json" >/dev/null
  echo "exit $?"; cat "$OUT/parity.json" 2>/dev/null | tail -8
else
  echo "skipped: no GPU"
fi
step "done: results in $OUT"
ls -la "$OUT"
