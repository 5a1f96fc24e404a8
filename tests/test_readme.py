"""The result tables of README and docs/results.md are the histories they name: each block that starts
with ``<!-- table: PATH -->`` (or ``<!-- runs: PATH PATH ... -->``) and ends with ``<!-- end of table -->``
is ``python -m rso_np table PATH`` (``table PATH PATH ...``). Their figures are files that exist."""

import json
import re
from pathlib import Path

import pytest

from rso_np.training import history_markdown, runs_markdown

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- table: (\S+) -->\n(.*?)<!-- end of table -->", re.S)
DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "docs/results.md")}
TABLES = [(name, path, table) for name, text in DOCS.items() for path, table in BLOCK.findall(text)]
SIDE_BY_SIDE = [(name, paths, table) for name, text in DOCS.items()
                for paths, table in re.findall(r"<!-- runs: ([^>]+?) -->\n(.*?)<!-- end of table -->", text, re.S)]
IMAGES = [(name, target) for name, text in DOCS.items() for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)]


def test_documents_have_result_tables():
    counts = {name: sum(1 for n, _, _ in TABLES if n == name) for name in DOCS}
    assert counts["README.md"] >= 2 and counts["docs/results.md"] >= 6, counts
    assert SIDE_BY_SIDE and len(IMAGES) >= 8


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_table_marker_is_checked(name):
    """A marker the patterns above do not read (two paths after ``table:``, no end marker) would leave its
    table unchecked: every ``<!-- table:`` or ``<!-- runs:`` that opens a line must start a tested block."""
    text = DOCS[name]
    read = sum(1 for n, _, _ in TABLES if n == name) + sum(1 for n, _, _ in SIDE_BY_SIDE if n == name)
    markers = len(re.findall(r"^<!-- (?:table|runs):", text, re.M))      # at a line's start: not the prose
    assert markers == read, (f"{name} has {markers} table markers, {read} of them read as "
                             "'table: PATH' or 'runs: PATHS'")


@pytest.mark.parametrize("name,target", IMAGES, ids=[f"{n}:{t}" for n, t in IMAGES])
def test_figure_exists(name, target):
    """A figure's path is relative to the document that shows it (docs/results.md's start with results/)."""
    assert ((ROOT / name).parent / target).is_file(), f"{name} shows {target}, which is not there"


@pytest.mark.parametrize("name,path,table", TABLES, ids=[f"{n}:{p}" for n, p, _ in TABLES])
def test_table_is_its_history(name, path, table):
    meta = json.loads((ROOT / path).read_text())
    assert table == history_markdown(meta), f"{name}'s table of {path} differs: python -m rso_np table {path}"


@pytest.mark.parametrize("name,paths,table", SIDE_BY_SIDE, ids=[f"{n}:{p}" for n, p, _ in SIDE_BY_SIDE])
def test_side_by_side_table_is_its_histories(name, paths, table):
    metas = [json.loads((ROOT / p).read_text()) for p in paths.split()]
    assert table == runs_markdown(metas), f"{name}'s table of {paths} differs: python -m rso_np table {paths}"


def test_side_by_side_table():
    """Columns named by the settings that differ; the best so far in brackets where it differs from the
    round's own figure; a mean only for rounds every run has."""
    rec = lambda r, acc, passes=(): {"round": r, "test_acc": acc, "passes": [{"test_acc": a} for a in passes]}
    run = lambda seed, bs, hist: {"settings": {"model": "m", "seed": seed, "rso": {"batch_size": bs, "x": 1}},
                                  "history": hist}
    metas = [run(0, 5000, [rec(0, 0.1), rec(1, 0.8, [0.9]), rec(2, 0.85)]),
             run(1, 2000, [rec(0, 0.2), rec(1, 0.6)])]
    lines = runs_markdown(metas).splitlines()
    assert lines[0] == "| round | rso.batch_size 5000, seed 0 | rso.batch_size 2000, seed 1 | mean |"
    assert lines[2:] == ["| 0 | 10.00% | 20.00% | 15.00% |",
                         "| 1 | 80.00% (90.00%) | 60.00% | 70.00% (75.00%) |",
                         "| 2 | 85.00% (90.00%) |  |  |"]
    with pytest.raises(ValueError, match="at least two runs"):
        runs_markdown(metas[:1])


def test_side_by_side_names_what_each_run_ran_with():
    """An option a run's record lacks (recorded before the option existed) has its default, and None for a
    model's own option is the model's value: a paper_mnist_bn run recorded before --global-pool beside one
    with global max pooling is named 'global_pool avg', and one without --bn-eps 'bn_eps 1e-05'."""
    hist = [{"round": 0, "test_acc": 0.1, "passes": []}]
    old = {"settings": {"model": "paper_mnist_bn", "seed": 0, "rso": {"batch_size": 5000}}, "history": hist}
    new = {"settings": {"model": "paper_mnist_bn", "seed": 0, "global_pool": "max", "bn_eps": 1e-3},
           "history": hist}
    assert runs_markdown([old, new]).splitlines()[0] == \
        "| round | bn_eps 1e-05, global_pool avg, rso.batch_size 5000 | " \
        "bn_eps 0.001, global_pool max, rso.batch_size 1024 | mean |"


def test_table_best_counts_layer_passes():
    rec = lambda r, acc, passes=(): {"round": r, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
                                     "test_acc": acc, "accepted": None if r == 0 else 0.25, "seconds": 12.4,
                                     "passes": [{"test_acc": a} for a in passes]}
    meta = {"optimizer": "rso", "history": [rec(0, 0.1), rec(1, 0.8, [0.5, 0.85]), rec(2, 0.82, [0.81])]}
    rows = [line.split(" | ") for line in history_markdown(meta).splitlines()[2:]]
    assert [r[5] for r in rows] == ["10.00%", "85.00%", "85.00%"]       # a pass's 85% stays the best
    assert [r[6] for r in rows] == ["", "25.0%", "25.0%"]
    assert rows[0][7] == "12 |"
