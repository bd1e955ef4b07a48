"""DeepLabv2 student parts: ASPP-v2, output stride, losses, teacher targets, augmentation, checkpoints."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskclip_apro.student.augment import AugmentParams, augment, rng_for
from maskclip_apro.student.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model,
    read_state_dict,
    save_checkpoint,
    save_model,
)
from maskclip_apro.student.data import StepBatches, read_pseudo_label
from maskclip_apro.student.deeplabv2 import ASPPv2, DeepLabV2
from maskclip_apro.student.losses import combine, l1_sum, loss_sums
from maskclip_apro.student.teacher import Teacher

TINY = dict(backbone="resnet18", backbone_kwargs={"channels": (8, 16, 32, 64), "stem_width": 8})


def tiny_model(num_classes: int = 5, **kw) -> DeepLabV2:
    torch.manual_seed(0)
    return DeepLabV2(num_classes, **{**TINY, **kw})


def test_aspp_branches_are_dilated_3x3_and_summed():
    head = ASPPv2(6, 4)
    assert [c.dilation for c in head.convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(c.kernel_size == (3, 3) and c.padding == c.dilation for c in head.convs)
    x = torch.randn(2, 6, 30, 30)
    expected = sum(F.conv2d(x, c.weight, c.bias, padding=d, dilation=d) for c, d in zip(head.convs, (6, 12, 18, 24)))
    out = head(x)
    assert out.shape == (2, 4, 30, 30)
    torch.testing.assert_close(out, expected)


def test_aspp_single_pixel_oracle():
    """With a 1-channel delta input each branch's output at a tap offset is that branch's weight."""
    head = ASPPv2(1, 1, dilations=(2, 3))
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    out = head(x)[0, 0]
    w2, w3 = head.convs[0].weight[0, 0], head.convs[1].weight[0, 0]
    bias = head.convs[0].bias + head.convs[1].bias
    # output (4-2, 4-2) sees the delta through tap (2, 2) of the dilation-2 branch only
    torch.testing.assert_close(out[2, 2], w2[2, 2] + bias[0])
    torch.testing.assert_close(out[1, 7], w3[2, 0] + bias[0])
    torch.testing.assert_close(out[4, 4], w2[1, 1] + w3[1, 1] + bias[0])


def test_output_stride_8_and_upsampled_to_input():
    model = tiny_model(7).eval()
    x = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        assert model.features(x).shape[-2:] == (8, 10)
        out = model(x)
    assert out.shape == (2, 7, 64, 80)
    assert model.backbone.feature_info.reduction()[-1] == 8


def test_frozen_bn_keeps_statistics():
    model = tiny_model(3, bn="frozen").train()
    bn = model.backbone.bn1
    before = bn.running_mean.clone()
    model(torch.rand(2, 3, 32, 32))
    assert not bn.training and torch.equal(bn.running_mean, before)
    trained = tiny_model(3, bn="train").train()
    trained(torch.rand(2, 3, 32, 32))
    assert not torch.equal(trained.backbone.bn1.running_mean, before)


def test_l1_is_zero_when_student_equals_targets():
    torch.manual_seed(0)
    y = torch.softmax(torch.randn(2, 4, 6, 5) * 3, dim=1)
    valid = torch.ones(2, 6, 5, dtype=torch.bool)
    sums = loss_sums(y.log(), y.argmax(1), [y, y], valid)
    assert float(sums.l1) < 1e-5


def test_l1_and_ce_against_loop_oracle():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 2, 2)
    targets = [torch.softmax(torch.randn(1, 3, 2, 2), 1) for _ in range(2)]
    valid = torch.tensor([[[True, False], [True, True]]])
    hard = torch.tensor([[[0, 255], [2, 1]]])
    p = torch.softmax(logits, 1)
    l1 = sum(
        float((p[0, :, i, j] - t[0, :, i, j]).abs().sum()) for t in targets for i in range(2) for j in range(2) if valid[0, i, j]
    )
    ce = sum(-float(torch.log_softmax(logits[0, :, i, j], 0)[hard[0, i, j]]) for i in range(2) for j in range(2) if hard[0, i, j] != 255)
    sums = loss_sums(logits, hard, targets, valid)
    assert float(sums.l1) == pytest.approx(l1, rel=1e-5)
    assert float(sums.ce) == pytest.approx(ce, rel=1e-5)
    assert float(combine(sums, 3, 3, 1.0, 0.5)) == pytest.approx(ce / 3 + 0.5 * l1 / 3, rel=1e-5)
    with pytest.raises(ValueError, match="soft target shape"):
        l1_sum(p, [targets[0][:, :2]], valid)


class StubGenerator:
    """A deterministic 'CLIP': class scores from patch-averaged colours (patch 8)."""

    def __init__(self, num_classes: int = 5, patch: int = 8):
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(num_classes, 3, generator=g) * 4
        self.patch = patch

    def __call__(self, images: torch.Tensor):
        pooled = F.avg_pool2d(images, self.patch, ceil_mode=True)
        return SimpleNamespace(logits=torch.einsum("kc,bchw->bkhw", self.weight, pooled), image=images)


@pytest.mark.parametrize("mode,count", [("none", 0), ("gp_lp_parallel", 2), ("lp_gp", 1), ("gp_lp", 1)])
def test_teacher_targets(mode, count):
    from maskclip_apro.apro import global_propagation, local_propagation

    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    teacher = Teacher(StubGenerator(), mode=mode, apro={"iters": 3, "backend": "torch"})
    t = teacher(images, valid)
    assert t.hard.shape == (2, 16, 16) and len(t.soft) == count
    p = teacher.probabilities(images)
    assert p.shape == (2, 5, 16, 16)
    gp = lambda x: global_propagation(x, images, 0.1, backend="torch")  # noqa: E731
    lp = lambda x: local_propagation(x, images, zeta_s=0.15, kernel_size=5, iters=3, backend="torch")  # noqa: E731
    expected = {"none": [], "gp_lp_parallel": [gp(p), lp(p)], "lp_gp": [gp(lp(p))], "gp_lp": [lp(gp(p))]}[mode]
    for a, b in zip(t.soft, expected):
        torch.testing.assert_close(a, b)
    mean = p if not expected else sum(expected) / len(expected)
    assert torch.equal(t.hard, mean.argmax(1))


def test_teacher_ignores_padding():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    valid[1, 10:] = False
    valid[1, :, 12:] = False
    teacher = Teacher(StubGenerator(), mode="gp_lp_parallel", apro={"iters": 2, "backend": "torch"})
    t = teacher(images, valid)
    assert (t.hard[1][~valid[1]] == 255).all() and (t.hard[1][valid[1]] != 255).all()
    alone = teacher(images[1:, :, :10, :12], valid[1:, :10, :12])
    assert torch.equal(t.hard[1, :10, :12], alone.hard[0])
    torch.testing.assert_close(t.soft[0][1, :, :10, :12], alone.soft[0][0])
    assert float(t.soft[0][1, :, 10:].abs().sum()) == 0.0
    full = teacher(images[:1], valid[:1])
    assert torch.equal(t.hard[0], full.hard[0])
    with pytest.raises(ValueError, match="teacher scores 5 classes but the dataset has 7"):
        Teacher(StubGenerator(), num_classes=7)(images, valid)


def test_augment_deterministic_and_padded():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (20, 30), dtype=np.uint8)
    params = AugmentParams(crop=32, scale=(0.5, 0.5))
    a = augment(image, label, params, rng_for(3, 7))
    b = augment(image, label, params, rng_for(3, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    img, lab, valid = a
    assert img.shape == (3, 32, 32) and lab.shape == (32, 32)
    assert int(valid.sum()) == 16 * 24  # short side 20 -> 16 (base 32 x 0.5)
    assert (lab[~valid] == 255).all() and (img[:, ~valid] == 0).all()
    with pytest.raises(ValueError, match="augment.scale"):
        AugmentParams(crop=32, scale=(2.0, 1.0))


def test_step_batches_shard_the_global_batch():
    single = list(StepBatches(2, 4, 8, 0, 1))
    r0, r1 = list(StepBatches(2, 4, 8, 0, 2)), list(StepBatches(2, 4, 8, 1, 2))
    assert single == [list(range(16, 24)), list(range(24, 32))]
    assert [a + b for a, b in zip(r0, r1)] == single
    assert list(StepBatches(0, 1, 8, 1, 2, accum=2)) == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="divisible"):
        StepBatches(0, 1, 6, 0, 4)


def test_pseudo_label_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_img.png"):
        read_pseudo_label(tmp_path, "missing_img", 5, (4, 4))
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"bad.png.*value 7 outside the class range \[0, 5\)"):
        read_pseudo_label(tmp_path, "bad", 5, (4, 4))
    Image.fromarray(np.array([[1, 255], [0, 4]], np.uint8)).save(tmp_path / "ok.png")
    assert read_pseudo_label(tmp_path, "ok", 5, (2, 2)).tolist() == [[1, 255], [0, 4]]


def test_model_checkpoint_roundtrip_and_wrong_architecture(tmp_path):
    model = tiny_model(5)
    save_model(model, tmp_path / "model.safetensors")
    other = DeepLabV2(5, **TINY)
    load_model(other, tmp_path / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(ValueError, match=r"model.safetensors.*shape mismatch: head.convs.0.bias \(file \(5,\), model \(6,\)\)"):
        load_model(tiny_model(6), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"resnet18 with 5 classes in the file, resnet10t with 5 classes expected.*missing keys: backbone.conv1.0.weight"):
        load_model(DeepLabV2(5, backbone="resnet10t"), tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_model(model, tmp_path / "nope.safetensors")
    assert not list(tmp_path.glob("*.tmp"))


def test_backbone_from_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    full = timm.create_model("resnet18", channels=(8, 16, 32, 64), stem_width=8)
    save_file(full.state_dict(), str(tmp_path / "r18.safetensors"))
    model = DeepLabV2(3, pretrained=str(tmp_path / "r18.safetensors"), **TINY)
    torch.testing.assert_close(model.backbone.conv1.weight, full.conv1.weight)
    torch.save({"state_dict": full.state_dict()}, tmp_path / "r18.pth")
    assert torch.equal(read_state_dict(str(tmp_path / "r18.pth"))["conv1.weight"], full.conv1.weight)
    with pytest.raises(ValueError, match="does not fit the backbone"):
        DeepLabV2(3, pretrained=str(tmp_path / "r18.safetensors"), backbone="resnet18")


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_training_state_roundtrip(tmp_path, opt):
    model = tiny_model(3)
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if opt == "sgd" else (lambda p: torch.optim.AdamW(p, lr=1e-3))
    optim = make(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1 - s / 10)
    for _ in range(2):
        model(torch.rand(1, 3, 32, 32)).sum().backward()
        optim.step()
        sched.step()
    for step in (2, 3):
        save_checkpoint(tmp_path, step, model, optim, sched, keep=1)
    folder = latest_checkpoint(tmp_path)
    assert folder.name == "step_00000003" and [p.name for p in tmp_path.glob("step_*")] == ["step_00000003"]
    assert json.loads((folder / "train_state.json").read_text())["step"] == 3
    model2 = DeepLabV2(3, **TINY)
    optim2 = make(model2.parameters())
    sched2 = torch.optim.lr_scheduler.LambdaLR(optim2, lambda s: 1 - s / 10)
    meta = load_checkpoint(folder, model2, optim2, sched2)
    assert meta["step"] == 3 and sched2.last_epoch == sched.last_epoch
    a, b = optim.state_dict(), optim2.state_dict()
    assert a["param_groups"] == [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in b["param_groups"]]
    for i, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k]))
    assert not (tmp_path / "train_state.pkl").exists()
