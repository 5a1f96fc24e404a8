#!/usr/bin/env bash
# One prepared GPU check, sized for about 8 minutes on one card. Writes JSON results under $OUT.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh            # on a machine with CuPy and a CUDA device
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --dry-run        # anywhere: says what it would run, runs the CPU parts
#
# MNIST: the four .gz files in gpu_data/mnist (a git-ignored folder; copy them there before the run),
# else $RSO_NP_DATA/mnist.
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
PY=${PYTHON:-python}
export MPLBACKEND=Agg
step() { echo; echo "=== $* ($(date +%T))"; }

step "install rso_np"
$PY -m pip install -q --no-deps -e . >/dev/null 2>&1 || $PY -m pip install -q -e . || exit 1

step "card, driver, CuPy"
if [ $DRY = 1 ] || ! $PY -c "from rso_np.backend import gpu_available as g; raise SystemExit(0 if g() else 1)"; then
  echo "no usable GPU (or --dry-run): GPU steps are skipped, CPU parts still run"
  GPU=0
else
  GPU=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.csv"
  $PY -c "import cupy, json; print(json.dumps({'cupy': cupy.__version__, 'cuda_runtime': cupy.cuda.runtime.runtimeGetVersion(), 'device': cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}))" | tee "$OUT/cupy.json"
fi

step "gpu-marked tests"
if [ $GPU = 1 ]; then
  timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
else
  echo "skipped: no GPU"
fi

step "parity: NumPy vs CuPy, paper_mnist, 2000 images, one round"
if [ $GPU = 1 ]; then
  timeout 150 $PY benchmarks/parity.py --data-dir "$DATA" --train-limit 2000 --batch-size 256 --out "$OUT/parity.json"
else
  echo "skipped: no GPU"
fi

step "benchmark: both engines on the device, paper_mnist, minibatch 256"
if [ $GPU = 1 ]; then
  timeout 150 $PY benchmarks/bench_rso.py --device gpu --data-dir "$DATA" --trials 20 --out "$OUT/bench_gpu.json" >/dev/null
  tail -c 400 "$OUT/bench_gpu.json"
else
  echo "skipped: no GPU"
fi

step "benchmark: the authors' search on paper_mnist_bn, minibatch 5000, fast engine"
if [ $GPU = 1 ]; then
  timeout 120 $PY benchmarks/bench_rso.py --device gpu --preset paper --engines fast --data-dir "$DATA" --trials 5 \
    --out "$OUT/bench_gpu_paper.json" >/dev/null
  tail -c 300 "$OUT/bench_gpu_paper.json"
else
  echo "skipped: no GPU"
fi

step "train --preset paper on full MNIST for about 3 minutes"
RUN="$OUT/paper-run"
if [ $GPU = 1 ]; then
  RESUME=""
  [ -f "$RUN/checkpoint.npz" ] && RESUME="--resume"
  timeout 180 $PY -m rso_np train --preset paper --device gpu --data-dir "$DATA" --out "$RUN" $RESUME
  echo "(a stop by the time limit keeps the last finished layer pass in $RUN/checkpoint.npz)"
else
  echo "skipped: no GPU (would run: $PY -m rso_np train --preset paper --device gpu --data-dir $DATA --out $RUN)"
fi
step "done: results in $OUT"
ls -la "$OUT"
