"""device=auto and precision=auto: what each resolves to, and reduced-precision image towers giving the
float32 labels on the tiny models (fp16 and bf16 run on the CPU too, so this is checked here).

Tolerance: fp16 >= 99 % equal pixel labels and class probabilities within 0.01 of float32's; bf16
(8 mantissa bits) >= 98 % and within 0.02. Measured on these inputs: fp16 >= 99.96 % and <= 0.0014,
bf16 >= 99.51 % and <= 0.0093 (docs/devices.md).
"""

from __future__ import annotations

import copy

import pytest
import torch

from maskclip_apro.config import build_generator_from_config, compose, run_device, tower_precision
from maskclip_apro.generator import build_generator
from maskclip_apro.generator.build import set_tower_precision
from maskclip_apro.schema import check_config

NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow"]
CUDA, CPU = torch.device("cuda:0"), torch.device("cpu")
OFFICIAL = {"maskclip": "fp32", "clip": "fp32", "sclip": "fp16", "naclip": "fp16", "clearclip": "fp16",
            "proxyclip": "fp16"}  # the towers' dtype of each protocol's official code on CUDA (conf/protocol/)
TOLERANCE = {"fp16": (0.99, 0.01), "bf16": (0.98, 0.02)}  # (share of equal labels, largest probability change)


@pytest.mark.parametrize("command", ["refine", "evaluate", "compare", "train"])
def test_every_command_runs_on_a_gpu_when_there_is_one(command, monkeypatch):
    cfg = compose(command)
    assert cfg.device == "auto" and cfg.precision == "auto"
    assert run_device(cfg) == CPU  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_device(cfg) == CUDA


def test_auto_precision_is_the_protocols_on_cuda_and_float32_on_the_cpu():
    for protocol, official in OFFICIAL.items():
        cfg = compose("evaluate", [f"protocol={protocol}"])
        assert (tower_precision(cfg, CUDA), tower_precision(cfg, CPU)) == (official, "fp32"), protocol
    for chosen in ("fp32", "fp16", "bf16"):  # asked for by name: on any device
        cfg = compose("evaluate", ["protocol=sclip", f"precision={chosen}"])
        assert tower_precision(cfg, CPU) == tower_precision(cfg, CUDA) == chosen


def test_an_unknown_precision_is_one_clear_error():
    with pytest.raises(ValueError, match=r"^precision='fp8' is not valid: precision takes auto or fp32 or fp16 or bf16$"):
        check_config(compose("refine", ["precision=fp8"]), "refine")


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(0)
    return torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8), size=(72, 96), mode="bicubic").clamp(0, 1)


def test_the_config_sets_the_towers_dtype(tmp_path):
    cfg = compose("evaluate", ["protocol=sclip", "model=tiny_vit", "model.dense=proxyclip", "precision=bf16",
                               f"generator.cache_dir={tmp_path}"])
    generator = build_generator_from_config(cfg, NAMES[:2])
    for tower in (generator.backbone.visual, generator.backbone.vfm.model):
        assert all(p.dtype == torch.bfloat16 for p in tower.parameters())
    assert generator.classifier.embeddings.dtype == torch.float32  # the text side keeps float32
    assert generator.precision == "bf16"
    assert generator.identity.endswith(" (bf16)")  # results saved with float32 towers are not reused


@pytest.fixture(scope="module")
def fp32_generator(tmp_path_factory):
    """A float32 tiny generator under SCLIP's harness per (model, dense mode), built once."""
    built = {}
    cache = tmp_path_factory.mktemp("text_cache")

    def get(model: str, dense: str):
        if (model, dense) not in built:
            built[model, dense] = build_generator(
                model, None, NAMES, mode="harness", dense=dense, short_side=64, window=64, stride=32,
                templates=["a photo of a {}."], normalize="model", pos_interp="offset", logit_scale=40,
                vfm={"name": "tiny_dino", "pretrained": None}, cache_dir=str(cache),
            )
        return built[model, dense]

    return get


@pytest.mark.parametrize(
    "model, dense, precision",
    [("tiny_vit", d, "fp16") for d in ("maskclip", "sclip", "clearclip", "naclip", "proxyclip")]
    + [("tiny_vit", "naclip", "bf16"), ("tiny_resnet", "maskclip", "bf16")],
)
def test_reduced_precision_towers_give_the_float32_labels(model, dense, precision, image, fp32_generator):
    generator = fp32_generator(model, dense)
    full = generator(image)
    low_generator = copy.deepcopy(generator)
    set_tower_precision(low_generator.backbone, precision)
    low = low_generator(image)
    assert low.pixel_cos.dtype == low.logits.dtype == torch.float32
    equal = (low.pixel_cos.argmax(1) == full.pixel_cos.argmax(1)).float().mean().item()
    prob_change = (torch.softmax(40 * low.pixel_cos, 1) - torch.softmax(40 * full.pixel_cos, 1)).abs().max().item()
    share, largest = TOLERANCE[precision]
    assert equal >= share and prob_change <= largest, (equal, prob_change)
