"""A Hydra multirun over the compare command ends with one table of every job's results."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare.py"
SMALL = ["generator.short_side=64", "generator.window=64", "generator.stride=32", "refine.apro.iters=3", "panels=0"]


def test_two_job_sweep_is_collected_into_one_table(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "-m", "dataset=synthetic", "model=tiny_vit", "limit=2",
         "refine.apro.zeta_g=0.05,0.2", f"output_dir={out}", f"generator.cache_dir={tmp_path / 'cache'}", *SMALL],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (sweep_dir,) = list((out / "sweep").iterdir())
    jobs = {p.name: json.loads((p / "results.json").read_text()) for p in sweep_dir.iterdir() if p.is_dir()}
    assert sorted(jobs) == ["0", "1"]
    assert [jobs[j]["config"]["refine"]["apro"]["zeta_g"] for j in ("0", "1")] == [0.05, 0.2]

    records = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert [(r["job"], r["overrides"]["refine.apro.zeta_g"]) for r in records] == [("0", "0.05"), ("1", "0.2")]
    table = (sweep_dir / "sweep_table.md").read_text()
    assert "| job | refine.apro.zeta_g | method |" in table
    methods = list(jobs["0"]["methods"])
    for job, zeta in (("0", "0.05"), ("1", "0.2")):
        for name, m in jobs[job]["methods"].items():
            assert f"| {job} | {zeta} | {name} | {100 * m['mIoU']:.2f} |" in table
    assert len([line for line in table.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]) == 2 * len(
        methods)
    assert table in done.stdout
