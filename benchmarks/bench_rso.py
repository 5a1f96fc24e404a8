"""Seconds per RSO trial, layer by layer, for the literal and the fast engine (and PyTorch), in one run.

    python benchmarks/bench_rso.py [--model paper_mnist] [--batch-size 256] [--device cpu|gpu]
                                   [--trials 20] [--torch] [--data-dir DIR] [--out FILE]
    python benchmarks/bench_rso.py --preset paper [--batch-size 5000] [--engines fast,fast_no_bn] [--torch]

For every searched array of the model it times ``--trials`` trials of each engine, and estimates the
seconds of a full round as the sum over layers of (weights x seconds per trial), plus, for the fast
engine, the time to store the activations that a round's layer passes start from. On the CPU the rso_np
engines' first trial of a pass is timed apart (``first_trial_s``: it makes the arrays the pass's other
trials reuse) and counted once per layer, the others at their own pace (``s_per_trial``). It prints one
JSON object with the per-layer figures, the estimated round for each engine and their ratio, all measured
in the same run, layer by layer with the engines in turn (absolute times on a shared CPU are noisy; the
ratio is what to compare).

``--preset paper`` times the authors' search (``rso.AUTHORS``: batch-norm statistics frozen before the
searched layer, chunked minibatches, ...) on ``paper_mnist_bn`` with global max pooling as the authors' code
pools (``--global-pool avg`` for the average); ``--engines fast,fast_no_bn`` times the
fast engine on it and on the same network without batch norm, layer by layer in turn.

With chunked minibatches (``--preset paper``) the fast engine is timed on at least the trials of one
output channel of each convolution: what it keeps per chunk is made once per output channel and serves
that channel's trials, so fewer trials would not show its average cost. Its batch-norm passes (a scale or
shift per channel, 16 trials) are timed whole: a pass's trials reuse the arrays its first trial makes
(``fast_kernels.Workspace``), so two trials would charge that first one's memory to each.

``--torch`` also times the straightforward PyTorch version of the same algorithm on the same network and
minibatches (three ``model(x)`` calls per weight under ``no_grad``), on the CUDA device with ``--device gpu``;
it is skipped with a message where
PyTorch is not installed (it is not a dependency of rso_np).

Training images: real MNIST from --data-dir or $RSO_NP_DATA/mnist when present, otherwise 60,000
random images of the same shape (the timings do not depend on the pixel values).
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from rso_np.backend import DeviceError, get_xp, synchronize, to_numpy
from rso_np.fast_kernels import _blas_controller, parallel_cpu
from rso_np.layers import (AvgPool2d, BatchNorm2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, GlobalMaxPool2d,
                           MaxPool2d, ReLU)
from rso_np.models import GLOBAL_POOLS, build_model
from rso_np.rso import AUTHORS, RSO, RSOConfig
from rso_np import rso_fast
from rso_np.rso_fast import FastRSO
from rso_np.training import peak_rss_bytes


def training_images(data_dir):
    folder = data_dir or (os.path.join(os.environ["RSO_NP_DATA"], "mnist") if os.environ.get("RSO_NP_DATA")
                          else None)
    if folder and os.path.exists(os.path.join(folder, "train-images-idx3-ubyte.gz")):
        from rso_np.data import load_dataset
        d = load_dataset("mnist", data_dir=folder, test_limit=1, log=None)
        return d["x_train"], d["y_train"], f"MNIST ({folder})"
    rng = np.random.default_rng(0)
    return (rng.standard_normal((60000, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 60000),
            "random images")


def engine_timer(engine_cls, model_name, x, y, cfg, xp, bn_eps=None, global_pool=None):
    """A function (unit index, trials) -> timings of one layer for an rso_np engine."""
    fast = engine_cls is FastRSO
    model = build_model(model_name, seed=0, bn_eps=bn_eps, global_pool=global_pool).to(xp)
    eng = engine_cls(model, xp.asarray(x), xp.asarray(y), cfg, np.random.default_rng(0), rounds=1)
    model.train()

    names = [u.name for u in eng.units]

    def time_layer(name, trials):
        if name not in names:                                  # a unit this network does not have
            return None
        with parallel_cpu():                                   # as RSO.run_round searches a layer
            return _time_layer(names.index(name), trials)

    def _time_layer(i, trials):
        unit = eng.units[i]
        n = int(unit.array.size)
        k = min(trials, n)
        if fast and cfg.minibatches == "chunks" and unit.array.ndim == 4 and not unit.batch_norm:
            # kept channels (rso_fast.KeptChannels): the arrays kept per chunk are made once per output
            # channel, so the trials of a whole output channel are timed
            k = min(n, max(k, n // unit.array.shape[0]))
        if fast and cfg.minibatches == "chunks" and unit.batch_norm:
            k = n                                             # a batch-norm pass, whole (16 trials here)
        t = time.perf_counter()
        eng.start_pass(unit)                                  # batch-norm statistics, the pass's shuffle
        synchronize(xp)
        setup = time.perf_counter() - t
        if fast:
            # the stored activations of a round (one forward pass over the training set, at the first
            # layer searched; later layers find theirs stored): timed as the layer's setup
            t = time.perf_counter()
            eng._store_inputs(unit.layer_index)
            synchronize(xp)
            setup += time.perf_counter() - t
        if xp is np and k > 1:
            # a layer pass makes its trial's arrays in its first trial and reuses them in the others
            # (fast_kernels.Workspace): the first trial is timed apart, and the pass is estimated as it
            # runs, the first trial once and the others at their own pace (times from the progress hook)
            ticks = []
            eng.progress = lambda done, total, what: ticks.append(time.perf_counter())
            t = time.perf_counter()
            eng.search_unit(unit, unit.sigma, count=k)
            eng.progress = None
            first, per_trial = ticks[0] - t, (ticks[-1] - ticks[0]) / (k - 1)
            return {"weights": n, "trials_timed": k, "s_per_trial": per_trial, "first_trial_s": first,
                    "setup_s": setup}
        eng.search_unit(unit, unit.sigma, count=1)            # warm-up (on a GPU the trials are queued)
        synchronize(xp)
        t = time.perf_counter()
        eng.search_unit(unit, unit.sigma, count=k)
        synchronize(xp)
        per_trial = (time.perf_counter() - t) / k
        return {"weights": n, "trials_timed": k, "s_per_trial": per_trial, "setup_s": setup}
    return time_layer, names


# ------------------------------------------------------------------------------------------ PyTorch


def torch_model(model):
    import torch.nn as nn
    mods = []
    for layer in model.layers:
        if isinstance(layer, Conv2d):
            m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          bias="bias" in layer.params)
        elif isinstance(layer, Dense):
            m = nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
        elif isinstance(layer, BatchNorm2d):
            m = nn.BatchNorm2d(layer.num_features, eps=layer.eps, track_running_stats=False)
        elif isinstance(layer, ReLU):
            m = nn.ReLU()
        elif isinstance(layer, MaxPool2d):
            m = nn.MaxPool2d(layer.kernel_size, layer.stride)
        elif isinstance(layer, AvgPool2d):
            m = nn.AvgPool2d(layer.kernel_size, layer.stride)
        elif isinstance(layer, GlobalAvgPool2d):
            m = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif isinstance(layer, GlobalMaxPool2d):
            m = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        elif isinstance(layer, Flatten):
            m = nn.Flatten()
        else:
            raise TypeError(f"no PyTorch counterpart for {layer!r}")
        mods.append(m)
    net = nn.Sequential(*mods)
    import torch
    with torch.no_grad():
        for layer, m in zip(model.layers, mods):
            for k, v in layer.params.items():
                getattr(m, k).copy_(torch.from_numpy(to_numpy(v)))
    return net


def torch_timer(model_name, x, y, cfg, bn_eps=None, device="cpu", global_pool=None):
    """The obvious PyTorch implementation, timed one layer at a time like ``engine_timer``: mutate one
    weight, three model(x) calls under no_grad, keep the best. ``device`` is PyTorch's ("cpu", "cuda")."""
    import torch
    import torch.nn.functional as tF
    model = build_model(model_name, seed=0, bn_eps=bn_eps, global_pool=global_pool)
    net = torch_model(model).train().to(device)
    X, Y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    rng = np.random.default_rng(0)
    params = dict(net.named_parameters())
    names = {f"{model.names[int(k.split('.')[0])]}.{k.split('.')[1]}": k for k in params}
    units = RSO(model, x[:cfg.batch_size], y[:cfg.batch_size], cfg, rng).units

    def trial(p, sigma, j):
        idx = torch.from_numpy(rng.choice(X.shape[0], cfg.batch_size, replace=False)).to(device)
        xb, yb = X[idx], Y[idx]
        dw = float(rng.normal(0.0, sigma))
        w = float(p[j])
        losses = []
        for v in (w + dw, w, w - dw):
            p[j] = v
            losses.append(float(tF.cross_entropy(net(xb).double(), yb, reduction="sum")))
        p[j] = (w + dw, w, w - dw)[int(np.argmin(losses))]

    def time_layer(name, trials):
        unit = next(u for u in units if u.name == name)
        p = params[names[unit.name]].view(-1)
        n = p.numel()
        k = min(trials, n)
        with torch.no_grad():
            trial(p, unit.sigma, 0)
            t = time.perf_counter()
            for j in range(k):
                trial(p, unit.sigma, j)
        return {"weights": n, "trials_timed": k, "s_per_trial": (time.perf_counter() - t) / k, "setup_s": 0.0}
    return time_layer


ENGINES = ("literal", "fast", "fast_no_bn", "fast_unkept")


@contextlib.contextmanager
def switched(flag, on):
    """``rso_fast.<flag>`` (a shortcut's switch: ``KEPT``, ``STAGED_BN``) set to ``on`` inside."""
    before = getattr(rso_fast, flag)
    setattr(rso_fast, flag, on)
    try:
        yield
    finally:
        setattr(rso_fast, flag, before)


def without_kept_channels(time_layer):
    """time_layer with kept channels off while it runs: the fast engine as it was before shortcut 7."""
    def timed(name, trials):
        with switched("KEPT", False):
            return time_layer(name, trials)
    return timed


def pass_seconds(layer):
    """The estimated layer pass: its setup, and its trials (the first one at its own time where it was
    timed apart)."""
    return (layer["setup_s"] + layer.get("first_trial_s", layer["s_per_trial"])
            + (layer["weights"] - 1) * layer["s_per_trial"])


def round_seconds(layers):
    """The estimated round: the sum of its layer passes."""
    return sum(pass_seconds(v) for v in layers.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model name (default: paper_mnist; --preset paper: paper_mnist_bn)")
    ap.add_argument("--preset", choices=("paper",),
                    help="the authors' search (rso.AUTHORS: statistics frozen before the searched layer, chunks, "
                         "...) on paper_mnist_bn with batch-norm epsilon 1e-3, minibatch 5000 unless given")
    ap.add_argument("--batch-size", type=int, help="minibatch (default: 256; --preset paper: 5000)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--global-pool", choices=sorted(GLOBAL_POOLS),
                    help="the global pooling of the paper's networks (default: avg; --preset paper: max, as the "
                         "authors' code pools)")
    ap.add_argument("--trials", type=int, default=20, help="trials timed per layer and engine (default: 20)")
    ap.add_argument("--engines", default="literal,fast",
                    help="comma-separated: literal, fast, fast_no_bn (the fast engine on the same network "
                         "without batch norm), fast_unkept (the fast engine without its kept channels, "
                         "shortcut 7); default: literal,fast")
    ap.add_argument("--torch", action="store_true", help="also time the straightforward PyTorch version")
    ap.add_argument("--data-dir", help="folder with the MNIST .gz files (default: $RSO_NP_DATA/mnist)")
    ap.add_argument("--out", help="also write the JSON to this file")
    args = ap.parse_args(argv)
    paper = args.preset == "paper"
    args.model = args.model or ("paper_mnist_bn" if paper else "paper_mnist")
    args.batch_size = args.batch_size or (5000 if paper else 256)
    args.global_pool = args.global_pool or ("max" if paper else None)
    if args.trials < 1 or args.batch_size < 1:
        ap.error("--trials and --batch-size must be at least 1")
    try:
        xp = get_xp(args.device)
    except DeviceError as exc:
        ap.error(str(exc))
    x, y, source = training_images(args.data_dir)
    cfg = RSOConfig(batch_size=args.batch_size, **(AUTHORS if paper else {}))
    bn_eps = 1e-3 if paper else None
    res = {"model": args.model, "batch_size": args.batch_size, "device": args.device, "images": source,
           "search": cfg.to_dict(), "bn_eps": bn_eps, "global_pool": args.global_pool or "avg",
           "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "python": platform.python_version(), "numpy": np.__version__, "blas": blas_info(), "engines": {}}
    if args.device == "gpu":
        import cupy
        res["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        res["cupy"] = cupy.__version__
    timers, units = {}, None
    for name in args.engines.split(","):
        if name not in ENGINES:
            ap.error(f"unknown engine {name!r} in --engines (choose from {', '.join(ENGINES)})")
        if name == "fast_no_bn":                 # the same network and search without its batch norms
            timers[name] = engine_timer(FastRSO, args.model.replace("_bn", ""), x, y, cfg, xp,
                                        global_pool=args.global_pool)[0]
            continue
        if name == "fast_unkept":                # the fast engine without shortcut 7 (kept channels)
            timers[name] = without_kept_channels(engine_timer(FastRSO, args.model, x, y, cfg, xp, bn_eps,
                                                              args.global_pool)[0])
            continue
        timers[name], units = engine_timer(FastRSO if name == "fast" else RSO, args.model, x, y, cfg, xp, bn_eps,
                                           args.global_pool)
    if args.torch:
        try:
            import torch
            torch.set_num_threads(os.cpu_count())
            device = "cuda" if args.device == "gpu" else "cpu"
            if device == "cuda" and not torch.cuda.is_available():
                ap.error("--torch with --device gpu: this PyTorch sees no CUDA device")
            timers["torch"] = torch_timer(args.model, x, y, cfg, bn_eps, device, args.global_pool)
            res["torch"] = {"version": torch.__version__, "device": device, "threads": torch.get_num_threads()}
        except ImportError:
            print("--torch: PyTorch is not installed; skipping the PyTorch comparison", file=sys.stderr)
            res["torch_skipped"] = "PyTorch not installed"
    if units is None:
        units = [u.name for u in RSO(build_model(args.model, global_pool=args.global_pool), x[:cfg.batch_size],
                                     y[:cfg.batch_size], cfg).units]
    # layer by layer, every engine in turn: a slow spell of a shared machine then hits all of them alike
    layers = {name: {} for name in timers}
    for unit in units:
        for name, time_layer in timers.items():
            print(f"timing {unit} with {name} ...", file=sys.stderr, flush=True)
            timing = time_layer(unit, args.trials)
            if timing is not None:
                layers[name][unit] = timing
                print(f"  {timing['s_per_trial'] * 1e3:.1f} ms per trial over {timing['trials_timed']}",
                      file=sys.stderr, flush=True)
        if args.out:                             # what is measured so far survives a crash (complete: false)
            partial = dict(res, complete=False, engines={n: {"layers": l} for n, l in layers.items()})
            emit(partial, args.out, echo=False)
    for name in timers:
        res["engines"][name] = {"layers": layers[name], "round_s": round_seconds(layers[name])}
    res["complete"] = True
    res["peak_rss_gb"] = peak_rss_gb()
    rounds = {k: v["round_s"] for k, v in res["engines"].items()}
    res["round_s"] = rounds
    if "fast" in rounds:
        for other in ("literal", "torch", "fast_no_bn", "fast_unkept"):
            if other in rounds:
                res[f"speedup_fast_vs_{other}"] = rounds[other] / rounds["fast"]
    emit(res, args.out)


def blas_info():
    """NumPy's BLAS as threadpoolctl reports it (the controller ``parallel_cpu`` uses): library, version,
    threads and the kernel set it chose for this CPU (``architecture``; OpenBLAS's can be forced with
    OPENBLAS_CORETYPE, and a kernel set older than the CPU's runs the convolutions' products slower)."""
    keep = ("internal_api", "version", "num_threads", "architecture")
    return [{k: lib.get(k) for k in keep} for lib in _blas_controller().info() if lib.get("user_api") == "blas"]


def peak_rss_gb():
    """This process's peak resident memory in GB (every engine of the run together), or None."""
    peak = peak_rss_bytes()
    return None if peak is None else peak / 1e9


def emit(res, out=None, echo=True):
    """Print the result as JSON (unless not ``echo``), and write it to ``out`` when given."""
    text = json.dumps(res, indent=1)
    if echo:
        print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
