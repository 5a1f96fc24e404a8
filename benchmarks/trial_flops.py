"""The arithmetic of a trial in each engine, and what a target ratio to PyTorch asks of the fast engine.

    python benchmarks/trial_flops.py [--bench docs/results/bench_rso_paper_max_b5000_cpu.json]
                                     [--gflops 200] [--target 40]

Reads a result file of ``bench_rso.py --engines fast --torch`` (its model, global pooling, minibatch B and
measured seconds per trial) and counts, for every searched layer, the multiply-adds of one trial:

- PyTorch's straightforward trial: three forward passes of the B images through the whole network, every
  convolution in full (the pooling after it too);
- the fast engine's trial, as ``rso_fast`` computes it with the authors' search: the searched conv on its
  input and the next mixing layer m in full for the B images of W, unless kept channels (7.) apply; m on
  the searched output channel alone for the candidates (and for W with kept channels); every mixing layer
  after m in full for the 3 x B candidates, with the poolings folded as ``conv_block`` folds them. A
  batch-norm parameter's trial is the same without the conv. The update of the searched channel itself
  (one tap of one input channel per change) and the dense layer's shortcut are left out: they are small.

It prints, per layer, the GFLOP of a trial (2 per multiply-add), the measured time and the rate each
engine reached, then the fast round if its trials did nothing but these products at ``--gflops`` (the
floor of this work with everything around the products free), and the rate a round would need, were it
products alone, to be ``--target`` times PyTorch's measured round. Counting, not timing: it takes a
second.
"""

import argparse
import json
import sys

import numpy as np

from rso_np import rso_fast
from rso_np.layers import AvgPool2d, Conv2d, Dense, GlobalAvgPool2d

TRAIN_IMAGES = 60000


def shapes(layers, in_shape=(1, 1, 28, 28)):
    """The input shape (C, H, W) of every layer, from a forward pass of one blank image."""
    x, out = np.zeros(in_shape, dtype=np.float32), []
    for layer in layers:
        out.append(x.shape[1:])
        x = layer.forward(x)
    return out


def macs(layers, ins, i, folded):
    """Multiply-adds per image of mixing layer i (a conv, with the pooling after it folded as
    ``rso_fast.conv_block`` folds it when ``folded``; or a dense layer)."""
    layer = layers[i]
    if isinstance(layer, Dense):
        return int(np.prod(layer.params["weight"].shape))
    C_out, C_in, K, _ = layer.params["weight"].shape
    _, H, W = ins[i]
    s, p = layer.stride, layer.padding
    OH, OW = (H + 2 * p - K) // s + 1, (W + 2 * p - K) // s + 1
    pool = rso_fast._folded_pool(layers, i) if folded else None
    if isinstance(pool, GlobalAvgPool2d):                  # patches summed over the pixels, then a dense layer
        return OH * OW * C_in * K * K + C_out * C_in * K * K
    if isinstance(pool, AvgPool2d):                        # one (K + k - 1)^2 convolution of stride k
        k = pool.kernel_size
        return (OH // k) * (OW // k) * C_out * C_in * (K + k - 1) ** 2
    return OH * OW * C_out * C_in * K * K


def mixing_after(layers, i):
    """``rso_fast.mixing_after``: the next conv or dense layer after layer i (len(layers) if none)."""
    m = rso_fast.mixing_after(layers, i)
    if m is None:
        raise ValueError(f"layer {i}: a layer that mixes channels without being a conv or dense lies after it")
    return m


def trial_macs(layers, ins, i, B, kept):
    """(fast, torch) multiply-adds of one trial of a parameter of layer i."""
    torch = 3 * B * sum(macs(layers, ins, k, False) for k, l in enumerate(layers) if isinstance(l, (Conv2d, Dense)))
    if isinstance(layers[i], Dense):
        return 0, torch                                    # 3. dense shortcut: one logit change
    m = mixing_after(layers, i)
    fast = 0
    if m < len(layers):
        full_m = macs(layers, ins, m, True)
        one_channel = full_m // ins[m][0] if isinstance(layers[m], Conv2d) else layers[m].params["weight"].shape[0]
        if not kept:                                       # W through layer i (if a conv) and m, for B images
            fast += B * ((macs(layers, ins, i, True) if isinstance(layers[i], Conv2d) else 0) + full_m)
            fast += 2 * B * one_channel                    # the candidates' change through m
        else:
            fast += 3 * B * one_channel                    # W's channel o and the candidates' change through m
        k = mixing_after(layers, m)
        while k < len(layers):
            fast += 3 * B * macs(layers, ins, k, True)
            k = mixing_after(layers, k)
    return fast, torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="docs/results/bench_rso_paper_max_b5000_cpu.json",
                    help="a result file of bench_rso.py with the fast engine and PyTorch")
    ap.add_argument("--gflops", type=float, default=200.0,
                    help="the rate of the floor: products alone at this many GFLOP/s (default 200: one block's "
                         "float32 product at about 100 GFLOP/s per core on this VM, bench_conv.py, on 2 cores)")
    ap.add_argument("--target", type=float, default=40.0, help="the ratio to PyTorch asked for (default 40)")
    args = ap.parse_args(argv)
    try:
        with open(args.bench) as f:
            bench = json.load(f)
        fast_l, torch_l = bench["engines"]["fast"]["layers"], bench["engines"]["torch"]["layers"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"trial_flops.py: {args.bench}: not a bench_rso.py result with the fast engine and PyTorch ({e})")
    from rso_np.models import build_model
    model = build_model(bench["model"], bn_eps=bench.get("bn_eps"), global_pool=bench.get("global_pool"))
    names = dict((n, i) for i, n in enumerate(model.names))
    layers, B = model.layers, int(bench["batch_size"])
    ins = shapes(layers)
    chunks = bench.get("search", {}).get("minibatches") == "chunks"

    rows, fast_round, floor_round, flops_round, torch_round = [], 0.0, 0.0, 0.0, 0.0
    for unit, f in fast_l.items():
        i = names[unit.split(".")[0]]
        w = f["weights"]
        kept = (chunks and rso_fast.KEPT and isinstance(layers[i], Conv2d) and unit.endswith(".weight")
                and rso_fast.chunks_come_back(layers[i].params["weight"][0].size, TRAIN_IMAGES, B))
        fm, tm = trial_macs(layers, ins, i, B, kept)
        fg, tg = 2 * fm / 1e9, 2 * tm / 1e9
        fs, ts = f["s_per_trial"], torch_l[unit]["s_per_trial"]
        rows.append((unit, w, kept, fg, fs, tg, ts))
        fast_round += w * fs
        torch_round += w * ts
        flops_round += w * fg
        floor_round += w * fg / args.gflops

    print(f"{bench['model']}, global pooling {bench.get('global_pool')}, minibatch {B}, from {args.bench} "
          f"({bench.get('date', '?')}, {bench.get('machine', '?')})")
    print(f"{'layer':14} {'weights':>7} {'kept':>4} {'fast GFLOP':>10} {'fast ms':>8} {'GFLOP/s':>7} "
          f"{'torch GFLOP':>11} {'torch s':>7} {'GFLOP/s':>7}")
    for unit, w, kept, fg, fs, tg, ts in rows:
        rate = f"{fg / fs:7.1f}" if fg else f"{'-':>7}"
        print(f"{unit:14} {w:7d} {'yes' if kept else '':>4} {fg:10.2f} {1e3 * fs:8.1f} {rate} "
              f"{tg:11.1f} {ts:7.2f} {tg / ts:7.1f}")
    need = torch_round / args.target
    print(f"rounds (estimated from the trials): fast {fast_round:,.0f} s, PyTorch {torch_round:,.0f} s, "
          f"ratio {torch_round / fast_round:.1f}x", end="")
    if "round_s" in bench:                                 # bench_rso.py's own figures: the store passes too
        print(f" (the file's, with the store passes: {bench['round_s']['fast']:,.0f} s, "
              f"{bench['speedup_fast_vs_torch']:.1f}x)", end="")
    print()
    print(f"the fast round's products: {flops_round / 1e3:,.1f} TFLOP, at {flops_round / fast_round:.1f} GFLOP/s "
          f"over the round as measured")
    print(f"their floor at {args.gflops:g} GFLOP/s, nothing else counted: {floor_round:,.0f} s, "
          f"{torch_round / floor_round:.0f}x PyTorch's round")
    print(f"{args.target:g}x PyTorch's round: at most {need:,.0f} s, i.e. {flops_round / need:.0f} GFLOP/s over the "
          f"round ({fast_round / need:.2f}x faster than measured)")


if __name__ == "__main__":
    main()
