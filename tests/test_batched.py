"""Batched inference: predict_batch against one image at a time, the size buckets and read-ahead
workers of the per-image loop, and the commands with batch_size / workers against the defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskclip_apro.cli import compare, evaluate, refine
from maskclip_apro.config import compose
from maskclip_apro.data import build_dataset
from maskclip_apro.data.io import load_label
from maskclip_apro.writing import save_label_png
from maskclip_apro.distributed import DistInfo, shard
from maskclip_apro.pipeline import loop
from maskclip_apro.pipeline.loop import Prepared, RunOptions, run_items
from maskclip_apro.refiners import Chain
from maskclip_apro.segmenter import Segmenter

SMALL = ["generator.short_side=64", "generator.window=64", "generator.stride=32", "refine.apro.iters=3",
         "refine.pamr.iters=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text_cache")


@pytest.mark.parametrize("model, protocol, steps", [
    ("tiny_vit", "maskclip", {"plain": [], "ks": ["ks"], "apro": ["apro"], "pd_ks": ["pd", "ks"]}),
    ("tiny_resnet", "maskclip", {"plain": [], "ks": ["ks"], "apro": ["apro"]}),
    ("tiny_vit", "sclip", {"plain": [], "pamr": ["pamr_logits"], "apro": ["apro"]}),
])
def test_a_batch_gives_each_image_what_it_gets_alone(cache, model, protocol, steps):
    cfg = compose("compare", [f"model={model}", f"protocol={protocol}", f"generator.cache_dir={cache}", *SMALL,
                              "generator.short_side=64"])
    dataset = build_dataset("synthetic", num_images=3, size=[70, 90])
    segmenter = Segmenter.from_config(cfg, dataset.class_names)
    chains = {name: Chain.from_steps(s, cfg.refine) for name, s in steps.items()}
    images = [dataset[i].image for i in range(3)]
    batch = segmenter.predict_batch(images, chains)
    for image, batched in zip(images, batch):
        alone = segmenter.predict_many(image, chains)
        for name in steps:
            assert np.array_equal(batched[name].labels, alone[name].labels), name
            torch.testing.assert_close(batched[name].probs, alone[name].probs, rtol=1e-4, atol=1e-5)
            assert set(batched[name].times) == set(alone[name].times)
    with pytest.raises(ValueError, match=r"one size; got sizes \[\(60, 90\), \(70, 90\)\]: group the images by size"):
        segmenter.predict_batch([images[0], images[1][:60]], chains)


def test_shards_are_disjoint_and_cover_every_item():
    for count in (0, 1, 5, 8):
        for world in (1, 2, 3):
            shards = [list(shard(count, DistInfo(rank=r, world_size=world))) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(count))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


class _Sizes:
    """A stand-in read-ahead: item i is an image of sizes[i]; `bad` can never be read."""

    def __init__(self, sizes, bad=()):
        self.sizes, self.bad = sizes, set(bad)

    def __call__(self, item: Prepared) -> None:
        from maskclip_apro.data.base import Sample

        item.name = f"im{item.index}"
        if item.index in self.bad:
            raise ValueError(f"im{item.index} is broken")
        item.reason = "new"
        item.sample = Sample(item.name, np.zeros((*self.sizes[item.index], 3), np.uint8), None)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loop_batches_by_size_retries_a_failed_batch_image_by_image_and_bounds_what_waits(monkeypatch, workers):
    a, b, c, d = (8, 8), (8, 9), (9, 9), (7, 7)
    sizes = [a, b, c, a, b, a, a, d, a]
    batches, finished = [], []

    def predict(items):
        batches.append([it.index for it in items])
        if any(it.index == 5 for it in items):
            raise ValueError("image 5 cannot be segmented")
        return [f"result {it.index}" for it in items]

    def finish(item, result):
        finished.append((item.index, result))

    monkeypatch.setattr(loop, "MAX_PENDING_BATCHES", 1)  # more than batch_size images waiting: the fullest bucket runs
    failures = run_items(len(sizes), _Sizes(sizes, bad=[8]), predict, finish,
                         RunOptions(batch_size=2, workers=workers, on_error="skip"))
    # [3, 5] fails as a batch and is retried image by image; the rest run when too many wait, or at the end
    assert batches == [[0], [1], [2], [3, 5], [3], [5], [4], [6], [7]]
    assert sorted(finished) == [(i, f"result {i}") for i in (0, 1, 2, 3, 4, 6, 7)]
    assert failures.items == [{"name": "im5", "error": "image 5 cannot be segmented"},
                              {"name": "im8", "error": "im8 is broken"}]
    with pytest.raises(ValueError, match="image 5 cannot be segmented"):  # found by the retry, image 3 done
        run_items(len(sizes), _Sizes(sizes, bad=[8]), predict, finish, RunOptions(batch_size=2, on_error="stop"))


def _folder(root: Path) -> Path:
    """Images of three sizes (two of them shared), labels of 3 classes."""
    rng = np.random.default_rng(3)
    for i, size in enumerate([(48, 64), (64, 48), (48, 64), (48, 64), (64, 48), (40, 56)]):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        save_label_png(root / "labels" / f"im{i}.png", rng.integers(0, 3, size).astype(np.uint8))
    (root / "classes.txt").write_text("background\ncat\ngrass\n")
    return root


def _scores(results: dict) -> dict:
    keep = ("images", "reused", "not_reused", "failed", "classes", "metrics", "refined")
    out = {k: v for k, v in results.items() if k in keep}
    if "methods" in results:
        out["methods"] = {m: {k: v for k, v in r.items() if "seconds" not in k} for m, r in results["methods"].items()}
    return json.loads(json.dumps(out, default=float))


def test_batched_commands_with_read_ahead_workers_equal_the_defaults(tmp_path, cache):
    data = ["dataset=folder", f"dataset.root={_folder(tmp_path / 'data')}", "model=tiny_vit", *SMALL,
            f"generator.cache_dir={cache}"]
    for command, module, extra in (("refine", refine, ["refine=apro"]), ("evaluate", evaluate, ["refine=ks_pd"]),
                                   ("compare", compare, ["panels=0"])):
        runs = {}
        for tag, settings in (("one", []), ("batched", ["batch_size=2", "workers=2"])):
            cfg = compose(command, [*data, *extra, *settings, f"output_dir={tmp_path / command / tag}"])
            if command == "compare":
                cfg.methods = {"MaskCLIP": [], "+KS": ["ks"], "+APro": ["apro"]}
            runs[tag] = module.run(cfg)
        assert _scores(runs["batched"]) == _scores(runs["one"]), command
    for i in range(6):
        a, b = (load_label(tmp_path / "refine" / tag / "labels" / f"im{i}.png") for tag in ("one", "batched"))
        assert np.array_equal(a, b)
