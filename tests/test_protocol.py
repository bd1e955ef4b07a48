"""Test protocols (conf/protocol/): the settings each resolves to, and the resize, normalisation and
inference they give on odd image sizes."""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from maskclip_apro import Segmenter
from maskclip_apro.config import build_generator_from_config, compose, generator_kwargs, protocol_name
from maskclip_apro.generator.templates import resolve_templates
from maskclip_apro.refiners import Chain

NAMES = ["cat", "dog"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text_cache")


@pytest.fixture(scope="module")
def generator_for(cache):
    """A tiny ViT generator built from a composed config (the protocol's own resize), once per override set."""
    built = {}

    def get(*overrides):
        if overrides not in built:
            cfg = compose("evaluate", ["model=tiny_vit", "model.short_side=null", f"generator.cache_dir={cache}",
                                       *overrides])
            built[overrides] = build_generator_from_config(cfg, NAMES)
        return built[overrides]

    return get


@pytest.mark.parametrize("command", ["compare", "evaluate", "refine", "train"])
def test_maskclip_is_every_commands_default(command):
    assert protocol_name(compose(command)) == "maskclip"


def test_the_maskclip_protocol_settings():
    kw = generator_kwargs(compose("compare"))
    assert kw["normalize"] == "imagenet" and kw["mode"] == "whole"
    assert kw["short_side"] is None and kw["img_scale"] == [2048, 512]
    assert len(resolve_templates(kw["templates"])) == 85
    assert kw["act"] == "gelu" and kw["ln_eps"] == 1e-6  # MaskCLIP's own ViT build


def test_the_clip_protocol_settings():
    cfg = compose("compare", ["protocol=clip", "dataset=context59"])
    kw = generator_kwargs(cfg)
    assert protocol_name(cfg) == "clip"
    assert kw["normalize"] == "model" and kw["mode"] == "slide"
    assert kw["short_side"] == 448 and (kw["window"], kw["stride"]) == (448, 224)
    assert kw["act"] is None and kw["ln_eps"] is None
    assert len(resolve_templates(kw["templates"])) == 85


@pytest.mark.parametrize(
    "dataset, scale",
    [("voc21", [2048, 512]), ("voc20", [2048, 512]), ("context59", [520, 520]), ("context60", [520, 520]),
     ("cocostuff171", [2048, 512]), ("synthetic", [2048, 512])],
)
def test_the_datasets_standard_scale_applies(dataset, scale):
    assert generator_kwargs(compose("evaluate", [f"dataset={dataset}"]))["img_scale"] == scale


def test_plain_images_use_short_side_512_long_side_2048():
    assert generator_kwargs(compose("refine"))["img_scale"] == [2048, 512]
    # an input folder replaces the dataset, and with it the dataset's scale
    assert generator_kwargs(compose("refine", ["dataset=context59", "input=photos"]))["img_scale"] == [2048, 512]
    assert generator_kwargs(compose("refine", ["dataset=context59", "generator.dataset_scale=false"]))["img_scale"] == [
        2048, 512]


@pytest.mark.parametrize(
    "dataset, size, want",
    [
        ("context59", (375, 500), (390, 520)),  # long side 520
        ("context59", (333, 500), (346, 520)),
        ("context59", (500, 281), (520, 292)),
        ("voc21", (375, 500), (512, 683)),  # short side 512
        ("voc21", (500, 353), (725, 512)),
        ("cocostuff171", (427, 640), (512, 767)),
        ("cocostuff171", (100, 1000), (205, 2048)),  # long side capped at 2048
    ],
)
def test_maskclip_resize_on_odd_sizes(generator_for, dataset, size, want):
    gen = generator_for(f"dataset={dataset}")
    assert gen.resized_size(*size) == want


def test_maskclip_inference_is_one_pass_over_the_padded_image(generator_for):
    gen = generator_for("dataset=context59")
    out = gen(torch.rand(1, 3, 75, 101))
    assert out.image.shape[-2:] == (386, 520)
    assert out.logits.shape[-2:] == (math.ceil(386 / 16), math.ceil(520 / 16))
    assert gen.mode == "whole"
    torch.testing.assert_close(gen.mean.flatten(), torch.tensor([123.675, 116.28, 103.53]) / 255)
    torch.testing.assert_close(gen.std.flatten(), torch.tensor([58.395, 57.12, 57.375]) / 255)
    eps = {m.eps for m in gen.model.visual.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6}


def test_clip_inference_slides_over_the_short_side_448_image(cache):
    overrides = ["protocol=clip", "model=tiny_vit", "model.short_side=448", "model.window=448", "model.stride=224"]
    gen = build_generator_from_config(compose("evaluate", [*overrides, f"generator.cache_dir={cache}"]), NAMES)
    assert gen.mode == "slide" and gen.resized_size(375, 500) == (448, 592)
    assert gen.windows(448, 592) == [(0, 0, 448, 448), (0, 144, 448, 448)]
    torch.testing.assert_close(gen.mean.flatten(), torch.tensor(open_clip.OPENAI_DATASET_MEAN))
    torch.testing.assert_close(gen.std.flatten(), torch.tensor(open_clip.OPENAI_DATASET_STD))


# ---------------------------------------------------------------- the public API under a protocol


def test_from_pretrained_under_the_maskclip_protocol(cache):
    seg = Segmenter.from_pretrained(
        model="tiny_vit", vocab=["cat", "dog", "grass"], refine="apro",
        overrides=["protocol=maskclip", f"generator.cache_dir={cache}", "model.short_side=null",
                   "generator.img_scale=[96, 64]"],
    )
    assert isinstance(seg.generator.model, open_clip.CLIP)
    out = seg.generate(torch.rand(2, 3, 50, 70))
    assert out.image.shape[-2:] == (64, 90) and out.logits.shape == (2, 3, 4, 6)  # keep ratio, padded to 96
    assert out.logits.shape[:2] == (2, 3) and out.features.shape[:2] == (2, 32)
    assert out.keys.shape[-2:] == out.logits.shape[-2:] == out.features.shape[-2:]
    pred = seg(np.full((50, 70, 3), 90, np.uint8))
    assert pred.labels.shape == (50, 70)


def test_labels_without_refiners_come_from_the_upsampled_logits(cache):
    """mmseg upsamples MaskCLIP's head output (the logits) to the network input, then to the image
    (encode_decode, whole_inference), then takes the argmax."""
    seg = Segmenter.from_pretrained(model="tiny_vit", vocab=["cat", "dog", "grass"], refine="none",
                                    overrides=[f"generator.cache_dir={cache}"])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    pred = seg.predict_many(image, {"MaskCLIP": Chain([])})["MaskCLIP"]
    out = seg.generate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    seen = F.interpolate(out.logits, size=out.image.shape[-2:], mode="bilinear", align_corners=False)
    assert out.image.shape[-2:] != (50, 70)
    want = F.interpolate(seen, size=(50, 70), mode="bilinear", align_corners=False).argmax(1)[0]
    assert np.array_equal(pred.labels, want.numpy())


# ---------------------------------------------------------------- the SCLIP-family harness protocols

# The official configs' numbers, per protocol and dataset (configs/cfg_<dataset>.py and the
# segmentor's defaults of wangf3014/SCLIP, sinahmr/NACLIP, mc-lan/ClearCLIP, mc-lan/ProxyCLIP):
# short side S of Resize((2048, S)), window (slide_crop; None = whole image), stride, pad_to,
# logit_scale, prob_thd, area_thd, class file.
HARNESS = {
    "sclip": {
        "voc21": (336, 224, 112, None, 65, 0.1, 0.1, "voc21_sclip"),
        "voc20": (336, 224, 112, None, 40, 0.0, None, "voc20_sclip"),
        "context60": (336, 224, 112, None, 50, 0.1, None, "context60_sclip"),
        "context59": (336, 224, 112, None, 40, 0.0, None, "context59_sclip"),
        "cocoobject81": (336, 224, 112, None, 50, 0.1, None, "cocoobject81_sclip"),
        "cocostuff171": (448, 224, 112, None, 40, 0.0, None, "cocostuff171_sclip"),
        "cityscapes19": (560, 224, 112, None, 40, 0.0, None, "cityscapes19_sclip"),
        "ade150": (336, 224, 112, None, 40, 0.0, None, "ade150_sclip"),
    },
    "naclip": {
        "voc21": (336, None, None, None, 40, 0.1, None, "voc21_sclip"),
        "voc20": (336, None, None, None, 40, 0.0, None, "voc20_sclip"),
        "context60": (336, 224, 112, None, 40, 0.1, None, "context60_sclip"),
        "context59": (336, 224, 112, None, 40, 0.0, None, "context59_sclip"),
        "cocoobject81": (336, 224, 112, None, 40, 0.1, None, "cocoobject81_sclip"),
        "cocostuff171": (336, 224, 112, None, 40, 0.0, None, "cocostuff171_sclip"),
        "cityscapes19": (560, 224, 112, None, 40, 0.0, None, "cityscapes19_sclip"),
        "ade150": (336, 224, 112, None, 40, 0.0, None, "ade150_sclip"),
    },
    "clearclip": {
        "voc21": (448, 448, 224, "patch", 50, 0.5, None, "voc21_clearclip"),
        "voc20": (448, 448, 224, "patch", 50, 0.0, None, "voc20_clearclip"),
        "context60": (448, 448, 224, "patch", 50, 0.15, None, "context60_sclip"),
        "context59": (448, 448, 224, "patch", 50, 0.0, None, "context59_sclip"),
        "cocoobject81": (448, 448, 224, "patch", 50, 0.4, None, "cocoobject81_clearclip"),
        "cocostuff171": (448, 448, 224, "patch", 50, 0.0, None, "cocostuff171_sclip"),
        "cityscapes19": (448, 224, 224, "patch", 50, 0.0, None, "cityscapes19_sclip"),
        "ade150": (448, 448, 224, "patch", 50, 0.0, None, "ade150_sclip"),
    },
    "proxyclip": {
        "voc21": (336, 336, 112, 56, 40, 0.2, None, "voc21_proxyclip"),
        "voc20": (336, 336, 112, 56, 40, 0.0, None, "voc20_clearclip"),
        "context60": (336, 336, 112, 56, 40, 0.15, None, "context60_sclip"),
        "context59": (336, 336, 112, 56, 40, 0.0, None, "context59_sclip"),
        "cocoobject81": (336, 336, 112, 56, 40, 0.25, None, "cocoobject81_proxyclip"),
        "cocostuff171": (336, 336, 112, 56, 40, 0.0, None, "cocostuff171_sclip"),
        "cityscapes19": (448, 224, 112, 56, 40, 0.0, None, "cityscapes19_sclip"),
        "ade150": (448, 336, 112, 56, 40, 0.0, None, "ade150_sclip"),
    },
}
FIELDS = ("short_side", "window", "stride", "pad_to", "logit_scale", "prob_thd", "area_thd", "class_file")


@pytest.mark.parametrize("protocol", list(HARNESS))
def test_each_harness_protocol_resolves_to_the_official_values_per_dataset(protocol):
    for dataset, want in HARNESS[protocol].items():
        cfg = compose("compare", [f"protocol={protocol}", f"dataset={dataset}", "model=vit_b16"])
        kw = generator_kwargs(cfg)
        got = tuple(None if kw["window"] is None and f == "stride" else kw[f] for f in FIELDS)
        assert got == want, (protocol, dataset)
        assert protocol_name(cfg) == protocol and kw["mode"] == "harness"
        assert kw["normalize"] == "model" and kw["pos_interp"] == "offset"  # CLIP's mean / std; the (g + 0.1) rule
        assert len(resolve_templates(kw["templates"])) == 80
        assert kw["act"] is None and kw["ln_eps"] is None  # OpenAI's CLIP as trained


def test_harness_protocols_without_a_dataset_use_the_defaults_and_the_vocabulary():
    kw = generator_kwargs(compose("refine", ["protocol=sclip", "model=vit_b16", "input=some/folder"]))
    assert (kw["short_side"], kw["window"], kw["stride"], kw["logit_scale"], kw["class_file"]) == (336, 224, 112, 40, None)
    kw = generator_kwargs(compose("compare", ["protocol=clearclip", "model=vit_b16", "dataset=synthetic"]))
    assert (kw["short_side"], kw["window"], kw["logit_scale"], kw["class_file"]) == (448, 448, 50, None)


def test_a_model_preset_wins_over_the_per_dataset_values():
    kw = generator_kwargs(compose("compare", ["protocol=naclip", "dataset=voc21", "model=tiny_vit"]))
    assert (kw["short_side"], kw["window"], kw["stride"]) == (64, 64, 32)  # tiny_vit's CI geometry
    assert (kw["prob_thd"], kw["class_file"]) == (0.1, "voc21_sclip")


def test_harness_keys_are_dropped_when_the_generator_runs_whole_crops():
    """train runs the teacher on whole crops (generator.mode=whole): a harness protocol lends it its
    normalisation, templates and positional rule, and its per-dataset geometry stays out."""
    cfg = compose("train", ["protocol=sclip", "dataset=cocostuff171", "model=vit_b16", "crop=320"])
    kw = generator_kwargs(cfg)
    assert kw["mode"] == "whole" and kw["short_side"] == 320  # train's crop, not the harness's 448
    assert not {"pad_to", "prob_thd", "area_thd", "class_file"} & set(kw)
    assert (kw["normalize"], kw["templates"], kw["pos_interp"]) == ("model", "clip", "offset")


def test_bad_per_dataset_entry_names_the_key():
    cfg = compose("compare", ["protocol=sclip", "dataset=voc21", "model=vit_b16", "+generator.per_dataset.voc21.zeta=1"])
    with pytest.raises(ValueError, match=r"per_dataset.voc21 sets \['zeta'\]"):
        generator_kwargs(cfg)


def test_the_dense_mode_and_its_parameters_reach_the_generator(cache):
    kw = generator_kwargs(compose("compare", ["model=vit_b16"]))
    assert kw["dense"] == "maskclip" and kw["naclip_sigma"] == 5.0 and kw["proxy"] == {"beta": 1.2, "gamma": 3.0}
    assert kw["vfm"] == {"name": "vit_base_patch8_224.dino", "pretrained": True}
    kw = generator_kwargs(compose("compare", ["model=tiny_vit", "model.dense=proxyclip", "model.proxy.beta=0.5"]))
    assert kw["dense"] == "proxyclip" and kw["proxy"]["beta"] == 0.5 and kw["vfm"] == {"name": "tiny_dino", "pretrained": None}
