"""refine, evaluate and compare sharded over 2 gloo processes equal one process; a failing rank
ends every rank; refine's labels feed offline training (the two-stage pipeline)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskclip_apro.cli import compare, evaluate, refine
from maskclip_apro.config import compose
from maskclip_apro.data.io import load_label
from maskclip_apro.writing import save_label_png

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=tiny_vit", "generator.short_side=64", "generator.window=64", "generator.stride=32",
        "refine.apro.iters=3"]
METHODS = {"MaskCLIP": [], "+KS": ["ks"], "+APro": ["apro"]}
COMMANDS = {"refine": refine, "evaluate": evaluate, "compare": compare}
TIMING = ("wall_seconds", "images_per_second", "processes", "seconds_per_image", "generator_seconds_per_image",
          "postprocess_seconds_per_image", "config")


def _folder(root: Path, sizes, broken: int | None = None) -> Path:
    """root/{images,labels,classes.txt}: random images of the given sizes, labels of 3 classes."""
    rng = np.random.default_rng(1)
    for i, size in enumerate(sizes):
        (root / "images").mkdir(parents=True, exist_ok=True)
        path = root / "images" / f"im{i}.png"
        if i == broken:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        save_label_png(root / "labels" / f"im{i}.png", rng.integers(0, 3, size).astype(np.uint8))
    (root / "classes.txt").write_text("background\ncat\ngrass\n")
    return root


def _cases(data: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (command, overrides): each command on the synthetic set (5 images: shards of 3 and 2)
    and on a folder of images of three sizes; refine's synthetic run is the train split (two-stage)."""
    synthetic = ["dataset=synthetic", "dataset.num_images=5"]
    folder = ["dataset=folder", f"dataset.root={data / 'folder'}"]
    return {
        "refine_synthetic": ("refine", [*synthetic, "dataset.split=train", "save_probs=true"]),
        "refine_folder": ("refine", [*folder, "refine=ks_pd", "workers=1"]),
        "evaluate_synthetic": ("evaluate", [*synthetic, "refine=apro"]),
        "evaluate_folder": ("evaluate", [*folder, "refine=ks"]),
        "compare_synthetic": ("compare", [*synthetic, "panels=2"]),
        "compare_folder": ("compare", [*folder, "panels=0", "workers=1"]),
    }


def _run(command: str, overrides: list[str], data: Path, out: Path) -> dict:
    cfg = compose(command, [f"generator.cache_dir={data / 'text_cache'}", f"output_dir={out}", *FAST, *overrides])
    if command == "compare":
        cfg.methods = METHODS
    return COMMANDS[command].run(cfg)


def _comparable(results):
    """Results without what depends on the clock, the output folder or the process count."""
    if isinstance(results, dict):
        return {k: _comparable(v) for k, v in results.items() if k not in TIMING}
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from maskclip_apro.distributed import process_group
    from maskclip_apro.pipeline import loop

    data = Path(data)
    with process_group("cpu"):
        results = {name: _comparable(_run(command, overrides, data, data / "two" / name))
                   for name, (command, overrides) in _cases(data).items()}
        (data / f"rank{rank}.json").write_text(json.dumps(results, default=float))
        # A rank that fails stops the other at their next check (every item here), not at the end.
        loop.SYNC_ITEMS = 1
        try:
            _run("evaluate", ["dataset=folder", f"dataset.root={data / 'broken'}", "refine=none"], data,
                 data / "broken_out")
        except ValueError as error:
            (data / f"error{rank}.txt").write_text(str(error))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case run once by 2 gloo processes and once by this one (1 thread, as the workers)."""
    import torch.multiprocessing as mp

    data = tmp_path_factory.mktemp("dist")
    _folder(data / "folder", [(48, 64), (64, 48), (48, 64), (40, 56)])
    _folder(data / "broken", [(48, 64)] * 6, broken=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = {name: _run(command, overrides, data, data / "one" / name)
               for name, (command, overrides) in _cases(data).items()}
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), str(data)), nprocs=2, join=True)
    return data, one


@pytest.mark.parametrize("case", list(_cases(Path("."))))
def test_two_processes_equal_one(two_ranks, case):
    data, one = two_ranks
    ranks = [json.loads((data / f"rank{r}.json").read_text())[case] for r in (0, 1)]
    expected = json.loads(json.dumps(_comparable(one[case]), default=float))
    assert ranks[0] == expected and ranks[1] == expected  # every rank returns the whole job's results
    a, b = data / "one" / case, data / "two" / case
    if case.startswith("refine"):
        names = sorted(p.name for p in (a / "labels").iterdir())
        assert names == sorted(p.name for p in (b / "labels").iterdir()) and len(names) in (4, 5)
        for name in names:
            assert np.array_equal(load_label(a / "labels" / name), load_label(b / "labels" / name)), name
        assert json.loads((b / "summary.json").read_text())["processes"] == 2
        assert len(list((b / "records").glob("*.json"))) == len(names)
    else:
        records = sorted(p.name for p in (b / "per_image").iterdir())
        assert records == sorted(p.name for p in (a / "per_image").iterdir())
        for name in records:
            with np.load(a / "per_image" / name) as x, np.load(b / "per_image" / name) as y:
                for j in range(len(one[case]["methods"])):
                    assert np.array_equal(x[f"cm{j}"], y[f"cm{j}"]), (name, j)
        saved = json.loads((b / "results.json").read_text())
        assert saved["processes"] == 2 and _comparable(saved) == expected
    if case == "compare_synthetic":
        assert sorted(p.name for p in (b / "panels").iterdir()) == ["synthetic_val_0000.png", "synthetic_val_0001.png"]


def test_a_sharded_run_resumes_per_image_with_any_process_count(two_ranks):
    data, one = two_ranks
    out = data / "two" / "refine_folder"
    (out / "records" / "im2.json").unlink()
    again = _run("refine", _cases(data)["refine_folder"][1], data, out)
    assert again["reused"] == 3 and again["not_reused"] == {"new": 1}
    assert _comparable(again)["metrics"] == _comparable(one["refine_folder"])["metrics"]


def test_a_failing_rank_ends_every_rank(two_ranks):
    data, _ = two_ranks
    failed = (data / "error1.txt").read_text()
    assert "im1.png" in failed and "not an image" in failed
    assert (data / "error0.txt").read_text() == f"rank 1 of 2 stopped the run: ValueError: {failed}"
    # Rank 0 (items 0, 2, 4) learnt of it after its first image and went no further.
    assert sorted(p.name for p in (data / "broken_out" / "per_image").iterdir()) == ["im0.npz"]


def test_refined_train_labels_train_a_student_offline(two_ranks, tmp_path):
    """The two-stage pipeline: labels refined by 2 processes, then training reads them."""
    from maskclip_apro.cli.train import run

    data, _ = two_ranks
    labels = data / "two" / "refine_synthetic" / "labels"
    assert len(list(labels.glob("synthetic_train_*.png"))) == 5
    assert len(list((labels.parent / "probs").glob("*.safetensors"))) == 5
    cfg = compose("train", [
        "dataset=synthetic", "dataset.num_images=5", "model=tiny_vit", "student=tiny", "student.head=aspp",
        "student.pretrained=false", "crop=32", "batch_size=2", "iters=2", "workers=0", "eval.interval=0",
        "device=cpu", f"target.offline_dir={labels}", f"output_dir={tmp_path / 'train'}",
    ])
    losses = run(cfg)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (tmp_path / "train" / "model.safetensors").is_file()


def test_torchrun_refine_writes_one_summary_and_exits_cleanly_every_time(tmp_path):
    """The command itself under torchrun: 2 CPU processes, each image written once, one summary;
    run RUNS times (the second reuses every image), each run must end with status 0 (a rank that
    left the process group without the others used to die with SIGABRT about 1 run in 9)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "scripts" / "refine.py"), "dataset=synthetic", "dataset.num_images=3", "refine=none",
           f"generator.cache_dir={tmp_path / 'cache'}", f"output_dir={out}", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for run in range(RUNS):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert done.returncode == 0, f"run {run + 1}: " + done.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        expected = "3 images: 0 reused, 3 computed (3 new)" if run == 0 else "3 images: 3 reused"
        assert done.stdout.count(expected) == 1  # rank 0 reports, alone
        if run == 0:
            stages = summary["seconds_per_image"]  # averaged over the images of both processes
            assert set(stages) == {"read", "generator", "postprocess", "write"} and all(v > 0 for v in stages.values())
            assert summary["refined"] == 3 and summary["images_per_second"] > 0
        cmd[6] = str(_free_port())
    assert summary["processes"] == 2 and summary["reused"] == 3
    first = json.loads((out / "records" / "synthetic_val_0000.json").read_text())
    assert set(first["outputs"]) == {"label", "overlay"}
    assert sorted(p.name for p in (out / "labels").iterdir()) == [f"synthetic_val_000{i}.png" for i in range(3)]


RUNS = 2  # each run starts three Python processes that import torch (about 10 s on 2 busy cores)
