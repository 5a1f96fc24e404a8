"""Batch norm's per-channel sums two ways, timed in turns in one run.

    python benchmarks/bench_sums.py [--repeat 25]

``fast_kernels._block_sums`` (what ``bn_scale_shift`` calls) sums a block of a few thousand rows of a
channels-last batch with one matrix product (ones @ block) and its squares with
``np.einsum("nc,nc->c", block, block)``. The alternative timed against it squares the block into a buffer
of the thread's own and sums that with a second matrix product (ones @ squares). ``one_block`` times the two
on one block of 8,192 x 16 that stays in the cache, on one core, where the second is the faster. Both run
inside ``fast_kernels.parallel_cpu()`` on the shapes that a trial of the authors' search at minibatch 5000
normalises: the candidates after conv4 + pooling and conv5 (15,000 images at 7x7), after conv3 (15,000 at
14x14), and a minibatch after conv1 (5,000 at 28x28).
Prints one JSON object: the best and median milliseconds of each, their ratio, and the largest difference
between the two results (float rounding).
"""

import argparse
import json
import time

import numpy as np

from rso_np import fast_kernels as FK


def squares_by_matmul(G, M, n, C, block, dtype):
    """``fast_kernels._block_sums`` with the sums of squares as ones @ (block * block)."""
    count = G * (M // n)
    s1, s2 = np.empty((2, count, C), dtype=dtype)
    ones = np.ones(n, dtype=dtype)

    def work(claimed):
        squares = FK._thread_buffer("bench_squares", (n, C), dtype)
        for s, e in claimed:
            for i in range(s, e):
                p = block(i)
                np.matmul(ones, p, out=s1[i])
                np.matmul(ones, np.multiply(p, p, out=squares), out=s2[i])
    FK._run_split(count, 1, work)
    s1 = s1.reshape(G, -1, C).sum(axis=1, dtype=np.float64)
    s2 = s2.reshape(G, -1, C).sum(axis=1, dtype=np.float64)
    return s1 / M, s2 / M


def one_block(rng, repeat):
    """Microseconds for the sums of squares of one (8192, 16) block in the cache, serially: the einsum
    against the squares into a buffer and ones @ squares (best of ``repeat`` runs of 200 calls each)."""
    p = rng.standard_normal((8192, 16)).astype(np.float32)
    ones, squares, out = np.ones(8192, np.float32), np.empty_like(p), np.empty(16, np.float32)
    ways = {"einsum": lambda: np.einsum("nc,nc->c", p, p),
            "matmul": lambda: np.matmul(ones, np.multiply(p, p, out=squares), out=out)}
    best = {k: float("inf") for k in ways}
    with FK.parallel_cpu():                               # BLAS on one thread, as inside the engine
        for _ in range(repeat):
            for name, f in ways.items():
                t = time.perf_counter()
                for _ in range(200):
                    f()
                best[name] = min(best[name], (time.perf_counter() - t) / 200)
    us = {k: round(1e6 * v, 2) for k, v in best.items()}
    return {**us, "matmul_over_einsum": round(us["matmul"] / us["einsum"], 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=25)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    ways = {"einsum": FK._block_sums, "matmul": squares_by_matmul}
    res = {"repeat": args.repeat, "one_block": one_block(rng, args.repeat), "shapes": {}}
    try:
        for N, H, groups in ((15000, 7, 3), (15000, 14, 3), (5000, 28, 1)):
            x = np.ascontiguousarray(rng.standard_normal((N, H, H, 16)).astype(np.float32)).transpose(0, 3, 1, 2)
            g, b = np.ones(16, np.float32), np.zeros(16, np.float32)
            times, out = {k: [] for k in ways}, {}
            with FK.parallel_cpu():
                for rep in range(args.repeat):
                    # in turns, so that drift hits both alike, and each first in every other turn (the
                    # second may find part of the batch still in the cache)
                    for name in sorted(ways, reverse=bool(rep % 2)):
                        FK._block_sums = ways[name]
                        t = time.perf_counter()
                        out[name] = FK.bn_scale_shift(x, g, b, 1e-3, groups)
                        times[name].append(time.perf_counter() - t)
            ms = {k: {"best": round(1e3 * min(v), 2), "median": round(1e3 * float(np.median(v)), 2)}
                  for k, v in times.items()}
            res["shapes"][f"{N} x 16 x {H}x{H}"] = {
                **ms, "matmul_over_einsum_median": round(ms["matmul"]["median"] / ms["einsum"]["median"], 2),
                "max_abs_diff_scale": float(np.abs(out["matmul"][0] - out["einsum"][0]).max())}
    finally:
        FK._block_sums = ways["einsum"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
