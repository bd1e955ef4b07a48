"""maskclip_apro.writing beyond what test_io covers: folders, RGB images, safetensors, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save as save_numpy

from maskclip_apro.writing import (
    atomic_directory,
    remove_stale_temporaries,
    save_label_png,
    save_rgb,
    save_safetensors,
    write_json,
)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700)])
def test_atomic_directory_appears_whole_with_the_umask_permissions(tmp_path, umask, mode):
    target = tmp_path / "ckpt" / "step_1"
    old = os.umask(umask)
    try:
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("a")
            assert not target.exists() and tmp.parent == target.parent
    finally:
        os.umask(old)
    assert (target / "a.txt").read_text() == "a" and target.stat().st_mode & 0o777 == mode
    assert [p.name for p in target.parent.iterdir()] == ["step_1"]


def test_atomic_directory_keeps_the_old_folder_when_the_block_fails(tmp_path):
    target = tmp_path / "step_1"
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]


def test_a_killed_writers_temporary_folder_is_removed(tmp_path):
    killed = (
        "import os, signal, sys\n"
        "from maskclip_apro.writing import atomic_directory\n"
        "with atomic_directory(sys.argv[1]) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    folder = tmp_path / "checkpoints"
    done = subprocess.run([sys.executable, "-c", killed, str(folder / "step_00000002")], capture_output=True, timeout=120)
    assert done.returncode == -9
    (stale,) = folder.iterdir()
    assert stale.is_dir() and stale.name.startswith(".step_00000002.") and stale.name.endswith(".tmp")
    (folder / "step_00000001").mkdir()
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert [p.name for p in folder.iterdir()] == ["step_00000001"]


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG")])
def test_save_rgb_writes_the_format_of_the_extension(tmp_path, suffix, fmt):
    image = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    save_rgb(tmp_path / f"x{suffix}", image)
    with Image.open(tmp_path / f"x{suffix}") as im:
        assert im.format == fmt and im.size == (9, 6) and im.mode == "RGB"
        if fmt == "PNG":
            np.testing.assert_array_equal(np.asarray(im), image)


def test_save_rgb_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        save_rgb(tmp_path / "x.unknown", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        save_rgb(tmp_path / "x.png", np.zeros((2, 2), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_label_png_palette_or_grayscale_reads_back_the_classes(tmp_path):
    labels = np.array([[0, 1, 2], [255, 20, 3]], dtype=np.uint8)
    save_label_png(tmp_path / "p.png", labels)
    save_label_png(tmp_path / "l.png", labels, grayscale=True)
    for name, mode in (("p.png", "P"), ("l.png", "L")):
        with Image.open(tmp_path / name) as im:
            assert im.mode == mode
            np.testing.assert_array_equal(np.asarray(im), labels)


def test_safetensors_round_trip_and_float16_like_numpy(tmp_path):
    probs = torch.rand(3, 5, 7, dtype=torch.float32) * 1.7
    save_safetensors(tmp_path / "a.safetensors", {"probs": probs.to(torch.float16)}, metadata={"k": "v"})
    (tmp_path / "b.safetensors").write_bytes(save_numpy({"probs": probs.numpy().astype(np.float16)}))
    a, b = load_numpy(tmp_path / "a.safetensors")["probs"], load_numpy(tmp_path / "b.safetensors")["probs"]
    assert a.dtype == np.float16 and np.array_equal(a, b)  # torch and numpy round float32 -> float16 alike


def test_write_json_numbers_from_numpy(tmp_path):
    write_json(tmp_path / "r.json", {"miou": np.float32(0.5), "n": 3})
    assert json.loads((tmp_path / "r.json").read_text()) == {"miou": 0.5, "n": 3}


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    from safetensors import safe_open

    metadata = {f"key{i}": str(i) for i in range(12)}
    tensors = {"b": torch.arange(6.0), "a": torch.ones(2, 3, dtype=torch.int64)}
    files = []
    for n in range(6):
        save_safetensors(tmp_path / f"{n}.safetensors", tensors, metadata=metadata)
        files.append((tmp_path / f"{n}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata and torch.equal(f.get_tensor("b"), tensors["b"])
