"""What reruns reuse, what a bad run prints, where files go: the commands end to end (tiny model)."""

import json
import os
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
    save_label_png(labelled / "labels" / "a.png", np.zeros((40, 56), np.uint8))
    _touch_later(labelled / "labels" / "a.png")
    record = tmp_path / "out" / "per_image" / "b.npz"
    record.write_bytes(b"not a zip file at all")
    capsys.readouterr()
    again = run({**methods, "+KS": ["ks"]}, "refine.pd.thresh=0.2")
    assert again["not_reused"] == {"label file": 1, "unreadable record": 1}
    assert f"{record} is unreadable" in capsys.readouterr().err
    assert run({**methods, "+KS": ["ks"]}, "refine.pd.thresh=0.2")["reused"] == 2


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
