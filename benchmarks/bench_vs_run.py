"""How well bench_rso.py's estimate of a round matches a real one, layer pass by layer pass.

    python benchmarks/bench_vs_run.py BENCH_JSON RUN_DIR [--round N] [--engine fast]

BENCH_JSON is what ``bench_rso.py --out`` wrote; RUN_DIR a run folder written by ``python -m rso_np train``
on the same configuration, whose history records each layer pass's seconds (``pass_seconds``: its store
pass and its trials, not the evaluation after it). For every layer it prints the benchmark's estimate of
the pass (its setup, the first trial once where it was timed apart, the other trials at their pace), the
pass as the run measured it, and their ratio; then the two rounds. Default round: the run's last one
with ``pass_seconds``.

The two are measured at different times (and a run may share the machine), so this checks the estimate's
shape, which layers it over- or underrates; a ratio to PyTorch still comes from one run of bench_rso.py.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rso import pass_seconds  # noqa: E402  (the estimate bench_rso.round_seconds sums)


def compare(bench, history, rnd=None, engine="fast"):
    """[(layer, estimated s, measured s)] for the layers both have, in the run's order, and the round used."""
    layers = bench["engines"][engine]["layers"]
    rounds = [r for r in history if r.get("pass_seconds")]
    if not rounds:
        raise ValueError("the run records no pass_seconds (it was made before rso_np recorded them)")
    rec = rounds[-1] if rnd is None else next((r for r in rounds if r["round"] == rnd), None)
    if rec is None:
        raise ValueError(f"round {rnd}: not in the run, or without pass_seconds")
    rows = [(w, pass_seconds(layers[w]), t) for w, t in rec["pass_seconds"].items() if w in layers]
    return rows, rec["round"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", help="the JSON bench_rso.py wrote (--out)")
    ap.add_argument("run", help="a run folder (or its history.json)")
    ap.add_argument("--round", type=int, help="the run's round to compare (default: its last with pass_seconds)")
    ap.add_argument("--engine", default="fast", help="the benchmark's engine (default: fast)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    try:
        bench = json.loads(Path(args.bench).read_text())
        history = json.loads((run / "history.json" if run.is_dir() else run).read_text())["history"]
        if args.engine not in bench.get("engines", {}):
            raise ValueError(f"{args.bench}: no engine {args.engine!r} in it")
        rows, rnd = compare(bench, history, args.round, args.engine)
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench_vs_run.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"| layer | estimated s | measured s (round {rnd}) | estimated / measured |")
    print("|---|---:|---:|---:|")
    for w, est, got in rows:
        print(f"| {w} | {est:.1f} | {got:.1f} | {est / got:.2f} |")
    est, got = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"| **round** | **{est:.0f}** | **{got:.0f}** | **{est / got:.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
