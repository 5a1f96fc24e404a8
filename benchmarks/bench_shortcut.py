"""A shortcut of the fast engine against the same engine without it, by minibatch, in one run.

    python benchmarks/bench_shortcut.py [--shortcut KEPT|STAGED_BN|PER_CHUNK|GLOBAL_MAX|BN_GLOBAL_MAX]
                                        [--global-pool avg|max]
                                        [--batch-sizes 1000,2000,5000]
                                        [--layers conv2.weight,conv3.weight] [--repeats 2] [--data-dir DIR]
                                        [--out FILE]

The authors' search (``--preset paper``'s ``rso.AUTHORS`` on ``paper_mnist_bn``, batch-norm epsilon 1e-3,
global pooling ``--global-pool``: avg by default, max for ``GLOBAL_MAX`` and ``BN_GLOBAL_MAX``):
for each minibatch and layer, the trials of the layer's first output channel (C_in*KH*KW of them) are
timed with the shortcut and without (its switch in ``rso_fast``), in turns, ``--repeats`` times each, on
the chunks in the order a pass takes them. It prints one JSON object: seconds per trial for both, the best
of the repeats, and their ratio.

- ``KEPT`` (the default): 7. kept channels. They pay off when each chunk of the shuffled training set
  comes back often within those trials (training images / B chunks); the engine keeps them where it
  comes back at least ``rso_fast.KEPT_VISITS`` times, and this is the measurement that threshold comes
  from (the JSON gives the visits per chunk).
- ``STAGED_BN``: the candidates' batch norm after the mixing layer from y and dy, block by block, with
  the 3B batch never made (``ChannelDelta._rest_staged_bn``), against making it.
- ``PER_CHUNK``: 8. per-chunk stored inputs, on the authors' search with the minibatch's batch-norm
  statistics in place of frozen ones (``bn_statistics="minibatch"``, the ablation), against computing
  the layers before the searched one on every trial's chunk. Without it a trial costs up to a full
  forward pass: give few ``--layers`` and small ``--batch-sizes``. The per-chunk store (one forward pass
  over the training set up to the layer) is made inside each timed call, where a run makes it once per
  layer pass, so the figure with it errs on the slow side.
- ``GLOBAL_MAX``: global max pooling of the candidates' batch as a tree of maxima
  (``fast_kernels.global_max``), against NumPy's ``max`` over the pixel axes, on the network with global
  max pooling (the authors').
- ``BN_GLOBAL_MAX``: the last batch norm and the global max pooling after it from each channel's maxima
  (or minima) of the candidates' batch (``fast_kernels.bn_global_max``), against batch norm of the whole
  batch and then its maxima, on the network with global max pooling.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import numpy as np

from rso_np import rso_fast
from rso_np.fast_kernels import parallel_cpu
from rso_np.models import GLOBAL_POOLS, build_model
from rso_np.rso import AUTHORS, RSOConfig
from rso_np.rso_fast import FastRSO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rso import switched, training_images  # noqa: E402  (shared with bench_rso)


def time_layer(eng, unit, flag, on, trials):
    with switched(flag, on):
        eng.search_unit(unit, unit.sigma, count=2)         # warm-up
        t = time.perf_counter()
        eng.search_unit(unit, unit.sigma, count=trials)
        return (time.perf_counter() - t) / trials


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--global-pool", choices=sorted(GLOBAL_POOLS),
                    help="the network's global pooling (default: avg; max with --shortcut GLOBAL_MAX or BN_GLOBAL_MAX)")
    ap.add_argument("--shortcut", choices=("KEPT", "STAGED_BN", "PER_CHUNK", "GLOBAL_MAX", "BN_GLOBAL_MAX"),
                    default="KEPT",
                    help="the switch in rso_fast of the shortcut to time (default: KEPT, kept channels)")
    ap.add_argument("--batch-sizes", default="1000,2000,5000")
    ap.add_argument("--layers", default="conv2.weight,conv3.weight")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data-dir", help="folder with the MNIST .gz files (default: $RSO_NP_DATA/mnist)")
    ap.add_argument("--out", help="also write the JSON to this file")
    args = ap.parse_args(argv)
    x, y, source = training_images(args.data_dir)
    args.global_pool = args.global_pool or ("max" if args.shortcut in ("GLOBAL_MAX", "BN_GLOBAL_MAX") else "avg")
    res = {"model": "paper_mnist_bn", "global_pool": args.global_pool, "images": source,
           "date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()}", "numpy": np.__version__, "shortcut": args.shortcut,
           "kept_visits": rso_fast.KEPT_VISITS, "results": []}
    for B in (int(b) for b in args.batch_sizes.split(",")):
        model = build_model("paper_mnist_bn", seed=0, bn_eps=1e-3, global_pool=args.global_pool)
        model.train()
        search = dict(AUTHORS, bn_statistics="minibatch") if args.shortcut == "PER_CHUNK" else AUTHORS
        eng = FastRSO(model, x, y, RSOConfig(batch_size=B, **search), np.random.default_rng(0), rounds=1)
        with parallel_cpu():
            for name in args.layers.split(","):
                unit = next(u for u in eng.units if u.name == name)
                trials = unit.array[0].size                 # one output channel
                eng.start_pass(unit)
                with_, plain = [], []
                for _ in range(args.repeats):
                    with_.append(time_layer(eng, unit, args.shortcut, True, trials))
                    plain.append(time_layer(eng, unit, args.shortcut, False, trials))
                row = {"batch_size": B, "layer": name, "visits_per_chunk": trials / (x.shape[0] // B),
                       "s_per_trial_with": min(with_), "s_per_trial_without": min(plain),
                       "speedup": min(plain) / min(with_), "all_with": with_, "all_without": plain}
                print(f"B={B} {name} {args.shortcut}: {row['visits_per_chunk']:.1f} visits per chunk, with "
                      f"{min(with_) * 1e3:.0f} ms, without {min(plain) * 1e3:.0f} ms per trial",
                      file=sys.stderr, flush=True)
                res["results"].append(row)
        del eng, model
        gc.collect()                                       # one engine's stored inputs in memory at a time
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
