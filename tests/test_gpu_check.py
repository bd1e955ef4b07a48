"""scripts/gpu_check.sh in its dry mode (no GPU): every step's plumbing, the CPU bench, the GP workload of
the memcheck step and refine with a precision, down to summary.md. The CUDA steps themselves run where
a GPU is lent (bash scripts/gpu_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    environ.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=environ)


def test_the_dry_run_goes_through_every_step(tmp_path):
    out = tmp_path / "check"
    done = run("--out", str(out), GPU_CHECK_DRY="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (dry run: no GPU used)") and "all steps passed" in summary
    assert "- GPU: none (torch finds no CUDA device)" in summary
    for name, status in [("tier", "skipped"), ("memcheck_dry", "ok"), ("bench", "ok"), ("refine_fp16", "ok")]:
        assert f"| {name} | {status} |" in summary, name
    rows = json.loads((out / "bench_gpu.json").read_text())["rows"]
    assert [(r["size"], r["K"], r["batch"]) for r in rows] == [(32, 3, 1)] and rows[0]["gp_total_ms"] > 0
    refined = json.loads((out / "refine_fp16" / "summary.json").read_text())
    assert (refined["device"], refined["precision"], refined["refined"]) == ("cpu", "fp16", 1)
    assert "16x16 x3 on cpu (cpu): trees equal" in (out / "memcheck_dry.log").read_text()
    assert sorted(p.name for p in (out / "cache").iterdir()) == ["text"]  # caches stay in the output folder


def test_an_unknown_argument_is_one_line_and_status_2(tmp_path):
    done = run("--gpu", "--out", str(tmp_path))
    assert done.returncode == 2 and done.stderr == "error: unknown argument --gpu (see --help)\n"
