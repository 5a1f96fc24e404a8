"""NumPy against CuPy: the same seed, one round of RSO (fast engine), the share of identical decisions.

    python benchmarks/parity.py [--model paper_mnist] [--train-limit 2000] [--batch-size 256]
                                [--preset paper] [--data-dir DIR] [--out FILE]

The CPU run is the reference. The GPU run draws the same numbers (one host-side generator) and records its
own decision for every trial, then applies the CPU's, so that every trial is compared on identical
weights (without this, one float tie would make all later trials differ). Prints one JSON object: the
share of identical decisions, the largest relative difference of the three losses, and the largest weight
difference after the round. ``--preset paper`` runs the authors' search (``rso.AUTHORS``) on
``paper_mnist_bn`` with batch-norm epsilon 1e-3, its reference batch cut to the training images used.
Needs CuPy and a CUDA device.
"""

import argparse
import sys

import numpy as np

from rso_np import rso_fast
from rso_np.backend import get_xp, to_numpy
from rso_np.models import build_model
from rso_np.rso import AUTHORS, RSOConfig

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_rso import emit, training_images  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="default: paper_mnist (--preset paper: paper_mnist_bn)")
    ap.add_argument("--preset", choices=("paper",), help="the authors' search on paper_mnist_bn")
    ap.add_argument("--train-limit", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--data-dir")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cp = get_xp("gpu")
    x, y, source = training_images(args.data_dir)
    x, y = x[:args.train_limit], y[:args.train_limit]
    paper = args.preset == "paper"
    args.model = args.model or ("paper_mnist_bn" if paper else "paper_mnist")
    extra = dict(AUTHORS, bn_reference_images=min(AUTHORS["bn_reference_images"], len(x))) if paper else {}
    cfg = RSOConfig(batch_size=args.batch_size, **extra)
    bn_eps = 1e-3 if paper else None

    log = []                                   # (f, choice) of every CPU trial
    real = rso_fast.choose_device

    def record(f):
        k = real(f)
        log.append((to_numpy(f).copy(), int(k)))
        return k

    cpu_model = build_model(args.model, seed=0, bn_eps=bn_eps)
    rso_fast.choose_device = record
    rso_fast.FastRSO(cpu_model, x, y, cfg, np.random.default_rng(5)).run_round(1)

    seen = []

    def forced(f):
        own = real(f)
        ref_f, ref_k = log[len(seen)]
        seen.append((to_numpy(f).copy(), int(own), ref_f, ref_k))
        return cp.asarray(ref_k)

    gpu_model = build_model(args.model, seed=0, bn_eps=bn_eps).to(cp)
    rso_fast.choose_device = forced
    rso_fast.FastRSO(gpu_model, cp.asarray(x), cp.asarray(y), cfg, np.random.default_rng(5)).run_round(1)
    rso_fast.choose_device = real
    same = sum(own == k for _, own, _, k in seen)
    rel = max(float(np.abs(f - rf).max() / np.abs(rf).max()) for f, _, rf, _ in seen)
    wdiff = max(float(np.abs(to_numpy(v) - to_numpy(gpu_model.parameters()[k])).max())
                for k, v in cpu_model.parameters().items())
    res = {"model": args.model, "engine": "fast", "search": cfg.to_dict(), "images": source, "train_limit": args.train_limit,
           "batch_size": args.batch_size, "trials": len(seen), "identical_decisions": same / len(seen),
           "max_relative_loss_difference": rel, "max_weight_difference": wdiff}
    emit(res, args.out)


if __name__ == "__main__":
    main()
