"""Sweeps: a grid of ``train`` runs (seeds, the paper's ablations, one configuration per student) on Dask.

A SPEC file (TOML, or JSON) holds a base configuration and axes; every point of the grid is an ordinary
run folder under the sweep's output folder, named from its settings::

    out = "runs/layer-order"                  # optional; default: next to the SPEC, named after it
    [base]                                    # any `train` option, by its name (dashes or underscores)
    model = "small_mnist"
    train_limit = 10000
    rounds = 2
    [axes]                                    # lists of values; the grid is every combination
    layer_order = ["last-to-first", "first-to-last"]
    seed = [0, 1, 2]

``stop_after = N`` in a SPEC means N rounds in all (e.g. the first 2 rounds of the 50-round schedule of
``rounds = 50``): a point is finished when it has run them.

``run_sweep`` runs the points that are not finished on a Dask cluster: a ``LocalCluster`` it starts (one
single-threaded worker process per core, so that the workers do not fight over BLAS threads), or an
existing one (``scheduler``). A worker runs a point as ``train`` would, in its folder: from scratch, or
from the point's checkpoint if it has one (a point whose worker was lost is started again by Dask and
goes on from its last finished layer pass). Workers need the data (``data_dir`` in the SPEC, or
``$RSO_NP_DATA``, on every worker) and the output folder on a file system they share with the client.
"""

import json
import os
import sys
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path

SPEC_KEYS = ("base", "axes", "out")
NOT_IN_SPEC = ("out", "resume", "no_progress")           # options of one invocation of train


class SpecError(ValueError):
    """A SPEC file that cannot be run (the message names the file and the problem)."""


@dataclass
class Point:
    name: str              # folder name, from the axes' settings
    settings: dict         # the axes' values of this point
    options: dict          # base + settings: train option -> value
    out: Path              # its run folder


def _read(path):
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        try:
            import tomllib
        except ImportError:                                   # Python < 3.11
            import tomli as tomllib
        return tomllib.loads(text)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({exc})") from None


def _argv(options):
    """train's command line for a dict of options (names with underscores)."""
    argv = ["train"]
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if k == "search_bn":
            argv += [] if v else ["--no-search-bn"]
        elif isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [flag, str(v)]
    return argv


def _point_name(settings):
    safe = lambda v: "".join(c if c.isalnum() or c in ".-" else "-" for c in str(v))
    return "_".join(f"{k}-{safe(v)}" for k, v in settings.items()) or "base"


def load_spec(path):
    """The points of a SPEC file, each checked as ``train`` would check its options: (out folder, points).
    A SpecError names the file and the problem before anything runs."""
    from .cli import UsageError, build_parser, run_config, train_option_names
    spec = _read(path)
    if not isinstance(spec, dict) or set(spec) - set(SPEC_KEYS):
        extra = sorted(set(spec) - set(SPEC_KEYS)) if isinstance(spec, dict) else spec
        raise SpecError(f"{path}: unknown top-level key(s) {extra}; a SPEC has {', '.join(SPEC_KEYS)}")
    base, axes = spec.get("base", {}), spec.get("axes", {})
    for what, d in (("base", base), ("axes", axes)):
        if not isinstance(d, dict):
            raise SpecError(f"{path}: [{what}] must be a table of option = value, got {type(d).__name__}")
    norm = lambda k: k.replace("-", "_")
    base, axes = {norm(k): v for k, v in base.items()}, {norm(k): v for k, v in axes.items()}
    if isinstance(base.get("data_dir"), str) and Path(base["data_dir"]).exists():
        base["data_dir"] = str(Path(base["data_dir"]).resolve())
    known = train_option_names()
    for k in list(base) + list(axes):
        if k not in known or k in NOT_IN_SPEC:
            raise SpecError(f"{path}: unknown option {k!r} (use the names of 'train' options, e.g. batch_size)")
    for k, v in axes.items():
        if not isinstance(v, list) or not v:
            raise SpecError(f"{path}: axis {k!r} must be a non-empty list of values, got {v!r}")
    out = Path(spec.get("out") or Path(path).with_suffix("")).resolve()     # workers get absolute paths
    points = []
    for values in product(*axes.values()):
        settings = dict(zip(axes, values))
        options = {**base, **settings}
        try:
            args = build_parser().parse_args(_argv(options))
            run_config(args)
        except (UsageError, ValueError) as exc:
            raise SpecError(f"{path}: point {settings or 'base'}: {str(exc).split('error: ')[-1]}") from None
        name = _point_name(settings)
        points.append(Point(name, settings, options, out / name))
    return out, points


def _target(options, rounds):
    """The rounds a point runs in all: its schedule's, or fewer with ``stop_after``."""
    return min(rounds, int(options["stop_after"])) if options.get("stop_after") else rounds


def point_status(point):
    """"done" (every round of the point finished), "partial" (a checkpoint to go on from) or "new"."""
    from .training import CHECKPOINT, load_run
    if not (point.out / CHECKPOINT).exists():
        return "new"
    try:
        meta = load_run(point.out)
        if meta["history"] and meta["history"][-1]["round"] >= _target(point.options, meta["settings"]["rounds"]):
            return "done"
    except (ValueError, KeyError):
        pass
    return "partial"


def run_point(options, out):
    """Run one point in its folder, as ``train`` would (going on from its checkpoint if it has one);
    returns its summary. Runs on a Dask worker."""
    from .cli import build_parser, run_config
    from .training import CHECKPOINT, Trainer
    args = build_parser().parse_args(_argv(options))
    out = Path(out)
    trainer = Trainer(run_config(args), out, device=args.device, data_dir=args.data_dir,
                      resume=(out / CHECKPOINT).exists(), log=lambda s: None)
    left = _target(options, trainer.config.rounds) - trainer.rounds_done
    if left > 0:
        trainer.run(stop_after=left)
    return summary(trainer.history)


def summary(history):
    from .training import running_best
    return {"final_test_acc": history[-1]["test_acc"], "best_test_acc": running_best(history)[-1],
            "rounds": history[-1]["round"], "seconds": sum(r["seconds"] for r in history)}


def run_sweep(spec_path, scheduler=None, workers=None, log=print):
    """Run every unfinished point of a SPEC on Dask; returns {point name: error text} of the failed ones."""
    from dask.distributed import Client, LocalCluster, as_completed
    out, points = load_spec(spec_path)
    todo = [p for p in points if point_status(p) != "done"]
    log(f"sweep {spec_path}: {len(points)} points in {out}, {len(points) - len(todo)} already done")
    out.mkdir(parents=True, exist_ok=True)
    failed = {}
    if todo:
        cluster = None
        if scheduler is None:
            n = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
            cluster = LocalCluster(n_workers=min(n, len(todo)), threads_per_worker=1, processes=True,
                                   dashboard_address=None)
        try:
            with Client(scheduler or cluster) as client:
                failed = _run_points(client, todo, log, as_completed)
        finally:
            if cluster is not None:
                cluster.close()
    report(spec_path, log=log)
    return failed


def _run_points(client, todo, log, as_completed):
    futures = {client.submit(run_point, p.options, str(p.out), key=f"rso_np-point-{p.name}-{time.time_ns()}",
                             pure=False, retries=1): p for p in todo}
    done, failed, t0 = 0, {}, time.perf_counter()
    for fut in as_completed(futures):
        p = futures[fut]
        try:
            fut.result()
            done += 1
        except Exception as exc:                             # a bad point does not stop the others
            failed[p.name] = f"{type(exc).__name__}: {exc}"
            log(f"  point {p.name} failed: {failed[p.name]}")
        left = len(todo) - done - len(failed)
        per = (time.perf_counter() - t0) / max(done + len(failed), 1)
        n = max(len(client.scheduler_info().get("workers", {})), 1)
        log(f"  points: {done} done, {min(n, left)} running, {len(failed)} failed, {max(left - n, 0)} waiting; "
            f"about {per * left / n:.0f} s left")
    return failed


def report(spec_path, log=print):
    """sweep.csv, sweep.md and sweep.png in the sweep's folder, from the points' run folders."""
    import csv
    import io

    from ._io import atomic_write_text
    from .plotting import plot_sweep
    from .training import load_run
    out, points = load_spec(spec_path)
    rows, curves = [], []
    for p in points:
        if point_status(p) == "new":
            continue
        h = load_run(p.out)["history"]
        rows.append({**p.settings, **summary(h), "status": point_status(p)})
        curves.append((p.settings, [r["round"] for r in h], [r["test_acc"] for r in h]))
    if not rows:
        log(f"report: no point of {spec_path} has run yet")
        return None
    fields = list(rows[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    fmt = lambda k, v: f"{100 * v:.2f}%" if k.endswith("acc") else (f"{v:.0f}" if k == "seconds" else str(v))
    md = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    md += ["| " + " | ".join(fmt(k, r[k]) for k in fields) + " |" for r in rows]
    atomic_write_text(out / "sweep.md", "\n".join(md) + "\n")
    plot_sweep(curves, out / "sweep.png", title=f"sweep {Path(spec_path).name}")
    log("\n".join(md))
    log(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    return rows


def main(spec, scheduler=None, workers=None, only_report=False, log=print):
    """The ``sweep`` command: 0 when every point finished, 1 when some failed (SpecError: the caller's)."""
    if only_report:
        load_spec(spec)
        report(spec, log=log)
        return 0
    failed = run_sweep(spec, scheduler, workers, log)
    if failed:
        print(f"rso-np sweep: {len(failed)} point(s) failed: {', '.join(sorted(failed))}", file=sys.stderr)
        return 1
    return 0
