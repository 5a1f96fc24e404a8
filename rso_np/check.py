"""Checkers for the classroom exercises in ``tutorials/exercises``.

    python -m rso_np.check conv        [path/to/ex1_conv.py]
    python -m rso_np.check maxpool     [path/to/ex2_maxpool.py]
    python -m rso_np.check xent        [path/to/ex3_cross_entropy.py]
    python -m rso_np.check rso_step    [path/to/ex4_rso_step.py]
    python -m rso_np.check frozen_bn   [path/to/ex5_frozen_bn.py]

Each check imports the student's file, runs its functions on random inputs and compares them with
rso_np's reference implementation, saying precisely what is wrong: a missing function, a wrong shape or
dtype, or the first element that differs (expected vs got). Exit status 0 when everything passes, 1 if not.
"""

import importlib.util
import sys
import traceback
from pathlib import Path

import numpy as np

from . import functional as F
from .layers import BatchNorm2d
from .losses import logit_cross_entropy
from .models import paper_mnist, small_mnist
from .rso import KEEP, MINUS, PLUS, candidates, choose

EXERCISES = {
    "conv": "ex1_conv.py",
    "maxpool": "ex2_maxpool.py",
    "xent": "ex3_cross_entropy.py",
    "rso_step": "ex4_rso_step.py",
    "frozen_bn": "ex5_frozen_bn.py",
}


class CheckFailed(AssertionError):
    pass


def load_module(path):
    path = Path(path)
    if not path.exists():
        raise CheckFailed(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(f"student_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:  # the student's file may raise anything
        raise CheckFailed(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from None
    return mod


def call(mod, name, *args, **kwargs):
    fn = getattr(mod, name, None)
    if fn is None:
        raise CheckFailed(f"function {name}() is missing")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailed(f"{name}() is not written yet (it raises NotImplementedError: fill in the TODO)") \
            from None
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        raise CheckFailed(f"{name}() raised {type(exc).__name__}: {exc} (line {tb.lineno}: {tb.line})") from None


def compare(what, got, expected, rtol=1e-5, atol=1e-6):
    """Raise CheckFailed naming the first wrong element (or the wrong shape/dtype)."""
    expected = np.asarray(expected)
    if got is None:
        raise CheckFailed(f"{what}: returned None (did you forget 'return'?)")
    got = np.asarray(got)
    if got.shape != expected.shape:
        raise CheckFailed(f"{what}: shape {got.shape}, expected {expected.shape}")
    if expected.dtype == np.float32 and got.dtype != np.float32:
        raise CheckFailed(f"{what}: dtype {got.dtype}, expected float32 (use dtype=... explicitly)")
    bad = ~np.isclose(got, expected, rtol=rtol, atol=atol)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise CheckFailed(f"{what}: {int(bad.sum())} of {bad.size} elements differ; first at index {i}: "
                          f"expected {expected[i]!r}, got {got[i]!r}")


def check_conv(mod):
    rng = np.random.default_rng(0)
    for (N, C, H, W, O, K, s, p) in [(1, 1, 5, 5, 1, 3, 1, 0), (2, 3, 7, 6, 4, 3, 1, 1), (2, 2, 9, 8, 3, 3, 2, 1),
                                     (1, 2, 6, 7, 2, 2, 1, 2)]:
        x = rng.standard_normal((N, C, H, W)).astype(np.float32)
        Wt = rng.standard_normal((O, C, K, K)).astype(np.float32)
        b = rng.standard_normal(O).astype(np.float32)
        case = f"x {x.shape}, W {Wt.shape}, stride {s}, padding {p}"
        col = call(mod, "im2col", x, K, K, s, p)
        ref_col, _ = F.im2col(x, K, K, s, p)
        compare(f"im2col({case})", col, ref_col)
        compare(f"conv2d({case})", call(mod, "conv2d", x, Wt, b, s, p), F.conv2d(x, Wt, b, s, p), 1e-4, 1e-4)
    return "im2col and conv2d match rso_np.functional on 4 shapes (stride 1 and 2, padding 0 to 2)"


def check_maxpool(mod):
    rng = np.random.default_rng(1)
    for shape, k, s in [((1, 1, 4, 4), 2, None), ((2, 3, 7, 9), 2, None), ((2, 2, 9, 8), 3, 2), ((1, 2, 5, 6), 3, 1)]:
        x = rng.standard_normal(shape).astype(np.float32)
        compare(f"max_pool2d(x {shape}, kernel_size={k}, stride={s})", call(mod, "max_pool2d", x, k, s),
                F.max_pool2d(x, k, s))
    return "max_pool2d matches rso_np.functional on 4 shapes (overlapping and odd-sized windows)"


def check_xent(mod):
    rng = np.random.default_rng(2)
    for scale in (1.0, 30.0, 1e4):
        z = (rng.standard_normal((16, 10)) * scale).astype(np.float32)
        y = rng.integers(0, 10, 16)
        got = call(mod, "logit_cross_entropy", z, y)
        if got is not None and not np.isfinite(got):
            raise CheckFailed(f"logit_cross_entropy on logits of magnitude {scale:g}: got {got} "
                              "(subtract the row maximum before exponentiating: log-sum-exp)")
        try:
            compare(f"logit_cross_entropy(logits of magnitude {scale:g})", got,
                    float(logit_cross_entropy(z.astype(np.float64), y)), 1e-5, 1e-5)
        except CheckFailed as exc:
            hint = " (large logits lose precision or overflow in exp: subtract the row maximum first, " \
                   "log-sum-exp)" if scale > 1 else ""
            raise CheckFailed(f"{exc}{hint}") from None
    return "logit_cross_entropy matches the log-sum-exp reference, also for logits of magnitude 1e4"


def check_rso_step(mod):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    names = {PLUS: "+dW", KEEP: "keep", MINUS: "-dW"}
    seen = set()
    for trial in range(40):
        model = small_mnist(seed=trial)
        name = ["fc.weight", "conv2.weight", "conv1.weight"][trial % 3]
        W = model.parameters()[name]
        j = int(rng.integers(W.size))
        dw = float(rng.normal(0, W.std())) * (0.0 if trial == 5 else 1.0)   # trial 5: dW = 0, a tie
        idx = rng.choice(64, 16, replace=False)
        before = W.copy()
        # the reference: the three losses on the same minibatch, argmin, a tie keeps W
        losses = []
        for v in candidates(before.reshape(-1)[j], dw, 0.0):
            W.reshape(-1)[j] = v
            losses.append(float(logit_cross_entropy(model(x[idx]).astype(np.float64), y[idx], "sum")))
        W[...] = before
        want = choose(*losses)
        got = call(mod, "rso_step", model, name, j, x[idx], y[idx], dw)
        if got not in names:
            raise CheckFailed(f"rso_step must return 0 (+dW), 1 (keep) or 2 (-dW), got {got!r}")
        if got != want:
            raise CheckFailed(f"rso_step on {name}[{j}] with dW={dw:.4g}: losses (+dW, keep, -dW) = "
                              f"{losses}; expected choice {names[want]}, got {names[got]}")
        expect_w = before.copy()
        expect_w.reshape(-1)[j] = candidates(before.reshape(-1)[j], dw, 0.0)[want]
        compare(f"{name} after rso_step (only weight {j} may change, to the chosen value)", W, expect_w, 0, 0)
        seen.add(want)
    return f"rso_step chooses like Algorithm 1 in 40 trials (choices seen: {sorted(names[s] for s in seen)})"


def _stored_input_slip(model, k, x_ref, x, got):
    """Which of two common slips a wrong ``stored_input`` before layer k matches, if any."""
    model.train()
    if np.allclose(got, model.forward(x, stop=k), rtol=1e-4, atol=1e-4):   # x's own statistics
        return ("each batch norm used the statistics of x itself (the pseudocode's per-trial statistics); "
                "use those of the reference batch x_ref, which passes through the same layers beside x")
    h_ref, h = x_ref, x                     # the reference batch skipping the batch norms
    for layer in model.layers[:k]:
        if isinstance(layer, BatchNorm2d):
            m, v = F.batch_stats(h_ref)
            h = F.batch_norm2d(h, layer.params["weight"], layer.params["bias"], m, v, layer.eps)[0]
        else:
            h_ref, h = layer.forward(h_ref), layer.forward(h)
    if np.allclose(got, h, rtol=1e-4, atol=1e-4):
        return ("x_ref went past a batch norm without being normalised, so the next batch norm took the "
                "statistics of un-normalised activations; normalise h_ref too, with its own statistics")
    return None


def check_frozen_bn(mod):
    rng = np.random.default_rng(4)
    # 1. batch_stats: the mean and the biased variance per channel
    for shape in [(2, 3, 4, 5), (16, 4, 7, 7)]:
        x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
        got = call(mod, "batch_stats", x)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckFailed(f"batch_stats(x {shape}) must return a pair (mean, var), got {type(got).__name__}")
        mean, var = F.batch_stats(x)
        compare(f"batch_stats(x {shape}) mean", got[0], mean, 1e-5, 1e-6)
        n = shape[0] * shape[2] * shape[3]
        if np.allclose(np.asarray(got[1]), var * n / (n - 1), rtol=1e-5, atol=1e-7):
            raise CheckFailed(f"batch_stats(x {shape}) var: that is the unbiased variance (divided by "
                              f"{n - 1}); batch norm divides by the count, {n}")
        compare(f"batch_stats(x {shape}) var", got[1], var, 1e-5, 1e-6)
    # 2. batch_norm2d with the batch's statistics and with given ones
    for shape, eps in [((4, 3, 5, 5), 1e-3), ((8, 2, 3, 6), 1e-5)]:
        x = (rng.standard_normal(shape) * 3 - 1).astype(np.float32)
        C = shape[1]
        g, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
        m, v = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
        compare(f"batch_norm2d(x {shape}, eps={eps:g}) with the batch's statistics",
                call(mod, "batch_norm2d", x, g, b, eps=eps), F.batch_norm2d(x, g, b, eps=eps)[0], 1e-4, 1e-5)
        compare(f"batch_norm2d(x {shape}, eps={eps:g}) with given mean and var",
                call(mod, "batch_norm2d", x, g, b, m, v, eps), F.batch_norm2d(x, g, b, m, v, eps)[0], 1e-4, 1e-5)
    # 3. stored_input: the searched layer's input with every batch norm before it frozen at the
    #    reference batch's statistics, as RSO.start_pass sets them (Sequential.set_reference_stats)
    # an epsilon large enough that leaving out layer.eps shows
    model = paper_mnist(batch_norm=True, channels=4, bn_eps=0.05, seed=5)
    for name, p in model.parameters().items():
        if name.startswith("bn"):
            p[...] = rng.uniform(0.5, 1.5, p.shape) if name.endswith("weight") else rng.normal(0, 0.3, p.shape)
    x_ref = rng.standard_normal((40, 1, 28, 28)).astype(np.float32)
    x = (rng.standard_normal((24, 1, 28, 28)) * 1.5 + 0.2).astype(np.float32)
    searched = ["conv3", "conv5", "fc"]
    model.set_reference_stats(x_ref)
    for name in searched:
        k = model.names.index(name)
        model.eval()
        want = model.forward(x, stop=k)
        got = call(mod, "stored_input", model.layers[:k], x_ref, x)
        if got is not None and np.shape(got) == want.shape and not np.allclose(got, want, 1e-4, 1e-4):
            slip = _stored_input_slip(model, k, x_ref, x, got)
            if slip:
                raise CheckFailed(f"stored_input before {name}: {slip}")
        compare(f"stored_input(model.layers[:{k}], x_ref, x), the input of {name}", got, want, 1e-4, 1e-4)
        # what freezing buys: an image's stored input does not depend on the other images
        alone = call(mod, "stored_input", model.layers[:k], x_ref, x[:5])
        compare(f"stored_input of the first 5 images alone, before {name} (it must not depend on the other "
                "images of x)", alone, np.asarray(got)[:5], 1e-5, 1e-5)
    return (f"batch_stats and batch_norm2d match rso_np.functional; stored_input matches the statistics "
            f"RSO.start_pass freezes, before {', '.join(searched)}, and an image's stored input does not "
            f"depend on the rest of its batch")


CHECKS = {"conv": check_conv, "maxpool": check_maxpool, "xent": check_xent, "rso_step": check_rso_step,
          "frozen_bn": check_frozen_bn}


def run_check(exercise, path=None):
    """Run one check; returns (ok, message)."""
    if exercise not in CHECKS:
        return False, f"unknown exercise {exercise!r}; choose one of {sorted(CHECKS)}"
    path = Path(path) if path else Path("tutorials") / "exercises" / EXERCISES[exercise]
    try:
        return True, CHECKS[exercise](load_module(path))
    except CheckFailed as exc:
        return False, str(exc)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    ok, msg = run_check(argv[0], argv[1] if len(argv) > 1 else None)
    print(("PASS: " if ok else "FAIL: ") + msg)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
