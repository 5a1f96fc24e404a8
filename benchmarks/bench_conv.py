"""Speed of ``functional.conv2d`` (im2col + one matrix product) against ``conv2d_naive``, and of
``fast_kernels.conv2d`` (the same numbers, a block of images at a time) against ``functional.conv2d``.

    python benchmarks/bench_conv.py [--device cpu|gpu] [--torch]

Prints one JSON object. Both kernels of each ratio are timed in the same run. On the CPU the large
shapes are timed three times: the reference ``functional.conv2d``, ``fast_kernels.conv2d`` serially,
and ``fast_kernels.conv2d`` inside ``fast_kernels.parallel_cpu()`` (every core takes a share of the
images, as the RSO engines run), with the ratios.

The shape ``candidates_5000`` is what a trial of the authors' search at minibatch 5000 convolves after the
searched layer: the two changed candidates, 10,000 images of 16 channels at 28x28. ``--torch`` also times
PyTorch's ``conv2d`` on the same arrays and device (oneDNN on the CPU, cuDNN on a GPU), where installed.

On the CPU, ``products`` times the matrix product of one block alone, as ``fast_kernels.conv2d`` makes it
(a block's patch matrix, about 1 MB, times the (K, 16) weight matrix, BLAS on one thread), at the shapes a
trial of the authors' search convolves: what the products of a trial could reach without the copies.
"""

import argparse
import json
import time

import numpy as np

from rso_np import fast_kernels as FK
from rso_np import functional as F
from rso_np.backend import get_xp, synchronize


def best_time(fn, xp, repeat):
    fn()
    synchronize(xp)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        synchronize(xp)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--torch", action="store_true", help="also time PyTorch's conv2d on the same device")
    args = ap.parse_args(argv)
    xp = get_xp(args.device)
    rng = np.random.default_rng(0)
    res = {"device": args.device}

    x = xp.asarray(rng.standard_normal((8, 16, 14, 14)).astype(np.float32))
    W = xp.asarray(rng.standard_normal((16, 16, 3, 3)).astype(np.float32))
    t_fast = best_time(lambda: F.conv2d(x, W, padding=1), xp, args.repeat)
    t_naive = best_time(lambda: F.conv2d_naive(x, W, padding=1), xp, 1)
    res["small"] = {"shape": "(8,16,14,14)x(16,16,3,3) pad 1", "conv2d_s": t_fast, "conv2d_naive_s": t_naive,
                    "speedup": t_naive / t_fast}

    tconv = torch_conv(xp) if args.torch else None
    for name, n, c_in in (("large", 256, 16), ("large_one_channel", 256, 1), ("candidates_5000", 10000, 16)):
        x = xp.asarray(rng.standard_normal((n, c_in, 28, 28)).astype(np.float32))
        Wl = xp.asarray(rng.standard_normal((16, c_in, 3, 3)).astype(np.float32))
        flops = 2 * n * 16 * 28 * 28 * c_in * 9
        repeat = args.repeat if n <= 256 or xp is not np else 2
        t_ref = best_time(lambda: F.conv2d(x, Wl, padding=1), xp, repeat)
        t = best_time(lambda: FK.conv2d(x, Wl, padding=1), xp, repeat)
        r = {"shape": f"({n},{c_in},28,28)x(16,{c_in},3,3) pad 1", "functional_conv2d_s": t_ref,
             "conv2d_s": t, "gflops": flops / t / 1e9, "blocked_vs_reference": t_ref / t}
        if tconv is not None:
            tt = best_time(lambda: tconv(x, Wl), xp, repeat)
            r.update({"torch_conv2d_s": tt, "torch_gflops": flops / tt / 1e9, "torch_vs_conv2d": t / tt})
        if args.device == "cpu":
            with FK.parallel_cpu():
                tp = best_time(lambda: FK.conv2d(x, Wl, padding=1), xp, repeat)
            r.update({"threads": FK.cpu_threads(), "parallel_cpu_s": tp, "parallel_cpu_gflops": flops / tp / 1e9,
                      "parallel_cpu_speedup": t / tp})
        res[name] = r
    if args.device == "cpu":
        res["products"] = block_products(rng, args.repeat)
    print(json.dumps(res, indent=1))


def block_products(rng, repeat):
    """GFLOP/s of one block's product (patch rows x K) @ (K x 16), float32, BLAS on one thread."""
    out = {}
    for name, (images, pixels, K) in {"conv5_3x3_7x7": (37, 49, 144), "conv4_pool_4x4_stride2": (20, 49, 256),
                                      "conv3_3x3_14x14": (9, 196, 144)}.items():
        A = rng.standard_normal((images * pixels, K)).astype(np.float32)
        Wm = rng.standard_normal((K, 16)).astype(np.float32)
        o = np.empty((A.shape[0], 16), dtype=np.float32)
        with FK.parallel_cpu():                            # sets BLAS to one thread (several cores here)
            t = best_time(lambda: [np.matmul(A, Wm, out=o) for _ in range(100)], np, repeat) / 100
        out[name] = {"rows": A.shape[0], "K": K, "s": t, "gflops": 2 * A.shape[0] * K * 16 / t / 1e9}
    return out


def torch_conv(xp):
    """PyTorch's conv2d (padding 1) on arrays of module ``xp``, shared without a copy (DLPack on a GPU)."""
    try:
        import torch
        import torch.nn.functional as tF
    except ImportError:
        raise SystemExit("--torch: PyTorch is not installed")
    if xp is np:
        torch.set_num_threads(FK.cpu_threads())
        return lambda x, W: tF.conv2d(torch.from_numpy(x), torch.from_numpy(W), padding=1)
    if not torch.cuda.is_available():
        raise SystemExit("--torch with --device gpu: this PyTorch sees no CUDA device")

    def conv(x, W):
        out = tF.conv2d(torch.from_dlpack(x), torch.from_dlpack(W), padding=1)
        torch.cuda.synchronize()
        return out
    return conv


if __name__ == "__main__":
    main()
