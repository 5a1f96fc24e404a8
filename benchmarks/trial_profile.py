"""The trials of one layer of the authors' search, for a profiler to attach to, with their cost per trial.

    python benchmarks/trial_profile.py [--layer conv2.weight] [--batch-size 2000] [--images 20000]
                                       [--trials 124] [--global-pool avg|max] [--steps] [--data-dir DIR]
    perf record -F 499 -p PID -- sleep 20        # in another shell, once it prints "timing ... (pid PID)"

Builds the fast engine on ``paper_mnist_bn`` with ``rso.AUTHORS`` (batch-norm epsilon 1e-3; global pooling
``--global-pool``, average by default, max as the authors' code pools) on the first ``--images`` training images, starts the layer's pass, runs 20 trials to warm up, then ``--trials`` more,
and prints one JSON object per trial averages: seconds, user and system CPU seconds (all threads), and
minor page faults (a fresh array that is written costs the kernel a fault and a cleared page: system time
that shows where a trial allocates instead of reusing). Not a comparison: use ``bench_rso.py`` and
``bench_shortcut.py`` for ratios.

``--steps`` also times the steps of the timed trials: the trial's methods (``ChannelDelta`` and
``KeptChannels``), every convolution (by its shape), the batch-norm kernels, the staged fills, the patch
copies (im2col) and the ReLUs of ``fast_kernels``. It prints milliseconds, calls and minor page faults (the
process's, all threads) per trial for each, inclusive (a step's figures hold the steps it calls), sorted by
time. The timers cost a little themselves (a few microseconds per call), so the sum is a little above the
trials' own time.
"""

import argparse
import collections
import functools
import json
import os
import resource
import sys
import time

import numpy as np

from rso_np import fast_kernels as FK
from rso_np import rso_fast as RF
from rso_np.fast_kernels import parallel_cpu
from rso_np.models import build_model
from rso_np.rso import AUTHORS, RSOConfig
from rso_np.rso_fast import FastRSO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rso import training_images  # noqa: E402


TRIAL_STEPS = ("_kept", "_first_visit", "_output", "_output_staged", "_output_conv_weight", "_output_bn",
               "_through_mix", "_through_mix_staged", "_channel_change", "_dy", "_rest", "_rest_staged",
               "_rest_staged_bn", "_rest_unmixed")
KERNELS = ("bn_scale_shift", "candidates_bn_scale_shift", "bn_global_avg", "batch_norm", "conv_global_avg")


class StepTimer:
    """Seconds and calls per step name, from wrappers put around the engine's functions (``install``)."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls, self.faults = collections.Counter(), collections.Counter()

    def wrap(self, name, f):
        @functools.wraps(f)
        def timed(*args, **kwargs):
            t, m = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t
                self.faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - m
                self.calls[name] += 1
        return timed

    def install(self):
        """Wrap the trial's methods and the kernels of ``fast_kernels``, where ``rso_fast`` and
        ``fast_kernels`` look them up (for this process only)."""
        for cls in (RF.ChannelDelta, RF.KeptChannels):
            for name in TRIAL_STEPS:
                if name in vars(cls):
                    setattr(cls, name, self.wrap(name, vars(cls)[name]))
        for name in KERNELS:
            f = self.wrap(name, getattr(FK, name))
            setattr(FK, name, f)
            if hasattr(RF, name):
                setattr(RF, name, f)
        conv = FK.conv2d

        def conv2d(x, W, *args, **kwargs):
            N, C, H, Wd = x.shape
            label = f"conv2d {N} x {C} x {H}x{Wd} by {W.shape[0]} x {W.shape[2]}x{W.shape[3]}"
            return self.wrap(label, conv)(x, W, *args, **kwargs)
        FK.conv2d = RF.conv2d = conv2d
        for name in ("_by_row", "_by_tap"):               # the patch matrix's copy, per block
            make = getattr(FK, name)
            setattr(FK, name, lambda *a, make=make, name=name: self.wrap(f"im2col {name}", make(*a)))
        FK._relu = self.wrap("_relu", FK._relu)
        init = FK.Staged.__init__

        def staged_init(st, fill, shape, dtype):          # each staged fill, by the function that made it
            init(st, self.wrap("fill " + fill.__qualname__.split(".")[0], fill), shape, dtype)
        FK.Staged.__init__ = staged_init

    def report(self, trials):
        return {name: {"ms_per_trial": round(1000 * s / trials, 2),
                       "calls_per_trial": round(self.calls[name] / trials, 2),
                       "minor_faults_per_trial": round(self.faults[name] / trials, 1)}
                for name, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="conv2.weight")
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--images", type=int, default=20000, help="training images used (default: 20000)")
    ap.add_argument("--trials", type=int, default=124)
    ap.add_argument("--global-pool", choices=("avg", "max"), default="avg",
                    help="the network's global pooling (default: avg; the authors' code: max)")
    ap.add_argument("--steps", action="store_true", help="also time the steps of the timed trials (see above)")
    ap.add_argument("--data-dir", help="folder with the MNIST .gz files (default: $RSO_NP_DATA/mnist)")
    args = ap.parse_args(argv)
    x, y, source = training_images(args.data_dir)
    x, y = x[:args.images], y[:args.images]
    if args.batch_size > x.shape[0]:
        ap.error(f"--batch-size {args.batch_size} is larger than --images {x.shape[0]}")
    model = build_model("paper_mnist_bn", seed=0, bn_eps=1e-3, global_pool=args.global_pool)
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
        steps = StepTimer() if args.steps else None
        if steps:
            steps.install()
        print(f"timing {args.trials} trials of {args.layer} (pid {os.getpid()})", file=sys.stderr, flush=True)
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        eng.search_unit(unit, unit.sigma, count=args.trials)
        wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    n = args.trials
    print(json.dumps({"layer": args.layer, "batch_size": args.batch_size, "global_pool": args.global_pool,
                      "images": source, "trials": n,
                      "s_per_trial": wall / n, "user_s_per_trial": (r1.ru_utime - r0.ru_utime) / n,
                      "system_s_per_trial": (r1.ru_stime - r0.ru_stime) / n,
                      "minor_faults_per_trial": (r1.ru_minflt - r0.ru_minflt) / n,
                      **({"steps": steps.report(n)} if steps else {})}, indent=1))


if __name__ == "__main__":
    main()
