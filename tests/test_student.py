"""DeepLabv2 student parts: trunk, heads, losses, teacher targets, checkpoints, inference."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskclip_apro.refiners import Chain
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
from maskclip_apro.student.deeplabv2 import ASPPFeatures, ASPPv2, DeepLabV2, sync_batchnorm
from maskclip_apro.student.inference import predict, slide_stride
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


def teacher_classifier(names_per_class, dim=8, threshold=None, seed=0):
    """A teacher text classifier (generator.text.TextClassifier) with random unit rows."""
    from maskclip_apro.generator.text import TextClassifier

    owner = [k for k, n in enumerate(names_per_class) for _ in range(n)]
    emb = F.normalize(torch.randn(len(owner), dim, generator=torch.Generator().manual_seed(seed)), dim=1)
    return TextClassifier(emb, torch.tensor(owner), len(names_per_class), threshold=threshold)


@pytest.mark.parametrize("backbone,blocks", [("resnet50c", [3, 4, 6, 3]), ("resnet101c", [3, 4, 23, 3])])
def test_resnet_v1c_trunk_matches_mmseg(backbone, blocks):
    """3x3/2 3->32, 3x3 32->32, 3x3 32->64 stem; plain 1x1 shortcut; OS 8 with contract dilation;
    mmseg's block counts for depth 50 and 101."""
    model = DeepLabV2(3, backbone=backbone, head="text", text=teacher_classifier([1, 1, 1], dim=16))
    b = model.backbone
    assert [len(getattr(b, f"layer{i}")) for i in range(1, 5)] == blocks
    convs = [m for m in b.conv1 if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 32, (3, 3), (2, 2)), (32, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1))]
    assert b.bn1.num_features == 64 and isinstance(b.maxpool, torch.nn.MaxPool2d)
    shortcut = b.layer2[0].downsample  # v1c: no average pooling in the shortcut (that is v1d)
    assert [type(m).__name__ for m in shortcut] == ["Conv2d", "BatchNorm2d"] and shortcut[0].stride == (2, 2)
    assert b.layer2[0].conv2.stride == (2, 2)  # pytorch style: the stride sits on the 3x3
    # mmseg ResNetV1c(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)
    assert [b.layer3[i].conv2.dilation for i in (0, 1)] == [(1, 1), (2, 2)]
    assert [b.layer4[i].conv2.dilation for i in (0, 1)] == [(2, 2), (4, 4)]
    assert b.layer3[0].conv2.stride == (1, 1) and b.layer4[0].conv2.stride == (1, 1)
    assert b.feature_info.reduction()[-1] == 8 and b.feature_info.channels()[-1] == 2048


def test_aspp_features_branches_are_conv_bn_relu_summed():
    head = ASPPFeatures(6, 4).eval()
    for branch, d in zip(head.branches, (6, 12, 18, 24)):
        conv, bn, _ = branch
        assert conv.bias is None and conv.dilation == (d, d) and conv.padding == (d, d)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 6, 30, 30)
    expected = sum(
        torch.relu((F.conv2d(x, c.weight, padding=c.padding, dilation=c.dilation) - bn.running_mean.view(1, -1, 1, 1))
                   / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
        for c, bn, _ in head.branches
    )
    torch.testing.assert_close(head(x), expected)


def test_text_head_is_the_teachers_frozen_embeddings():
    """Rows equal the teacher's; logits = max over a class's names of <feature, row>; nothing trains them."""
    teacher = teacher_classifier([1, 2, 1], dim=8)
    model = tiny_model(3, head="text", text=teacher)
    cls = model.classifier
    assert torch.equal(cls.embeddings, teacher.embeddings) and torch.equal(cls.owner, teacher.owner)
    assert torch.allclose(cls.embeddings.norm(dim=1), torch.ones(4))
    assert "classifier.embeddings" in model.state_dict() and not any(p is cls.embeddings for p in model.parameters())
    assert model.head.branches[0][0].out_channels == 8  # channels = the embedding width
    feat = torch.randn(2, 8, 5, 6)
    e = teacher.embeddings
    dots = torch.einsum("bdhw,md->bmhw", feat, e)
    expected = torch.stack([dots[:, 0], torch.maximum(dots[:, 1], dots[:, 2]), dots[:, 3]], dim=1)
    torch.testing.assert_close(cls(feat), expected)
    before = cls.embeddings.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.rand(2, 3, 32, 32)).logsumexp(1).mean().backward()
    opt.step()
    assert torch.equal(cls.embeddings, before)
    with pytest.raises(ValueError, match="student.channels=4 but the text embeddings are 8-d"):
        tiny_model(3, head="text", text=teacher, channels=4)
    with pytest.raises(ValueError, match="needs the teacher's text classifier"):
        tiny_model(3, head="text")


def test_text_head_learns_the_threshold_background():
    """Class 0 without text (threshold background): a learned unit embedding, as MaskCLIP+'s cls_bg."""
    teacher = teacher_classifier([0, 1, 1], dim=8, threshold=0.5)
    model = tiny_model(3, head="text", text=teacher)
    bg = model.classifier.background
    assert isinstance(bg, torch.nn.Parameter) and bg.shape == (1, 8)
    feat = torch.randn(1, 8, 3, 3)
    out = model.classifier(feat)
    torch.testing.assert_close(out[:, 0], torch.einsum("bdhw,d->bhw", feat, F.normalize(bg[0].detach(), dim=0)))
    torch.testing.assert_close(out[:, 1:], torch.einsum("bdhw,md->bmhw", feat, teacher.embeddings))
    out.sum().backward()
    assert bg.grad is not None and bg.grad.abs().sum() > 0


def test_sync_batchnorm_only_for_several_cuda_processes():
    model = tiny_model(3, bn="sync")
    for world, device in ((2, "cpu"), (1, "cpu"), (1, "cuda")):
        out = sync_batchnorm(model, world, torch.device(device))
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in out.modules())
    plain = sync_batchnorm(tiny_model(3, bn="train"), 4, torch.device("cuda"))  # bn=train: never synchronised
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm runs on CUDA only; this machine has no GPU")
def test_sync_batchnorm_converts_under_torchrun_on_cuda():
    model = sync_batchnorm(tiny_model(3, bn="sync", head="text", text=teacher_classifier([1, 1, 1])), 2, torch.device("cuda"))
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {torch.nn.SyncBatchNorm}
    model = model.cuda().eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32, device="cuda")).shape == (1, 3, 32, 32)


def test_mmcv_v1c_checkpoint_keys_are_renamed(tmp_path):
    """An mmcv ResNetV1c state dict (stem.0..stem.7, fc.*) loads into timm's deep-stem ResNet."""
    import timm
    from safetensors.torch import save_file

    kw = {"channels": (8, 16, 32, 64), "stem_width": 8, "stem_type": "deep"}
    full = timm.create_model("resnet18", **kw)
    rename = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.",
              "conv1.6.": "stem.6.", "bn1.": "stem.7."}
    state = {}
    for k, v in full.state_dict().items():
        for new, old in rename.items():
            if k.startswith(new):
                k = old + k[len(new):]
                break
        state[k] = v.clone()
    save_file(state, str(tmp_path / "v1c.safetensors"))
    model = DeepLabV2(3, backbone="resnet18", backbone_kwargs=kw, pretrained=str(tmp_path / "v1c.safetensors"))
    torch.testing.assert_close(model.backbone.conv1[6].weight, full.conv1[6].weight)
    torch.testing.assert_close(model.backbone.bn1.running_var, full.bn1.running_var)


def test_predict_whole_at_the_protocol_scale_and_slide():
    """The model sees the keep-ratio rescale; labels come back at the original size; for a pointwise
    model sliding windows give the whole-image result."""
    from maskclip_apro.geometry import rescale_size

    seen = []

    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return self.conv(x)

    torch.manual_seed(0)
    model = Pointwise()
    image = np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    labels, size = predict(model, image, img_scale=(520, 520))
    assert size == rescale_size(30, 45, (520, 520)) == (347, 520) and seen == [size] and labels.shape == (30, 45)
    seen.clear()
    slid, _ = predict(model, image, img_scale=(520, 520), mode="slide", window=128, stride=96)
    assert len(seen) == 4 * 6 and all(h <= 128 and w <= 128 for h, w in seen)
    assert torch.equal(slid, labels)
    assert slide_stride(512) == 341 and slide_stride(480) == 320
    with pytest.raises(ValueError, match="eval.mode"):
        predict(model, image, mode="tiles")



    torch.manual_seed(0)
    y = torch.softmax(torch.randn(2, 4, 6, 5) * 3, dim=1)
    valid = torch.ones(2, 6, 5, dtype=torch.bool)
    sums = loss_sums(y.log(), y.argmax(1), [y, y], [2.0, 1.0], valid)
    assert float(sums.l1) < 1e-5


def test_l1_and_ce_against_loop_oracle():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 2, 2)
    targets = [torch.softmax(torch.randn(1, 3, 2, 2), 1) for _ in range(2)]
    weights = [2.0, 1.0]
    valid = torch.tensor([[[True, False], [True, True]]])
    hard = torch.tensor([[[0, 255], [2, 1]]])
    p = torch.softmax(logits, 1)
    l1 = sum(
        w * float((p[0, :, i, j] - t[0, :, i, j]).abs().sum())
        for t, w in zip(targets, weights) for i in range(2) for j in range(2) if valid[0, i, j]
    )
    ce = sum(-float(torch.log_softmax(logits[0, :, i, j], 0)[hard[0, i, j]]) for i in range(2) for j in range(2) if hard[0, i, j] != 255)
    sums = loss_sums(logits, hard, targets, weights, valid)
    assert float(sums.l1) == pytest.approx(l1, rel=1e-5)
    assert float(sums.ce) == pytest.approx(ce, rel=1e-5)
    assert float(combine(sums, 3, 3, 0.5)) == pytest.approx(0.5 * ce / 3 + l1 / 3, rel=1e-5)
    with pytest.raises(ValueError, match="soft target shape"):
        l1_sum(p, [targets[0][:, :2]], [1.0], valid)
    with pytest.raises(ValueError, match="2 soft targets but 1 weights"):
        l1_sum(p, targets, [1.0], valid)


class StubGenerator:
    """A deterministic 'CLIP': class scores from patch-averaged colours (patch 8)."""

    def __init__(self, num_classes: int = 5, patch: int = 8):
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(num_classes, 3, generator=g) * 4
        self.patch = patch

    def __call__(self, images: torch.Tensor):
        pooled = F.avg_pool2d(images, self.patch, ceil_mode=True)
        logits = torch.einsum("kc,bchw->bkhw", self.weight, pooled)
        return SimpleNamespace(logits=logits, keys=None, features=None, image=images)


# APro at the crop's own size (no grid-relative resizing), so the oracle below stays a plain composition
APRO_FAST = {"apro": {"iters": 3, "backend": "torch", "zeta_s": 0.15, "gp_scale": None, "lp_scale": None},
             "pd": {"thresh": 0.5}}


@pytest.mark.parametrize("steps,weights", [([], []), (["apro"], [2.0, 1.0]), (["lp_gp"], [2.0]), (["gp_lp"], [1.0])])
def test_teacher_targets(steps, weights):
    from maskclip_apro.apro import global_propagation, local_propagation

    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    teacher = Teacher(StubGenerator(), Chain.from_steps(steps, APRO_FAST), gp_weight=2.0, lp_weight=1.0)
    t = teacher(images, valid)
    assert t.hard.shape == (2, 16, 16) and t.weights == weights
    p = F.interpolate(torch.softmax(StubGenerator()(images).logits, 1), size=(16, 16), mode="bilinear", align_corners=False)
    guide = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)  # APro reads the ImageNet-normalised image
    gp = lambda x: global_propagation(x, guide, 0.1, backend="torch")  # noqa: E731
    lp = lambda x: local_propagation(x, guide, zeta_s=0.15, kernel_size=5, iters=3, backend="torch")  # noqa: E731
    expected = {(): [], ("apro",): [gp(p), lp(p)], ("lp_gp",): [gp(lp(p))], ("gp_lp",): [lp(gp(p))]}[tuple(steps)]
    assert len(t.soft) == len(expected)
    for a, b in zip(t.soft, expected):
        torch.testing.assert_close(a, b)
    mean = F.interpolate(StubGenerator()(images).logits, size=(16, 16), mode="bilinear", align_corners=False) if not expected \
        else sum(expected) / len(expected)  # no refiner: the official teacher upsamples its cosines
    assert torch.equal(t.hard, mean.argmax(1))


def test_teacher_runs_the_whole_chain_and_takes_soft_targets_from_its_apro_step():
    """refine=apro_pd: soft targets are APro's maps, the hard label is the argmax after PD."""
    from maskclip_apro.refiners import Guidance, build_refiner
    from maskclip_apro.segmenter import labels_at

    torch.manual_seed(3)
    images = torch.rand(1, 3, 16, 16)
    teacher = Teacher(StubGenerator(), Chain.from_steps(["apro", "pd"], APRO_FAST))
    t = teacher(images, torch.ones(1, 16, 16, dtype=torch.bool))
    p = torch.softmax(StubGenerator()(images).logits, 1)
    maps = build_refiner("apro", APRO_FAST).targets(p, Guidance(image=images))
    for a, b in zip(t.soft, maps):
        torch.testing.assert_close(a, b)
    refined = build_refiner("pd", APRO_FAST)(sum(maps) / 2, Guidance(image=images))
    assert torch.equal(t.hard, labels_at(refined, (16, 16)))
    with pytest.raises(ValueError, match="2 APro steps"):
        Teacher(StubGenerator(), Chain.from_steps(["apro", "gp"], APRO_FAST))


class KeyedStubGenerator(StubGenerator):
    """StubGenerator with patch keys (a fixed random projection of the patch colours), for KS."""

    def __call__(self, images: torch.Tensor):
        out = super().__call__(images)
        g = torch.Generator().manual_seed(1)
        out.keys = torch.einsum("dc,bchw->bdhw", torch.randn(6, 3, generator=g), F.avg_pool2d(images, self.patch, ceil_mode=True))
        return out


PD_LOW = {"pd": {"thresh": 0.05}}  # keeps most classes of the stub, so KS has something to smooth


def official_clip_labels(cos, k, size, pd_thresh=0.0, ks_thresh=0.0):
    """The official MaskCLIP+ teacher's labels for cosines cos (N, C, H, W) and keys k (N, HW, Ck):
    refine_clip_output, then assign_label's bilinear resize to the label size and argmax (every
    pixel unlabelled). Transcribed from chongzhou96/MaskCLIP 245d31f809be9c1938f8f30561b6bf9ed033d746,
    mmseg/models/decode_heads/maskclip_plus_head.py (refine_clip_output, assign_label)."""
    from official_maskclip import refine_output

    output = refine_output(cos.clone(), k, pd_thresh, ks_thresh)
    output = F.interpolate(output, size=size, mode="bilinear", align_corners=False)
    return output.permute(0, 2, 3, 1).argmax(dim=-1)


def test_teacher_labels_equal_the_official_maskclip_plus_teacher():
    """refine=none / pd / ks / ks_pd in the teacher: the official head's output is upsampled (the
    cosines, with -100 on dropped classes, or KS's mixture), not renormalised probabilities."""
    torch.manual_seed(4)
    images = F.interpolate(torch.rand(2, 3, 4, 4) * 2 - 1, scale_factor=8, mode="nearest")  # one value per patch: several classes
    generator = KeyedStubGenerator()
    out = generator(images)
    cos = out.logits / 100  # the stub's logits play 100 cos, as the generator's
    keys = out.keys.flatten(2).transpose(1, 2)
    for steps, official in (([], {}), (["pd"], {"pd_thresh": 0.05}), (["ks"], {"ks_thresh": 1.0}),
                            (["pd", "ks"], {"pd_thresh": 0.05, "ks_thresh": 1.0})):
        t = Teacher(generator, Chain.from_steps(steps, PD_LOW))(images, torch.ones(2, 32, 32, dtype=torch.bool))
        assert t.soft == [] and torch.equal(t.hard, official_clip_labels(cos, keys, (32, 32), **official)), steps
        assert len(t.hard.unique()) > 1


def test_teacher_sees_a_padded_crop_as_the_official_head():
    """padded=crop: the padded crop at its own scale (the official `self.clip(img)`), labels 255 on
    the padding; padded=valid: the valid rectangle alone."""
    torch.manual_seed(5)
    images = F.interpolate(torch.rand(2, 3, 4, 4), scale_factor=8, mode="nearest")
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[1, 20:] = False
    generator = StubGenerator()
    t = Teacher(generator, Chain([]))(images, valid)
    expected = official_clip_labels(generator(images).logits / 100, None, (32, 32))
    expected[~valid] = 255  # gt_semantic_seg is 255 on the padding (mmseg Pad seg_pad_val)
    assert torch.equal(t.hard, expected)
    alone = Teacher(generator, Chain([]), padded="valid")(images, valid)
    assert torch.equal(alone.hard[1, :20], official_clip_labels(generator(images[1:, :, :20]).logits / 100, None, (20, 32))[0])
    with pytest.raises(ValueError, match="padded-crop input must be one of"):
        Teacher(generator, padded="rescaled")


def test_teacher_ignores_padding():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    valid[1, 10:] = False
    valid[1, :, 12:] = False
    teacher = Teacher(StubGenerator(), Chain.from_steps(["apro"], {"apro": {"iters": 2, "backend": "torch"}}), padded="valid")
    t = teacher(images, valid)
    assert (t.hard[1][~valid[1]] == 255).all() and (t.hard[1][valid[1]] != 255).all()
    alone = teacher(images[1:, :, :10, :12], valid[1:, :10, :12])
    assert torch.equal(t.hard[1, :10, :12], alone.hard[0])
    torch.testing.assert_close(t.soft[0][1, :, :10, :12], alone.soft[0][0])
    assert float(t.soft[0][1, :, 10:].abs().sum()) == 0.0 and t.weights == [2.0, 1.0]
    full = teacher(images[:1], valid[:1])
    assert torch.equal(t.hard[0], full.hard[0])
    with pytest.raises(ValueError, match="teacher scores 5 classes but the dataset has 7"):
        Teacher(StubGenerator(), num_classes=7)(images, valid)


def test_augment_deterministic_and_padded():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (20, 30), dtype=np.uint8)
    pad = (0.25, 0.5, 0.75)
    params = AugmentParams(crop=32, scale=(0.5, 0.5), pad_value=pad)
    a = augment(image, label, params, rng_for(3, 7))
    b = augment(image, label, params, rng_for(3, 7))
    assert all(torch.equal(x, y) for x, y in zip((a.image, a.label, a.valid), (b.image, b.label, b.valid)))
    assert a.image.shape == (3, 32, 32) and a.label.shape == (32, 32)
    # no img_scale: base = the image's own (30, 20), x 0.5 -> 15 x 10, padded at the bottom and right
    assert a.valid[:10, :15].all() and int(a.valid.sum()) == 10 * 15
    assert (a.label[~a.valid] == 255).all()
    assert torch.equal(a.image[:, ~a.valid], torch.tensor(pad).view(3, 1).expand(3, 32 * 32 - 150))
    c = augment(image, label, params, rng_for(3, 8))
    assert not torch.equal(a.image, c.image)
    with pytest.raises(ValueError, match="augment.scale"):
        AugmentParams(crop=32, scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="augment.cat_max_ratio"):
        AugmentParams(crop=32, cat_max_ratio=0.0)


def test_flip_mirrors_image_and_label_together():
    """No scaling, a full-size crop, no photometric change: each crop is the input or its mirror,
    the label always the same as the image, and both outcomes occur over seeds."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (16, 16), dtype=np.uint8)
    params = AugmentParams(crop=16, scale=(1.0, 1.0), photometric=False)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    y = torch.from_numpy(label).long()
    flips = []
    for seed in range(16):
        crop = augment(image, label, params, rng_for(seed, 0))
        flipped = torch.equal(crop.image, x.flip(-1))
        assert flipped or torch.equal(crop.image, x)
        assert torch.equal(crop.label, y.flip(-1) if flipped else y)
        flips.append(flipped)
    assert any(flips) and not all(flips)
    off = AugmentParams(crop=16, scale=(1.0, 1.0), photometric=False, flip=False)
    assert all(torch.equal(augment(image, label, off, rng_for(seed, 0)).image, x) for seed in range(8))


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
    with pytest.raises(ValueError, match=r"resnet18, aspp head with 5 classes in the file, resnet10t, aspp head with 5 classes "
                       r"expected.*missing keys: backbone.conv1.0.weight"):
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


def test_checkpoint_module_does_not_import_the_model_module():
    """One state-dict check, in checkpoint.py; deeplabv2.py imports it, never the reverse."""
    import ast
    from pathlib import Path

    import maskclip_apro.student.checkpoint as ckpt

    tree = ast.parse(Path(ckpt.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m and m.endswith("deeplabv2") for m in imported)


def mmseg020_cross_entropy(pred, label, ignore_index=255):
    """Transcription of mmseg 0.20's CrossEntropyLoss as MaskCLIP+ calls it (reduction 'mean', no
    weight, no avg_factor; there is no avg_non_ignore in that version): chongzhou96/MaskCLIP
    245d31f809be9c1938f8f30561b6bf9ed033d746, mmseg/models/losses/cross_entropy_loss.py
    (cross_entropy) and mmseg/models/losses/utils.py (weight_reduce_loss, reduce_loss)."""

    def reduce_loss(loss, reduction):
        reduction_enum = F._Reduction.get_enum(reduction)
        if reduction_enum == 0:
            return loss
        elif reduction_enum == 1:
            return loss.mean()
        elif reduction_enum == 2:
            return loss.sum()

    def weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None):
        if weight is not None:
            loss = loss * weight
        if avg_factor is None:
            loss = reduce_loss(loss, reduction)
        else:
            if reduction == "mean":
                loss = loss.sum() / avg_factor
            elif reduction != "none":
                raise ValueError('avg_factor can not be used with reduction="sum"')
        return loss

    loss = F.cross_entropy(pred, label, weight=None, reduction="none", ignore_index=ignore_index)
    return weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_trainer_cross_entropy_is_normalised_as_mmseg(tmp_path, avg_non_ignore):
    """loss.avg_non_ignore=false (default): the CE of a step equals mmseg 0.20's mean over every
    crop pixel of each GPU's batch, averaged over GPUs (2 simulated GPUs of 2 crops); true: the sum
    over the labelled pixels divided by their number. Ignored pixels: padding and a void band."""
    from maskclip_apro.config import compose
    from maskclip_apro.distributed import DistInfo
    from maskclip_apro.student.trainer import Trainer

    cfg = compose("train", [
        "dataset=synthetic", "dataset.num_images=4", "student=tiny", "student.head=aspp", "model=tiny_vit", "crop=32",
        "batch_size=4", "iters=2", "workers=0", "eval.interval=0", "checkpoint.interval=0", "device=cpu",
        "refine=none", f"output_dir={tmp_path}", f"loss.avg_non_ignore={str(avg_non_ignore).lower()}",
    ])
    trainer = Trainer(cfg, generator=StubGenerator(num_classes=5), info=DistInfo())  # synthetic: 5 classes
    mb = next(iter(trainer._loader(1)))
    mb["valid"][0, 20:] = False
    mb["valid"][3, :, :9] = False
    trainer.model.train()
    with torch.no_grad():
        logits = trainer.model(mb["image"])
    hard = trainer._targets(mb, mb["image"], mb["valid"]).hard
    labelled = hard != 255
    assert 0 < int(labelled.sum()) < hard.numel()
    if avg_non_ignore:
        expected = float(F.cross_entropy(logits, hard, ignore_index=255, reduction="sum")) / int(labelled.sum())
    else:
        expected = sum(float(mmseg020_cross_entropy(logits[i : i + 2], hard[i : i + 2])) for i in (0, 2)) / 2
    assert trainer.train_step([mb])["loss_ce"] == pytest.approx(expected, rel=1e-5)

