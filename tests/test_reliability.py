"""What reruns reuse, what a bad run prints, where files go: the commands end to end (tiny model)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskclip_apro.cli import compare, evaluate, refine
from maskclip_apro.config import compose
from maskclip_apro.writing import save_label_png
from maskclip_apro.generator.models import load_clip
from maskclip_apro.pipeline import reuse

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
FAST = ["model=tiny_vit", "generator.short_side=64", "generator.window=64", "generator.stride=32", "refine=none"]


def _args(tmp_path, *extra):
    return [f"generator.cache_dir={tmp_path / 'text_cache'}", f"output_dir={tmp_path / 'out'}", *FAST, *extra]


def _write_image(path: Path, seed: int, size=(40, 56)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    _touch_later(path)


def _touch_later(path: Path) -> None:
    """A rewrite a second later than anything before, whatever the file system's clock resolution."""
    later = time.time_ns() + 10**9 * (1 + _touch_later.calls)
    _touch_later.calls += 1
    os.utime(path, ns=(later, later))


_touch_later.calls = 0


@pytest.fixture
def labelled(tmp_path):
    """root/images, root/labels, root/classes.txt with two images."""
    root = tmp_path / "data"
    for i, name in enumerate("ab"):
        _write_image(root / "images" / f"{name}.png", i)
        save_label_png(root / "labels" / f"{name}.png", np.full((40, 56), i, np.uint8))
    (root / "classes.txt").write_text("background\ncat\ngrass\n")
    return root


@pytest.fixture
def checkpoint(tmp_path):
    """The tiny model's random weights as a checkpoint file: same numbers, another weights identity."""
    clip, _ = load_clip("tiny_vit", None)
    path = tmp_path / "tiny_vit.pt"
    torch.save(clip.state_dict(), path)
    return path


def test_refine_reuses_an_image_only_when_everything_that_made_it_is_unchanged(tmp_path, labelled, checkpoint,
                                                                               monkeypatch):
    data = ["dataset=folder", f"dataset.root={labelled}"]

    def run(*extra):
        return refine.run(compose("refine", _args(tmp_path, *data, *extra)))

    assert run()["not_reused"] == {"new": 2}
    again = run()
    assert again["reused"] == 2 and again["refined"] == 0 and again["not_reused"] == {}
    assert run("generator.logit_scale=50")["not_reused"] == {"config": 2}
    assert run("generator.logit_scale=50", "refine=ks")["not_reused"] == {"config": 2}
    settings = ["generator.logit_scale=50", "refine=ks"]
    assert run(*settings, "dataset.classes=[background,dog,grass]")["not_reused"] == {"vocabulary": 2}
    assert run(*settings)["not_reused"] == {"vocabulary": 2}
    _write_image(labelled / "images" / "a.png", seed=7)
    assert run(*settings)["not_reused"] == {"image file": 1}
    save_label_png(labelled / "labels" / "b.png", np.full((40, 56), 2, np.uint8))
    _touch_later(labelled / "labels" / "b.png")
    changed = run(*settings)
    assert changed["not_reused"] == {"label file": 1} and changed["reused"] == 1
    assert run(*settings, f"model.pretrained={checkpoint}")["not_reused"] == {"weights": 2}
    monkeypatch.setattr(reuse, "__version__", "99.0")
    assert run(*settings, f"model.pretrained={checkpoint}")["not_reused"] == {"package version": 2}
    out = tmp_path / "out"
    (out / "overlays" / "a.png").unlink()
    (out / "records" / "b.json").write_text("{not json")
    final = run(*settings, f"model.pretrained={checkpoint}")
    assert final["not_reused"] == {"outputs changed": 1, "unreadable record": 1}
    assert run(*settings, f"model.pretrained={checkpoint}", "save_probs=true")["not_reused"] == {"outputs changed": 2}
    assert run(*settings, f"model.pretrained={checkpoint}", "overwrite=true")["not_reused"] == {"overwrite": 2}
    record = json.loads((out / "records" / "a.json").read_text())
    assert set(record["key"]) == {"version", "weights", "config", "vocab", "image", "label"}
    assert set(record["outputs"]) == {"label", "overlay"}


def test_evaluate_rescores_corrected_ground_truth_and_every_changed_input(tmp_path, labelled, checkpoint):
    data = ["dataset=folder", f"dataset.root={labelled}"]

    def run(*extra):
        return evaluate.run(compose("evaluate", _args(tmp_path, *data, *extra)))

    first = run()
    assert first["not_reused"] == {"new": 2} and first["methods"]["refine"]["aAcc"] < 1.0
    # Correct the ground truth to what the model predicts: a stale record would keep the old score.
    refined = refine.run(compose("refine", _args(tmp_path, *data, f"output_dir={tmp_path / 'pred'}")))
    assert refined["refined"] == 2
    for name in "ab":
        save_label_png(labelled / "labels" / f"{name}.png", np.asarray(Image.open(tmp_path / "pred" / "labels" / f"{name}.png")))
        _touch_later(labelled / "labels" / f"{name}.png")
    corrected = run()
    assert corrected["not_reused"] == {"label file": 2}
    assert corrected["methods"]["refine"]["aAcc"] == 1.0
    assert run()["reused"] == 2
    assert run("generator.logit_scale=50")["not_reused"] == {"config": 2}
    assert run("generator.logit_scale=50", "dataset.classes=[background,dog,grass]")["not_reused"] == {"vocabulary": 2}
    _write_image(labelled / "images" / "b.png", seed=9)
    assert run("generator.logit_scale=50", "dataset.classes=[background,dog,grass]")["not_reused"] == {"image file": 1}
    assert run("generator.logit_scale=50", f"model.pretrained={checkpoint}")["not_reused"] == {"weights": 2}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["reused"] == 0 and saved["not_reused"] == {"weights": 2}


def test_compare_keys_records_by_methods_and_inputs_and_recomputes_an_unreadable_one(tmp_path, labelled, capsys):
    def run(methods, *extra):
        cfg = compose("compare", _args(tmp_path, "dataset=folder", f"dataset.root={labelled}", "panels=0", *extra))
        cfg.methods = methods
        return compare.run(cfg)

    methods = {"MaskCLIP": [], "+PD": ["pd"]}
    assert run(methods)["not_reused"] == {"new": 2}
    assert run(methods)["reused"] == 2
    assert run({**methods, "+KS": ["ks"]})["not_reused"] == {"config": 2}
    assert run({**methods, "+KS": ["ks"]}, "refine.pd.thresh=0.2")["not_reused"] == {"config": 2}
    save_label_png(labelled / "labels" / "a.png", np.full((40, 56), 2, np.uint8))
    _touch_later(labelled / "labels" / "a.png")
    record = tmp_path / "out" / "per_image" / "b.npz"
    record.write_bytes(b"not a zip file at all")
    capsys.readouterr()
    again = run({**methods, "+KS": ["ks"]}, "refine.pd.thresh=0.2")
    assert again["not_reused"] == {"label file": 1, "unreadable record": 1}
    assert f"{record} is unreadable" in capsys.readouterr().err
    assert run({**methods, "+KS": ["ks"]}, "refine.pd.thresh=0.2")["reused"] == 2
    assert "compare:" in capsys.readouterr().err and "evaluate:" not in capsys.readouterr().err


def _voc_with_split(root: Path, ids: list[str]) -> Path:
    base = root / "VOC2012"
    _write_image(base / "JPEGImages" / "ok.jpg", 0)
    save_label_png(base / "SegmentationClass" / "ok.png", np.zeros((40, 56), np.uint8))
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return base


@pytest.mark.parametrize("bad_id", ["../../escaped", "/tmp/escaped", "sub/../../escaped"])
def test_a_split_file_id_cannot_place_files_outside_the_output_folder(tmp_path, bad_id):
    base = _voc_with_split(tmp_path / "voc", ["ok", bad_id])
    with pytest.raises(ValueError, match=f"line 2: sample id {bad_id!r} is not a plain file name"):
        refine.run(compose("refine", _args(tmp_path, "dataset=voc21", f"dataset.root={base}")))
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "out").exists()


def test_on_error_skip_lists_unreadable_images_and_hidden_files_are_not_inputs(tmp_path, labelled):
    (labelled / "images" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (labelled / "images" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (labelled / "images" / "b.png").write_bytes(b"truncated")
    summary = refine.run(compose("refine", _args(tmp_path, "dataset=folder", f"dataset.root={labelled}")))
    assert summary["refined"] == 1 and [f["name"] for f in summary["failed"]] == ["b"]
    assert "b.png" in summary["failed"][0]["error"] and "not an image" in summary["failed"][0]["error"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failed"] == summary["failed"]
    again = refine.run(compose("refine", _args(tmp_path, "dataset=folder", f"dataset.root={labelled}")))
    assert again["reused"] == 1 and len(again["failed"]) == 1  # the rerun gets past the bad file again

    with pytest.raises(ValueError, match="b.png.*not an image"):  # evaluate stops by default
        evaluate.run(compose("evaluate", _args(tmp_path, "dataset=folder", f"dataset.root={labelled}")))
    skipping = evaluate.run(compose("evaluate", _args(tmp_path, "dataset=folder", f"dataset.root={labelled}",
                                                      "on_error=skip")))
    assert skipping["images"] == 1 and [f["name"] for f in skipping["failed"]] == ["b"]
    with pytest.raises(ValueError, match="b.png"):
        refine.run(compose("refine", _args(tmp_path, "dataset=folder", f"dataset.root={labelled}", "on_error=stop")))

    (labelled / "images" / "a.png").write_bytes(b"also broken")
    with pytest.raises(ValueError, match="all 2 images failed; first, a: .*a.png"):
        refine.run(compose("refine", _args(tmp_path, "dataset=folder", f"dataset.root={labelled}")))


def _command(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """The run failed with status 1 and said why in one `error:` line, without a traceback."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], done.stderr
    return errors[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("panel=no", "error: panel='no' is not valid: panel takes true or false"),
        ("batch_size=0", "error: batch_size=0 is not valid: batch_size takes an integer >= 1"),
        ("+refine.apro.zeta_gg=1", "error: refine.apro.zeta_gg is not a parameter of the apro refiner; it takes "),
        ("device=gpu", "error: device='gpu' is not a device: device takes auto, cpu, cuda or cuda:N"),
        ("dataset=folder", "error: dataset.root is not set: pass dataset.root=..."),
    ],
)
def test_config_mistakes_are_one_error_line(tmp_path, override, message):
    assert _one_error_line(_command("refine", *_args(tmp_path, override))).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_asking_for_a_gpu_that_is_not_there_is_one_error_line(tmp_path):
    line = _one_error_line(_command("evaluate", *_args(tmp_path, "device=cuda")))
    assert line == "error: device=cuda asks for a GPU but torch finds no CUDA GPU; use device=cpu"


def test_bad_label_values_name_the_file(tmp_path, labelled):
    save_label_png(labelled / "labels" / "b.png", np.full((40, 56), 37, np.uint8))
    line = _one_error_line(_command("evaluate", *_args(tmp_path, "dataset=folder", f"dataset.root={labelled}")))
    assert line == (
        f"error: label file '{labelled / 'labels' / 'b.png'}' holds value(s) 37 that are not classes of this "
        "dataset (3 classes, 0-2, ignore 255)"
    )


def test_non_finite_generator_output_is_one_error_line(tmp_path):
    clip, _ = load_clip("tiny_vit", None)
    weights = clip.state_dict()
    weights["visual.proj"] = torch.full_like(weights["visual.proj"], float("nan"))
    torch.save(weights, tmp_path / "nan.pt")
    line = _one_error_line(_command("refine", *_args(tmp_path, f"model.pretrained={tmp_path / 'nan.pt'}", "limit=1")))
    assert "NaN or inf class scores" in line and "model.pretrained" in line


def test_ctrl_c_ends_a_run_with_one_line_and_status_130(tmp_path):
    args = _args(tmp_path, "dataset=synthetic", "dataset.num_images=100000")
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "refine.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    labels = tmp_path / "out" / "labels"
    deadline = time.monotonic() + 240
    while not (labels.is_dir() and any(labels.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "refine interrupted (Ctrl-C); every file already written is complete"
    assert not list(labels.glob(".*.tmp"))


@pytest.mark.parametrize("command", ["refine", "evaluate", "compare", "train"])
def test_ctrl_c_while_a_command_starts_is_one_line_and_status_130(command, monkeypatch, capsys):
    """The seconds of imports before a command runs are covered too (cli/entry.py)."""
    from maskclip_apro.cli import entry

    def interrupted(name):
        assert name == f"maskclip_apro.cli.{command}"
        raise KeyboardInterrupt

    monkeypatch.setattr(entry.importlib, "import_module", interrupted)
    with pytest.raises(SystemExit) as stop:
        getattr(entry, command)()
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == f"{command} interrupted (Ctrl-C) while starting; nothing was written"


def test_the_entry_points_import_no_torch():
    """Importing an entry point is quick: torch, open_clip and Hydra come with the command, inside its handling."""
    done = subprocess.run([sys.executable, "-c", "import sys, maskclip_apro.cli.entry; "
                           "print(sorted(m for m in ('torch', 'open_clip', 'hydra') if m in sys.modules))"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize(
    "command, override, message",
    [
        ("refine", "save_probs=n", "save_probs='n' is not valid: save_probs takes true or false"),
        ("refine", "panel=off", "panel='off' is not valid: panel takes true or false"),
        ("refine", "overwrite=1", "overwrite=1 is not valid: overwrite takes true or false"),
        ("refine", "overlay_alpha=2", "overlay_alpha=2 is not valid: overlay_alpha takes a number >= 0 and <= 1"),
        ("refine", "on_error=ignore", "on_error='ignore' is not valid: on_error takes skip or stop"),
        ("refine", "limit=0", "limit=0 is not valid: limit takes an integer >= 1, or null"),
        ("refine", "max_image_pixels=-5", "max_image_pixels=-5 is not valid"),
        ("evaluate", "generator.mode=tiles", "generator.mode='tiles' is not valid: generator.mode takes slide or whole"),
        ("evaluate", "+refine.pamr.dilation=3", "refine.pamr.dilation is not a parameter of the pamr refiner; "
                                                "it takes dilations, iters"),
        ("evaluate", "device=cuda:x", "device='cuda:x' is not a device"),
        ("compare", "panels=yes", "panels='yes' is not valid: panels takes an integer >= 0"),
        ("compare", "methods.MaskCLIP=[apro,crf]", r"methods.MaskCLIP=\['apro', 'crf'\] is not valid: a method is a list"),
        ("train", "amp=no", "amp='no' is not valid: amp takes true or false"),
        ("train", "+refine.apro.zeta=1", "refine.apro.zeta is not a parameter of the apro refiner"),
        ("train", "device=gpu", "device='gpu' is not a device: device takes auto, cpu, cuda or cuda:N"),
    ],
)
def test_wrong_types_and_unknown_refiner_parameters_name_the_key(command, override, message):
    from maskclip_apro.schema import check_config

    cfg = compose(command, ["model=tiny_vit", override])
    with pytest.raises(ValueError, match=message):
        check_config(cfg, command)


def test_the_shipped_configs_pass_the_checks():
    from maskclip_apro.schema import check_config

    for command in ("refine", "evaluate", "compare", "train"):
        check_config(compose(command, ["dataset=synthetic"] if command == "train" else []), command)


def test_the_pixel_limit_of_a_run_applies_to_its_images(tmp_path, labelled):
    from maskclip_apro.data.io import set_max_image_pixels

    try:
        summary = refine.run(compose("refine", _args(tmp_path, f"input={labelled / 'images'}", "max_image_pixels=2240")))
        assert summary["refined"] == 2  # 40 x 56 = 2240 pixels: at the limit
        _write_image(labelled / "images" / "c.png", 3, size=(48, 56))
        summary = refine.run(compose("refine", _args(tmp_path, f"input={labelled / 'images'}", "max_image_pixels=2240")))
    finally:
        set_max_image_pixels(None)
    assert [f["name"] for f in summary["failed"]] == ["c"] and "over the limit of 2,240" in summary["failed"][0]["error"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_image_without_read_permission_is_skipped(tmp_path, labelled):
    (labelled / "images" / "a.png").chmod(0)
    summary = refine.run(compose("refine", _args(tmp_path, f"input={labelled / 'images'}")))
    assert [f["name"] for f in summary["failed"]] == ["a"] and "Permission denied" in summary["failed"][0]["error"]


# Round three (issue 19): content keys, checked records, refusals before the first image, files.


def _bmp_folder(root: Path) -> Path:
    """root/images/{a,b}.bmp and uncompressed label PNGs (fixed-size files: a rewrite keeps the size)."""
    for i, name in enumerate("ab"):
        for folder in ("images", "labels"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}.bmp")
        Image.fromarray(np.full((40, 56), i, np.uint8)).save(root / "labels" / f"{name}.png", compress_level=0)
    (root / "classes.txt").write_text("background\ncat\ngrass\n")
    return root


def _replace_keeping_size_and_mtime(path: Path, content: bytes) -> None:
    """What cp --preserve=timestamps or rsync -t do: other bytes, same size, the old mtime."""
    st = path.stat()
    assert len(content) == st.st_size
    path.write_bytes(content)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_inputs_are_keyed_by_content_and_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    from maskclip_apro.data import base

    root = _bmp_folder(tmp_path / "data")
    data = ["dataset=folder", f"dataset.root={root}"]
    assert refine.run(compose("refine", _args(tmp_path, *data)))["not_reused"] == {"new": 2}
    _replace_keeping_size_and_mtime(root / "images" / "a.bmp", (root / "images" / "b.bmp").read_bytes())
    assert refine.run(compose("refine", _args(tmp_path, *data)))["not_reused"] == {"image file": 1}
    first = evaluate.run(compose("evaluate", _args(tmp_path, *data, f"output_dir={tmp_path / 'ev'}")))
    _replace_keeping_size_and_mtime(root / "labels" / "a.png", (root / "labels" / "b.png").read_bytes())
    fixed = evaluate.run(compose("evaluate", _args(tmp_path, *data, f"output_dir={tmp_path / 'ev'}")))
    assert fixed["not_reused"] == {"label file": 1}
    assert fixed["methods"]["refine"]["aAcc"] != first["methods"]["refine"]["aAcc"]
    assert refine.run(compose("refine", _args(tmp_path, *data)))["not_reused"] == {"label file": 1}
    hashed = []
    real = base._hash_file
    monkeypatch.setattr(base, "_hash_file", lambda path: hashed.append(Path(path).name) or real(path))
    base._DIGESTS.clear()  # as in a new process: only the records remember the files
    assert refine.run(compose("refine", _args(tmp_path, *data)))["reused"] == 2
    assert hashed == []


def test_records_are_checked_before_use_and_a_bad_one_is_named_and_recomputed(tmp_path, labelled, capsys):
    from maskclip_apro.data.base import file_digest
    from maskclip_apro.pipeline.score import check_record, record_digest

    data = ["dataset=folder", f"dataset.root={labelled}"]
    first = evaluate.run(compose("evaluate", _args(tmp_path, *data)))
    per_image = tmp_path / "out" / "per_image"
    for name, edit in (("a", lambda cm: cm * 1000), ("b", lambda cm: np.ones((2, 2), np.int64))):
        with np.load(per_image / f"{name}.npz") as saved:
            record = dict(saved)
        record["cm0"] = edit(record["cm0"])
        np.savez_compressed(per_image / f"{name}.npz", **record)
    capsys.readouterr()
    again = evaluate.run(compose("evaluate", _args(tmp_path, *data)))
    err = capsys.readouterr().err
    assert again["not_reused"] == {"bad record": 2} and f"{per_image / 'a.npz'}: " in err and f"{per_image / 'b.npz'}: " in err
    assert again["methods"]["refine"]["mIoU"] == first["methods"]["refine"]["mIoU"]
    with np.load(per_image / "a.npz") as saved:
        record = dict(saved)
    names, scored = ["refine"], 40 * 56
    assert check_record(record, names, 3, scored) is None
    record["cm0"] = record["cm0"] - record["cm0"].max() - 1  # negative counts, digest made to match
    record["digest"] = np.array(record_digest(record))
    assert "negative" in check_record(record, names, 3, scored)
    record["cm0"] = np.zeros((3, 3), np.int64)
    record["digest"] = np.array(record_digest(record))
    assert "the label scores 2240" in check_record(record, names, 3, scored)

    out = tmp_path / "ref"
    assert refine.run(compose("refine", _args(tmp_path, *data, f"output_dir={out}")))["refined"] == 2
    label_a = out / "labels" / "a.png"
    save_label_png(tmp_path / "other.png", 2 - np.asarray(Image.open(label_a)))
    if (tmp_path / "other.png").stat().st_size == label_a.stat().st_size:
        _replace_keeping_size_and_mtime(label_a, (tmp_path / "other.png").read_bytes())
    else:
        label_a.write_bytes((tmp_path / "other.png").read_bytes())
    label_b = out / "labels" / "b.png"
    save_label_png(label_b, np.zeros((20, 20), np.uint8))  # wrong size, and a record forged to vouch for it
    record_b = json.loads((out / "records" / "b.json").read_text())
    record_b["outputs"]["label"] = list(file_digest(label_b))
    (out / "records" / "b.json").write_text(json.dumps(record_b))
    capsys.readouterr()
    redone = refine.run(compose("refine", _args(tmp_path, *data, f"output_dir={out}")))
    assert redone["not_reused"] == {"outputs changed": 1, "bad record": 1} and redone["failed"] == []
    assert f"{label_b}: has size (20, 20)" in capsys.readouterr().err
    assert np.asarray(Image.open(label_b)).shape == (40, 56)


def test_more_classes_than_a_label_map_holds_is_refused_before_any_image(tmp_path, labelled):
    vocab = tmp_path / "big.txt"
    vocab.write_text("\n".join(f"class{i}" for i in range(300)))
    with pytest.raises(ValueError, match="the vocabulary has 300 classes; label maps hold at most 255"):
        refine.run(compose("refine", _args(tmp_path, f"input={labelled / 'images'}", f"vocab={vocab}")))
    assert not (tmp_path / "out" / "overlays").exists()


def _main_error(module, argv, monkeypatch, capsys) -> str:
    """The command's entry point on `argv` in this process: its one error line (status 1, no traceback)."""
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert isinstance(exited.value.code, str) and exited.value.code.startswith("error: "), exited.value.code
    assert "Traceback" not in capsys.readouterr().err
    return exited.value.code


def test_an_output_dir_that_cannot_be_one_is_one_error_line_before_hydra_starts(tmp_path, monkeypatch, capsys):
    from maskclip_apro import writing
    from maskclip_apro.config import _output_dir_argument

    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _main_error(refine, _args(tmp_path, f"output_dir={afile}"), monkeypatch, capsys)
    assert line == f"error: output_dir {str(afile)!r} is a file; choose a folder"
    line = _main_error(refine, _args(tmp_path, f"output_dir={afile / 'sub'}"), monkeypatch, capsys)
    assert line == f"error: output_dir {str(afile / 'sub')!r} lies under {str(afile)!r}, which is a file; choose a folder"
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real = os.access
    monkeypatch.setattr(writing.os, "access", lambda p, mode: False if Path(p) == readonly else real(p, mode))
    line = _main_error(evaluate, _args(tmp_path, f"output_dir={readonly / 'out'}"), monkeypatch, capsys)
    assert line.startswith(f"error: output_dir {str(readonly / 'out')!r} cannot be written: {str(readonly)!r} is on "
                           "a read-only file system")
    assert not (readonly / "out").exists()
    # A default with interpolations (train's outputs/train/${dataset.name}/${now:...}) is checked up to them.
    assert _output_dir_argument("train", []) == ("outputs/train", False)
    assert _output_dir_argument("refine", ["++output_dir='x/y'"]) == ("x/y", True)


def test_bad_weights_files_are_one_line_without_torchs_unsafe_advice(tmp_path):
    from maskclip_apro.config import build_generator_from_config
    from maskclip_apro.student.deeplabv2 import DeepLabV2

    import argparse

    torch.save({"weights": argparse.Namespace(a=1)}, tmp_path / "pickle.pt")
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(256))
    for name in ("pickle.pt", "corrupt.pt"):
        path = tmp_path / name
        with pytest.raises(ValueError, match=f"cannot read weights file '{path}': not a tensors-only checkpoint") as e:
            DeepLabV2(3, backbone="resnet18", pretrained=str(path))
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
        cfg = compose("refine", ["model=tiny_vit", "model.dense=proxyclip", "model.vfm.name=tiny_dino",
                                 f"model.vfm.pretrained={path}"])
        with pytest.raises(ValueError, match=f"cannot read model.vfm.pretrained file '{path}'") as e:
            build_generator_from_config(cfg, ["a", "b"])
        assert "weights_only" not in str(e.value)


@pytest.mark.parametrize("command, override, message", [
    ("refine", "refine.apro.kernel_size=4", "refine.apro.kernel_size=4 is not valid: it takes an odd integer"),
    ("evaluate", "refine.apro.backend=gpu", "refine.apro.backend='gpu' is not valid"),
    ("refine", "refine.pd.thresh=-1", "refine.pd: "),
    ("train", "batch_size=0", "batch_size=0 is not valid: batch_size takes an integer >= 1"),
    ("train", "eval.interval=-1", "eval.interval=-1 is not valid: eval.interval takes an integer >= 0"),
])
def test_refiner_and_train_values_are_checked_before_the_first_image(command, override, message):
    from maskclip_apro.schema import check_config

    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(compose(command, [override]), command)


def test_files_sharing_a_name_are_both_named_and_left_out_under_skip(tmp_path, labelled):
    _write_image(labelled / "images" / "b.jpg", 5)
    data = ["dataset=folder", f"dataset.root={labelled}"]
    summary = refine.run(compose("refine", _args(tmp_path, *data)))
    assert summary["refined"] == 1 and summary["images"] == 1
    named = sorted(Path(s["path"]).name for s in summary["skipped_inputs"])
    assert named == ["b.jpg", "b.png"] and "share the name 'b'" in summary["skipped_inputs"][0]["why"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["skipped_inputs"] == summary["skipped_inputs"]
    with pytest.raises(ValueError, match=r"2 files share the name 'b' \(.*b.jpg, .*b.png\)"):
        refine.run(compose("refine", _args(tmp_path, *data, "on_error=stop")))


def test_output_dir_links_are_refused_and_a_second_run_is_kept_out(tmp_path, labelled):
    import fcntl

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "labels").symlink_to(elsewhere, target_is_directory=True)
    data = ["dataset=folder", f"dataset.root={labelled}"]
    with pytest.raises(ValueError, match=r"holds symbolic link\(s\) \['labels'\]; files are written only inside"):
        refine.run(compose("refine", _args(tmp_path, *data)))
    assert list(elsewhere.iterdir()) == []
    (out / "labels").unlink()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1 on elsewhere")
        held.flush()
        with pytest.raises(ValueError, match=f"output_dir '{out}' is in use by another run \\(pid 1 on elsewhere\\)"):
            refine.run(compose("refine", _args(tmp_path, *data)))
    assert not (out / "labels").exists()
    assert refine.run(compose("refine", _args(tmp_path, *data, "limit=1")))["refined"] == 1  # released


def test_the_panel_shows_the_refiner_that_wrote_the_labels_and_stages_include_read_and_write(tmp_path, labelled,
                                                                                            monkeypatch):
    from maskclip_apro.pipeline import refine as pipeline_refine

    shown = []
    real = pipeline_refine.make_panel
    monkeypatch.setattr(pipeline_refine, "make_panel", lambda columns, **kw: shown.append(columns) or real(columns, **kw))
    summary = refine.run(compose("refine", _args(tmp_path, "dataset=folder", f"dataset.root={labelled}", "limit=1",
                                                 "refine=pamr", "refine.pamr.iters=2", "panel=true", "refine.apro.iters=1",
                                                 "refine.apro.backend=torch")))
    title, labels = shown[0][-1]
    assert title == "labels: pamr"
    assert np.array_equal(labels, np.asarray(Image.open(tmp_path / "out" / "labels" / "a.png")))
    stages = summary["seconds_per_image"]
    assert list(stages)[0] == "read" and list(stages)[-1] == "write" and "generator" in stages
