"""bench/ runs: a smoke test of the tools, not of the figures (timings belong in bench/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_module(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_bench_quick_case_produces_a_judged_row(tmp_path):
    out = tmp_path / "bench.json"
    p = run_module("bench", "--quick", "--case", "startup", "--case", "peer register",
                   "--json", str(out))
    doc = json.loads(out.read_text())
    rows = {r["case"]: r for r in doc["rows"]}
    assert set(rows) == {"startup", "peer register"}, p.stdout + p.stderr
    for row in rows.values():
        # PASS or MISS depends on the machine; ERROR would mean the case could not run.
        assert row["status"] in ("PASS", "MISS"), row
        assert row["ratio"] == row["figure"] / row["baseline"]
    assert p.returncode == (0 if all(r["status"] == "PASS" for r in rows.values()) else 1)


def test_crash_soak_runs_and_finds_no_violation():
    p = run_module("bench.soak", "--only", "crash", "--iterations", "20")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "crash: 20 kill rounds" in p.stdout
    assert p.stdout.rstrip().endswith("soak: 0 violations")
