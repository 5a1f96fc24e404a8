"""The benchmark scripts start: each one's --help, and the prepared GPU check's dry run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def run(args, **env):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", **env)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script):
    out = run([sys.executable, f"benchmarks/{script}", "--help"])
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and f"benchmarks/{script}" in out.stdout, out.stdout[:300]


def test_gpu_check_dry_run(tmp_path):
    out = run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], OUT=str(tmp_path))
    assert out.returncode == 0, out.stderr
    for step in ("tests:", "paper:", "conv:", "bench:", "train:", "parity:", "done:"):
        assert f"=== {step}" in out.stdout, (step, out.stdout)
    assert "skipped: no GPU" in out.stdout
