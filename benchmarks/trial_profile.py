"""The trials of one layer of the authors' search, for a profiler to attach to, with their cost per trial.

    python benchmarks/trial_profile.py [--layer conv2.weight] [--batch-size 2000] [--images 20000]
                                       [--trials 124] [--data-dir DIR]
    perf record -F 499 -p PID -- sleep 20        # in another shell, once it prints "timing ... (pid PID)"

Builds the fast engine on ``paper_mnist_bn`` with ``rso.AUTHORS`` (batch-norm epsilon 1e-3) on the first
``--images`` training images, starts the layer's pass, runs 20 trials to warm up, then ``--trials`` more,
and prints one JSON object per trial averages: seconds, user and system CPU seconds (all threads), and
minor page faults (a fresh array that is written costs the kernel a fault and a cleared page: system time
that shows where a trial allocates instead of reusing). Not a comparison: use ``bench_rso.py`` and
``bench_shortcut.py`` for ratios.
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

from rso_np.fast_kernels import parallel_cpu
from rso_np.models import build_model
from rso_np.rso import AUTHORS, RSOConfig
from rso_np.rso_fast import FastRSO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rso import training_images  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="conv2.weight")
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--images", type=int, default=20000, help="training images used (default: 20000)")
    ap.add_argument("--trials", type=int, default=124)
    ap.add_argument("--data-dir", help="folder with the MNIST .gz files (default: $RSO_NP_DATA/mnist)")
    args = ap.parse_args(argv)
    x, y, source = training_images(args.data_dir)
    x, y = x[:args.images], y[:args.images]
    if args.batch_size > x.shape[0]:
        ap.error(f"--batch-size {args.batch_size} is larger than --images {x.shape[0]}")
    model = build_model("paper_mnist_bn", seed=0, bn_eps=1e-3)
    model.train()
    cfg = RSOConfig(batch_size=args.batch_size, **dict(AUTHORS, bn_reference_images=min(2000, x.shape[0])))
    eng = FastRSO(model, x, y, cfg, np.random.default_rng(0), rounds=1)
    names = [u.name for u in eng.units]
    if args.layer not in names:
        ap.error(f"--layer {args.layer!r}: not searched; choose one of {', '.join(names)}")
    unit = eng.units[names.index(args.layer)]
    with parallel_cpu():
        eng.start_pass(unit)
        eng.search_unit(unit, unit.sigma, count=20)
        print(f"timing {args.trials} trials of {args.layer} (pid {os.getpid()})", file=sys.stderr, flush=True)
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        eng.search_unit(unit, unit.sigma, count=args.trials)
        wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    n = args.trials
    print(json.dumps({"layer": args.layer, "batch_size": args.batch_size, "images": source, "trials": n,
                      "s_per_trial": wall / n, "user_s_per_trial": (r1.ru_utime - r0.ru_utime) / n,
                      "system_s_per_trial": (r1.ru_stime - r0.ru_stime) / n,
                      "minor_faults_per_trial": (r1.ru_minflt - r0.ru_minflt) / n}, indent=1))


if __name__ == "__main__":
    main()
