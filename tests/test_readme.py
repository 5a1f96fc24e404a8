"""README's result tables are the histories they name: each block that starts with
``<!-- table: PATH -->`` and ends with ``<!-- end of table -->`` is ``python -m rso_np table PATH``."""

import json
import re
from pathlib import Path

import pytest

from rso_np.training import history_markdown

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- table: (\S+) -->\n(.*?)<!-- end of table -->", re.S)
TABLES = BLOCK.findall((ROOT / "README.md").read_text())


def test_readme_has_result_tables():
    assert len(TABLES) >= 6


@pytest.mark.parametrize("path,table", TABLES, ids=[p for p, _ in TABLES])
def test_readme_table_is_its_history(path, table):
    meta = json.loads((ROOT / path).read_text())
    assert table == history_markdown(meta), f"README's table of {path} differs: python -m rso_np table {path}"


def test_table_best_counts_layer_passes():
    rec = lambda r, acc, passes=(): {"round": r, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
                                     "test_acc": acc, "accepted": None if r == 0 else 0.25, "seconds": 12.4,
                                     "passes": [{"test_acc": a} for a in passes]}
    meta = {"optimizer": "rso", "history": [rec(0, 0.1), rec(1, 0.8, [0.5, 0.85]), rec(2, 0.82, [0.81])]}
    rows = [line.split(" | ") for line in history_markdown(meta).splitlines()[2:]]
    assert [r[5] for r in rows] == ["10.00%", "85.00%", "85.00%"]       # a pass's 85% stays the best
    assert [r[6] for r in rows] == ["", "25.0%", "25.0%"]
    assert rows[0][7] == "12 |"
