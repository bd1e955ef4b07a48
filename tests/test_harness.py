"""The SCLIP-family harness: class files, logits -> probabilities -> labels (prob_thd, area_thd),
slide geometry in pixel space, the test-pipeline resize, PAMR on logits (function and chain
step), and the harness generator and Segmenter against transcriptions of their loops."""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskclip_apro.data import load_vocab
from maskclip_apro.data.class_file import CLASS_FILES, class_queries, parse_class_lines, read_class_file
from maskclip_apro.generator import build_generator
from maskclip_apro.generator.dense_attention import dense_last_block
from maskclip_apro.generator.harness import HarnessGenerator
from maskclip_apro.generator.pos_embed import interpolate_pos_embed_offset
from maskclip_apro.generator.slide import centred_padding, harness_resize, slide_average, slide_boxes, to_original
from maskclip_apro.geometry import rescale_size
from maskclip_apro.postprocess import area_filter, class_probabilities, harness_labels, threshold_labels
from maskclip_apro.refiners import Guidance
from maskclip_apro.refiners.pamr import pamr
from maskclip_apro.refiners.pamr_logits import PAMRLogits, pamr_logits

# ---------------------------------------------------------------- class files

SIZES = {
    "voc21_sclip": 21, "voc20_sclip": 20, "context60_sclip": 60, "context59_sclip": 59,
    "cocoobject81_sclip": 81, "cocostuff171_sclip": 171, "cityscapes19_sclip": 19, "ade150_sclip": 150,
    "voc21_clearclip": 21, "voc20_clearclip": 20, "cocoobject81_clearclip": 81, "voc21_proxyclip": 21,
    "cocoobject81_proxyclip": 81,
}


def their_queries(text):
    """get_cls_idx as the harness reads a file: a line per class id, split on ', '."""
    names, owner = [], []
    for idx, line in enumerate(text.splitlines(keepends=True)):
        parts = line.split(", ")
        names += [p.replace("\n", "") for p in parts]
        owner += [idx] * len(parts)
    return names, owner


@pytest.mark.parametrize("name", CLASS_FILES)
def test_builtin_class_files_parse_as_the_harness_does(name):
    lines = read_class_file(name)
    assert len(lines) == SIZES[name]
    text = (resources.files("maskclip_apro") / "vocab" / f"{name}.txt").read_text(encoding="utf-8")
    assert class_queries(lines) == their_queries(text)


def test_method_class_files_differ_where_the_methods_do():
    sclip, clear, proxy = (read_class_file(f"voc21_{m}") for m in ("sclip", "clearclip", "proxyclip"))
    assert clear[0] == "background" and clear[15] == "person" and clear[20] == "tvmonitor"
    assert proxy[0] == sclip[0] and proxy[1:] == clear[1:]
    names, owner = class_queries(read_class_file("cocoobject81_proxyclip"))
    assert owner.count(0) == 17 and sorted(owner[i] for i, n in enumerate(names) if n == "bed") == [0, 60]


def test_voc21_background_line_and_synonyms():
    lines = read_class_file("voc21_sclip")
    names, owner = class_queries(lines)
    assert owner.count(0) == 26 and names[0] == "sky" and "fence" in names[:26]
    person = lines.index(next(line for line in lines if line.startswith("person")))
    assert person == 15 and owner.count(15) == 7
    assert owner.count(20) == 5 and names[-1] == "screen"


def test_cocoobject_class_file_shares_bed_between_two_classes():
    names, owner = class_queries(read_class_file("cocoobject81_sclip"))
    assert sorted(owner[i] for i, n in enumerate(names) if n == "bed") == [0, 60]
    with pytest.raises(ValueError, match="duplicate"):
        load_vocab(read_class_file("cocoobject81_sclip"))  # the project's vocabularies refuse it


@pytest.mark.parametrize("vocab,class_file", [("cityscapes19", "cityscapes19_sclip"), ("ade150", "ade150_sclip")])
def test_project_vocab_names_match_class_files_up_to_spaces(vocab, class_file):
    ours = load_vocab(vocab)
    theirs = read_class_file(class_file)
    assert [n.replace(" ", "") for n in ours] == [n.replace(" ", "") for n in theirs]


def test_cocoobject81_vocab_names_the_class_file_lines():
    names = load_vocab("cocoobject81")
    assert len(names) == 81 and names[0] == "background" and names[-1] == "toothbrush"
    assert names[1:] == [line.split(",")[0] for line in read_class_file("cocoobject81_sclip")[1:]]


def test_class_file_errors(tmp_path):
    with pytest.raises(ValueError, match="empty name"):
        parse_class_lines("cat\n\ndog\n", "'x'")
    with pytest.raises(ValueError, match="empty name"):
        parse_class_lines("cat, , kitten\n", "'x'")
    with pytest.raises(ValueError, match="empty"):
        parse_class_lines("", "'x'")
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        read_class_file(tmp_path / "nowhere.txt")
    path = tmp_path / "cls.txt"
    path.write_text("sky, wall\ncat\n")
    assert read_class_file(path) == ["sky, wall", "cat"]


# ---------------------------------------------------------------- logits -> probabilities -> labels


def test_class_probabilities_softmax_over_queries_then_max_per_class():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64) * 0.3
    owner = [0, 0, 1, 2, 2]
    probs = class_probabilities(z, torch.tensor(owner), 3, 40.0)
    for b in range(2):
        for y in range(3):
            for x in range(4):
                e = [math.exp(40.0 * float(z[b, i, y, x])) for i in range(5)]
                p = [v / sum(e) for v in e]
                want = [max(p[i] for i in range(5) if owner[i] == k) for k in range(3)]
                torch.testing.assert_close(probs[b, :, y, x], torch.tensor(want, dtype=torch.float64), atol=1e-14, rtol=0)
    # not a softmax over per-class max logits (the denominators differ), same argmax
    maxed = torch.stack([z[:, :2].amax(1), z[:, 2], z[:, 3:].amax(1)], dim=1)
    assert not torch.allclose(probs, torch.softmax(40.0 * maxed, dim=1))
    assert torch.equal(probs.argmax(1), maxed.argmax(1))


def test_class_probabilities_bad_owner():
    z = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="no query"):
        class_probabilities(z, torch.tensor([0, 0, 2]), 3, 40.0)
    with pytest.raises(ValueError, match="outside"):
        class_probabilities(z, torch.tensor([0, 1, 3]), 3, 40.0)
    with pytest.raises(ValueError, match="disagree"):
        class_probabilities(z, torch.tensor([0, 1]), 2, 40.0)


def probs_from_labels(labels, k, high=0.6):
    """One-hot-ish probabilities: `high` on the labelled class, the rest spread evenly."""
    p = torch.full((1, k, *labels.shape), (1 - high) / (k - 1), dtype=torch.float64)
    p.scatter_(1, labels[None, None], high)
    return p


def test_area_filter_zeroes_small_foreground_classes():
    labels = torch.zeros(10, 10, dtype=torch.long)
    labels[:5] = 1          # 50 pixels
    labels[5:9] = 2         # 40 pixels
    labels[9, :9] = 3       # 9 pixels: 9 / 100 foreground
    labels[9, 9] = 0
    probs = probs_from_labels(labels, 4)
    assert int((labels > 0).sum()) == 99
    out = area_filter(probs, 0.1)
    assert torch.equal(out[:, :3], probs[:, :3]) and torch.all(out[:, 3] == 0)
    assert torch.equal(threshold_labels(out)[0, 9, :9], torch.zeros(9, dtype=torch.long))  # ties: lowest index
    # at the bound (area == area_thd * foreground) a class is removed, above it kept
    labels[9, 9] = 3
    assert int((labels == 3).sum()) == 10 and int((labels > 0).sum()) == 100
    assert torch.all(area_filter(probs_from_labels(labels, 4), 0.1)[:, 3] == 0)
    labels[0, 0] = 3
    assert int((labels == 3).sum()) == 11 and int((labels > 0).sum()) == 100
    assert torch.all(area_filter(probs_from_labels(labels, 4), 0.1)[:, 3] != 0)


def test_area_filter_without_foreground_changes_no_label():
    probs = probs_from_labels(torch.zeros(4, 4, dtype=torch.long), 3)
    assert torch.equal(threshold_labels(area_filter(probs, 0.1)), threshold_labels(probs))


def test_threshold_labels():
    probs = torch.tensor([[0.05, 0.07, 0.03], [0.2, 0.5, 0.3], [0.4, 0.3, 0.3], [0.1, 0.45, 0.45]]).T.reshape(1, 3, 1, 4)
    assert threshold_labels(probs, 0.1).tolist() == [[[0, 1, 0, 1]]]
    assert threshold_labels(probs, 0.0).tolist() == [[[1, 1, 0, 1]]]


def test_harness_labels_composes_the_steps():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 6, 8, 8, generator=g) * 0.1
    owner = torch.tensor([0, 0, 1, 2, 3, 3])
    probs, labels = harness_labels(z, owner, 4, logit_scale=65.0, prob_thd=0.1, area_thd=0.1)
    want = area_filter(class_probabilities(z, owner, 4, 65.0), 0.1)
    assert torch.equal(probs, want) and torch.equal(labels, threshold_labels(want, 0.1))


# ---------------------------------------------------------------- slide geometry


def their_boxes(h_img, w_img, crop, stride):
    """The windows of their forward_slide."""
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    boxes = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            boxes.append((y1, x1, y2 - y1, x2 - x1))
    return boxes


@pytest.mark.parametrize("size", [(336, 448), (336, 500), (336, 336), (200, 300), (560, 1120), (448, 597)])
@pytest.mark.parametrize("window,stride", [(224, 112), (448, 224), (336, 112)])
def test_slide_boxes_match_their_loop_last_flush(size, window, stride):
    boxes = slide_boxes(*size, window, stride)
    assert boxes == their_boxes(*size, window, stride)
    assert max(y + h for y, _, h, _ in boxes) == size[0] and max(x + w for _, x, _, w in boxes) == size[1]


def test_slide_box_counts():
    assert len(slide_boxes(336, 448, 224, 112)) == 2 * 3
    assert len(slide_boxes(336, 500, 224, 112)) == 2 * 4
    assert slide_boxes(336, 500, 224, 112)[-1] == (112, 276, 224, 224)
    assert slide_boxes(100, 120, 224, 112) == [(0, 0, 100, 120)]
    assert slide_boxes(100, 120, None, None) == [(0, 0, 100, 120)]
    with pytest.raises(ValueError, match="stride"):
        slide_boxes(100, 120, 224, 0)


def test_centred_padding():
    assert centred_padding(20, 27, 8) == (2, 3, 2, 2)
    assert centred_padding(24, 24, 8) == (0, 0, 0, 0)
    assert centred_padding(336, 300, 56) == (18, 18, 0, 0)  # 300 -> 336


def patch_means(p):
    return lambda crop: F.avg_pool2d(crop, p)  # a map on the crop's patch grid (floor of its size)


def their_slide(img, crop_fn, crop, stride, pad_to):
    """Their forward_slide accumulation: F.pad each upsampled window map into the image frame."""
    _, _, h_img, w_img = img.shape
    preds, count = None, torch.zeros(1, 1, h_img, w_img, dtype=img.dtype)
    for y1, x1, h, w in their_boxes(h_img, w_img, crop, stride):
        crop_img = img[:, :, y1 : y1 + h, x1 : x1 + w]
        pad = (0, 0, 0, 0)
        if pad_to:
            lr, tb = (pad_to - w % pad_to) % pad_to, (pad_to - h % pad_to) % pad_to
            pad = (lr // 2, lr - lr // 2, tb // 2, tb - tb // 2)
            crop_img = F.pad(crop_img, pad)
        logit = F.interpolate(crop_fn(crop_img), size=crop_img.shape[-2:], mode="bilinear")
        logit = logit[:, :, pad[2] : pad[2] + h, pad[0] : pad[0] + w]
        part = F.pad(logit, (x1, w_img - x1 - w, y1, h_img - y1 - h))
        preds = part if preds is None else preds + part
        count[:, :, y1 : y1 + h, x1 : x1 + w] += 1
    return preds / count


@pytest.mark.parametrize("size,pad_to", [((40, 52), None), ((20, 52), None), ((20, 52), 8), ((44, 30), 16)])
def test_slide_average_equals_their_accumulation(size, pad_to):
    img = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = slide_average(patch_means(8), img, 24, 12, pad_to)
    assert out.shape == (2, 3, *size)
    torch.testing.assert_close(out, their_slide(img, patch_means(8), 24, 12, pad_to), atol=1e-12, rtol=0)


def test_slide_average_single_window_is_the_upsampled_map():
    img = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = F.interpolate(F.avg_pool2d(img, 16), size=(32, 48), mode="bilinear", align_corners=False)
    assert torch.equal(slide_average(patch_means(16), img, None, None), want)
    assert torch.equal(slide_average(patch_means(16), img, 64, 32), want)


@pytest.mark.parametrize(
    "size,scale,expected",
    [
        ((375, 500), (2048, 336), (336, 448)), ((500, 375), (2048, 336), (448, 336)),
        ((281, 500), (2048, 336), (336, 598)), ((1024, 2048), (2048, 560), (560, 1120)),
        ((427, 640), (2048, 448), (448, 671)), ((100, 4000), (2048, 336), (51, 2048)),
    ],
)
def test_harness_resize_rounding(size, scale, expected):
    img = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(4))
    out = harness_resize(img, scale)
    assert out.shape[-2:] == expected
    assert torch.equal(out, F.interpolate(img, size=expected, mode="bilinear", align_corners=False, antialias=False))
    assert torch.equal(to_original(out, size), F.interpolate(out, size=size, mode="bilinear", align_corners=False))


# ---------------------------------------------------------------- PAMR on logits


def their_pamr(image, mask, iters, dilations):
    """The harness's PAMR (conv kernels, std over 9 positions per dilation, softmax over neighbours)."""
    offsets = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    diff = torch.zeros(8, 1, 3, 3, dtype=image.dtype)
    copy = torch.zeros(8, 1, 3, 3, dtype=image.dtype)
    for i, (a, b) in enumerate(offsets):
        diff[i, 0, 1, 1], diff[i, 0, a, b] = 1, -1
        copy[i, 0, a, b] = 1
    window = torch.zeros(9, 1, 3, 3, dtype=image.dtype)
    for i in range(9):
        window[i, 0, i // 3, i % 3] = 1

    def local(x, kernel):
        b, k, h, w = x.shape
        x = x.reshape(b * k, 1, h, w)
        outs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(outs, 1).reshape(b, k, -1, h, w)

    std = local(image, window).std(2, keepdim=True)
    aff = (-local(image, diff).abs() / (1e-8 + 0.1 * std)).mean(1, keepdim=True)
    aff = torch.softmax(aff, 2)
    for _ in range(iters):
        mask = (local(mask, copy) * aff).sum(2)
    return mask


def test_pamr_logits_equals_their_pamr_on_the_resized_normalised_image():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 4, 30, 34, generator=g, dtype=torch.float64) * 0.2
    image = torch.randn(1, 3, 20, 24, generator=g, dtype=torch.float64)
    out = pamr_logits(logits, image, dilations=(1, 2), iters=3)
    guide = F.interpolate(image, size=(30, 34), mode="bilinear")
    torch.testing.assert_close(out, their_pamr(guide, logits, 3, (1, 2)), atol=1e-12, rtol=1e-12)
    # on logits, then softmax, is not softmax, then PAMR
    after = torch.softmax(40 * out, 1)
    before = pamr(torch.softmax(40 * logits, 1), guide, (1, 2), 3)
    assert not torch.allclose(after, before, atol=1e-3)


def test_pamr_logits_keeps_dtype_and_checks_input():
    logits = torch.randn(1, 2, 16, 16)
    image = torch.randn(1, 3, 16, 16)
    assert pamr_logits(logits, image).dtype == torch.float32
    with pytest.raises(ValueError, match="batch"):
        pamr_logits(logits, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="iters"):
        pamr_logits(logits, image, iters=-1)
    with pytest.raises(ValueError, match="dilations"):
        pamr_logits(logits, image, dilations=())


# ---------------------------------------------------------------- the pieces composed (what the protocol wiring does)


@pytest.mark.parametrize("mode", ["naclip", "proxyclip"])
def test_harness_pieces_compose_on_tiny_models(mode):
    from maskclip_apro.generator.models import image_mean_std, load_clip
    from maskclip_apro.generator.vfm import load_vfm

    clip, _ = load_clip("tiny_vit", None)
    visual = clip.visual
    vfm = load_vfm("tiny_dino", None) if mode == "proxyclip" else None
    mean, std = (t.view(1, 3, 1, 1) for t in image_mean_std(clip))
    g = torch.Generator().manual_seed(7)
    text = F.normalize(torch.randn(5, visual.proj.shape[1], generator=g), dim=1)  # 5 queries
    owner = torch.tensor([0, 0, 1, 2, 2])

    def crop_fn(crop):
        b, _, h, w = crop.shape
        grid = (h // 16, w // 16)
        x = visual.conv1(crop).flatten(2).transpose(1, 2)
        pos = interpolate_pos_embed_offset(visual.positional_embedding, (4, 4), grid)
        x = visual.ln_pre(torch.cat([visual.class_embedding.expand(b, 1, -1), x], 1) + pos)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        extra = {"vfm_features": vfm(crop * std + mean)} if vfm is not None else {}
        feats, _ = dense_last_block(visual, x, grid, mode, **extra)
        return torch.einsum("bdhw,md->bmhw", F.normalize(feats, dim=1), text)

    image = torch.rand(1, 3, 70, 90, generator=g)
    resized = harness_resize(image, (2048, 48))
    normed = (resized - mean) / std
    with torch.no_grad():
        logits = to_original(slide_average(crop_fn, normed, 32, 16), (70, 90))
        logits = pamr_logits(logits, normed, dilations=(1, 2), iters=2)
    probs, labels = harness_labels(logits, owner, 3, logit_scale=40.0, prob_thd=0.1)
    assert resized.shape[-2:] == (48, 62) and logits.shape == (1, 5, 70, 90)
    assert probs.shape == (1, 3, 70, 90) and labels.shape == (1, 70, 90) and bool(torch.isfinite(probs).all())
    assert int(labels.min()) >= 0 and int(labels.max()) <= 2


# ---------------------------------------------------------------- the harness generator (generator/harness.py)


LINES = ["sky, wall", "cat", "dog, puppy"]


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text_cache")


def harness_generator(cache, mode="sclip", **kw):
    settings = dict(mode="harness", templates="clip", normalize="model", pos_interp="offset", short_side=48, window=32,
                    stride=16, logit_scale=40.0, dense=mode, vfm={"name": "tiny_dino", "pretrained": None})
    settings.update(kw)
    return build_generator("tiny_vit", None, ["background", "cat", "dog"], class_lines=LINES, cache_dir=str(cache),
                           **settings)


# Transcriptions of the official last-block code, on the model's own modules (conv1, ln_pre, the
# blocks before the last, ln_1 / attn / ln_2 / mlp of the last, ln_post, proj). The official towers
# run their blocks sequence-first (LND); open_clip's run batch-first, so the blocks before the last
# are called as the model does and the tokens turned to LND for the transcribed last block.


def official_interpolate_pos_encoding(visual, x, w, h):
    """wangf3014/SCLIP b56bd3014b9e8a3ee3450bcfc53700a67d627b7a clip/model.py,
    VisionTransformer.interpolate_pos_encoding (NACLIP 0cac3a6, ClearCLIP ad68a40 and ProxyCLIP
    e7b767f carry the same function; NACLIP passes align_corners=False, recompute_scale_factor=False,
    the defaults)."""
    patch_size = visual.patch_size[0]
    npatch = x.shape[1] - 1
    N = visual.positional_embedding.shape[0] - 1
    if npatch == N and w == h:
        return visual.positional_embedding
    class_pos_embed = visual.positional_embedding[[0]]
    patch_pos_embed = visual.positional_embedding[1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode='bicubic',
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def official_qkv(attn_layer, x):
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    return q, k, v, head_dim ** -0.5, bsz, embed_dim


def official_attn_output(attn_layer, attn_weights, v, bsz, embed_dim):
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def sclip_custom_attn(attn_layer, x):
    """SCLIP b56bd30 clip/model.py, VisionTransformer.custom_attn with csa=True."""
    q, k, v, scale, bsz, embed_dim = official_qkv(attn_layer, x)
    q_attn = torch.bmm(q, q.transpose(1, 2)) * scale
    k_attn = torch.bmm(k, k.transpose(1, 2)) * scale
    attn_weights = F.softmax(q_attn, dim=-1) + F.softmax(k_attn, dim=-1)
    return official_attn_output(attn_layer, attn_weights, v, bsz, embed_dim)


def clearclip_custom_attn(attn_layer, x):
    """ClearCLIP ad68a40 open_clip/transformer.py, VisionTransformer.custom_attn, model_type='ClearCLIP'."""
    q, k, v, scale, bsz, embed_dim = official_qkv(attn_layer, x)
    qq_attn = torch.bmm(q, q.transpose(1, 2)) * scale
    attn_weights = F.softmax(qq_attn, dim=-1)
    return official_attn_output(attn_layer, attn_weights, v, bsz, embed_dim)


def naclip_gaussian_window(dim1, dim2, std=1.):
    """NACLIP 0cac3a6 clip/model.py, VisionTransformer.gaussian_window."""
    constant = 1 / (std * math.sqrt(2))
    ks = list()
    for dim in [dim1, dim2]:
        start = -(dim - 1) / 2.0
        k = torch.linspace(start=start * constant, end=(start + (dim - 1)) * constant, steps=dim, dtype=torch.float)
        ks.append(k)
    dist_square_to_mu = (torch.stack(torch.meshgrid(*ks, indexing='ij')) ** 2).sum(0)
    return torch.exp(-dist_square_to_mu)


def naclip_get_attention_addition(dim1, dim2, window, adjust_for_cls=True):
    """NACLIP 0cac3a6 clip/model.py, VisionTransformer.get_attention_addition."""
    m = torch.einsum('ij,kl->ijkl', torch.eye(dim1), torch.eye(dim2))
    m = m.permute((0, 3, 1, 2)).contiguous()
    out = F.conv2d(m.view(-1, dim1, dim2).unsqueeze(1), window.unsqueeze(0).unsqueeze(1), padding='same').squeeze(1)
    out = out.view(dim1 * dim2, dim1 * dim2)
    if adjust_for_cls:
        v_adjusted = torch.vstack([torch.zeros((1, dim1 * dim2)), out])
        out = torch.hstack([torch.zeros((dim1 * dim2 + 1, 1)), v_adjusted])
    return out


def naclip_custom_attn(attn_layer, x, n_patches, gaussian_std=5.0):
    """NACLIP 0cac3a6 clip/model.py, VisionTransformer.custom_attn, attn_strategy='naclip' (its default
    gaussian_std 5, naclip.py)."""
    q, k, v, scale, bsz, embed_dim = official_qkv(attn_layer, x)
    window_size = [side * 2 - 1 for side in n_patches]
    window = naclip_gaussian_window(*window_size, std=gaussian_std)
    addition = naclip_get_attention_addition(*n_patches, window).unsqueeze(0).to(x.dtype).to(x.device)
    attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
    omega = addition
    attn_weights += omega
    attn_weights = F.softmax(attn_weights, dim=-1)
    return official_attn_output(attn_layer, attn_weights, v, bsz, embed_dim)


def proxyclip_custom_attn(attn_layer, x, ex_feats, beta=1.2, gamma=3.0, token_size=(16, 16)):
    """ProxyCLIP e7b767f open_clip/transformer.py, VisionTransformer.custom_attn."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    B, C, H, W = ex_feats.shape
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    similarity = (similarity - torch.mean(similarity) * beta) * gamma
    similarity[similarity < 0.0] = float('-inf')
    mask = similarity.to(q.dtype).unsqueeze(1).repeat(1, num_heads, 1, 1)
    mask = mask.reshape(bsz * num_heads, mask.shape[2], mask.shape[3])
    attn_weights = F.softmax(mask, dim=-1)
    v = v[:, 1:, :].reshape(bsz * num_heads, token_size[0], token_size[1], head_dim).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=(H, W), mode='bilinear', align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(bsz * num_heads, H * W, head_dim)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def maskclip_last_layer(blk, x):
    """MaskCLIP 245d31f mmseg/models/backbones/vit.py, TransformerEncoderLayer.forward with return_qkv
    (the value path: v = out_proj(v) + x, then the FFN with its residual), on batch-first tokens."""
    y = blk.ln_1(x)
    y = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
    N, L, C = y.shape
    y = y.view(N, L, 3, C // 3).permute(2, 0, 1, 3).reshape(3 * N, L, C // 3)
    y = F.linear(y, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
    q, k, v = y.tensor_split(3, dim=0)
    v += x
    return v + blk.mlp(blk.ln_2(v))


def their_encode_image(visual, img, mode, ex_feats=None):
    """The official VisionTransformer.forward (return_all / tokens) of each method: conv1, class
    token, positional embedding (the native table when the token count is native, else
    interpolate_pos_encoding), ln_pre, the blocks, the method's last block, ln_post, proj. SCLIP
    b56bd30 and NACLIP 0cac3a6 clip/model.py, ClearCLIP ad68a40 (ignore_residual=True) and ProxyCLIP
    e7b767f open_clip/transformer.py; "maskclip": MaskCLIP's value path (maskclip_last_layer)."""
    B, nc, w, h = img.shape
    patch_size = visual.patch_size[0]
    x = visual.conv1(img)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    x = x.permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], dim=1)
    if x.shape[1] != visual.positional_embedding.shape[0]:
        x = x + official_interpolate_pos_encoding(visual, x, w, h).to(x.dtype)
    else:
        x = x + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)  # the model's own (batch-first) blocks
    blk = visual.transformer.resblocks[-1]
    if mode == "maskclip":
        x = maskclip_last_layer(blk, x)
    else:
        x = x.permute(1, 0, 2)  # NLD -> LND
        if mode == "sclip":
            x = x + sclip_custom_attn(blk.attn, blk.ln_1(x))
            x = x + blk.mlp(blk.ln_2(x))
        elif mode == "naclip":  # arch 'reduced'
            x = naclip_custom_attn(blk.attn, blk.ln_1(x), (w // patch_size, h // patch_size))
        elif mode == "clearclip":  # ignore_residual=True, last_n_layers=1
            x = clearclip_custom_attn(blk.attn, blk.ln_1(x))
        elif mode == "proxyclip":
            token_size = h // patch_size, w // patch_size
            x = proxyclip_custom_attn(blk.attn, blk.ln_1(x), ex_feats=ex_feats, token_size=token_size)
        x = x.permute(1, 0, 2)  # LND -> NLD
    return visual.ln_post(x) @ visual.proj


def their_forward_feature(gen, mode):
    """Their forward_feature on one crop, as the map on its patch grid (SCLIP b56bd30
    clip_segmentor.py; ProxyCLIP e7b767f proxyclip_segmentor.py: the VFM sees norm(unnorm(crop)),
    the whole padded crop, its patch features are ex_feats and the map is on the VFM grid)."""
    visual = gen.model.visual
    text = gen.classifier.embeddings

    def crop_fn(img):
        ex_feats = None
        if mode == "proxyclip":
            ex_feats = gen.backbone.vfm(img * gen.std + gen.mean)
        image_features = their_encode_image(visual, img, mode, ex_feats)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        if mode != "proxyclip":
            image_features = image_features[:, 1:]
        logits = image_features @ text.T
        if mode == "proxyclip":
            I, J = ex_feats.shape[-2:]
        else:
            I, J = img.shape[-2] // visual.patch_size[0], img.shape[-1] // visual.patch_size[1]
        return logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], I, J)

    return crop_fn


@pytest.mark.parametrize(
    "mode,size,window,stride,pad_to,short",
    [("sclip", (50, 70), 32, 16, None, 48), ("naclip", (45, 81), None, None, None, 48),
     ("clearclip", (50, 70), 40, 24, "patch", 48), ("proxyclip", (50, 70), 48, 16, 56, 48),
     ("maskclip", (61, 50), 32, 16, None, 48),
     ("sclip", (64, 100), 64, 32, None, 64), ("naclip", (70, 70), None, None, None, 64)],  # native 4 x 4 crops
)
def test_pixel_cos_equals_their_slide_loop(text_cache, mode, size, window, stride, pad_to, short):
    """The harness generator's pixel cosines against the official slide loop and forward passes; the
    last two cases have crops of the tiny tower's native 4 x 4 grid (the native positional table)."""
    gen = harness_generator(text_cache, mode, window=window, stride=stride, pad_to=pad_to, short_side=short)
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(11))
    out = gen(image)
    resized = F.interpolate(image, size=rescale_size(*size, (2048, short)), mode="bilinear", align_corners=False)
    normed = (resized - gen.mean) / gen.std
    h, w = normed.shape[-2:]
    pad = 16 if pad_to == "patch" else pad_to
    with torch.no_grad():
        want = their_slide(normed, their_forward_feature(gen, mode), window or max(h, w), stride or 1, pad)
    want = F.interpolate(want, size=size, mode="bilinear")
    assert out.pixel_cos.shape == (1, 5, *size)
    torch.testing.assert_close(out.pixel_cos, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(out.image, resized)


def test_grid_outputs_of_one_window_are_the_backbones(text_cache):
    """An image of whole patches in one window: every cell centre is a patch centre, so the grid
    outputs are the backbone's own maps; logits = logit_scale x the max over each class's queries."""
    gen = harness_generator(text_cache, "naclip", short_side=64, window=None)
    image = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(12))
    out = gen(image)
    feats, keys = gen.backbone((image - gen.mean) / gen.std)
    assert out.features.shape == (2, 32, 4, 6) and out.keys.shape == (2, 64, 4, 6)
    torch.testing.assert_close(out.features, feats, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.keys, keys, atol=1e-6, rtol=1e-6)
    cos = torch.einsum("bdhw,md->bmhw", F.normalize(feats, dim=1), gen.classifier.embeddings)
    want = torch.stack([cos[:, :2].amax(1), cos[:, 2], cos[:, 3:].amax(1)], dim=1) * 40.0
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)


def test_grid_outputs_of_aligned_windows_are_the_patch_grid_average(text_cache):
    """Windows on whole patches: the cell average is the MaskCLIP generator's patch-grid stitching."""
    gen = harness_generator(text_cache, "sclip", short_side=64, window=64, stride=32)
    slide = build_generator("tiny_vit", None, ["background", "cat", "dog"], class_lines=LINES, mode="slide",
                            short_side=64, window=64, stride=32, templates="clip", normalize="model",
                            pos_interp="offset", dense="sclip", cache_dir=str(text_cache))
    image = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(13))
    a, b = gen(image), slide(image)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)


def test_the_vfm_sees_the_uncut_crop_unnormalised(text_cache):
    gen = harness_generator(text_cache, "proxyclip", short_side=40, window=40, stride=20, pad_to=56)
    seen = []
    hook = gen.backbone.vfm.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        gen(torch.full((1, 3, 40, 40), 0.3))
    finally:
        hook.remove()
    (rgb,) = seen
    assert rgb.shape == (1, 3, 56, 56)  # padded to 56 (a multiple of DINO's 8); CLIP drops 56 mod 16
    torch.testing.assert_close(rgb[..., 8:48, 8:48], torch.full((1, 3, 40, 40), 0.3), atol=1e-6, rtol=0)
    torch.testing.assert_close(rgb[..., :8, :], gen.mean.expand(1, 3, 8, 56), atol=1e-6, rtol=0)  # zero = the mean


def test_harness_settings_are_checked(text_cache):
    with pytest.raises(ValueError, match="background"):
        harness_generator(text_cache, background={"mode": "threshold", "thresh": 0.5})
    with pytest.raises(ValueError, match="pad_to"):
        harness_generator(text_cache, pad_to=0)
    with pytest.raises(ValueError, match="prob_thd"):
        harness_generator(text_cache, prob_thd=1.5)
    with pytest.raises(ValueError, match="stride"):
        harness_generator(text_cache, window=32, stride=64)
    with pytest.raises(ValueError, match="harness"):
        build_generator("tiny_vit", None, ["a", "b"], prob_thd=0.1, cache_dir=str(text_cache))
    with pytest.raises(ValueError, match="3 class lines for 2 classes"):
        build_generator("tiny_vit", None, ["a", "b"], class_lines=LINES, mode="harness", short_side=48,
                        cache_dir=str(text_cache))
    assert isinstance(harness_generator(text_cache), HarnessGenerator)


# ---------------------------------------------------------------- PAMR on logits as a chain step


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_pamr_logits_step_on_probabilities_equals_pamr_on_the_logits(dtype, tol):
    """softmax(PAMR(log p)) = softmax(s PAMR(z)) for p = softmax(s z): PAMR mixes every channel alike."""
    g = torch.Generator().manual_seed(14)
    z = (torch.randn(1, 5, 30, 34, generator=g, dtype=torch.float64) * 0.15).to(dtype)
    image = torch.randn(1, 3, 30, 34, generator=g, dtype=torch.float64).to(dtype)
    step = PAMRLogits(dilations=(1, 2), iters=3)
    got = step(torch.softmax(65.0 * z, 1), Guidance(image=image))
    want = torch.softmax(65.0 * pamr_logits(z, image, dilations=(1, 2), iters=3), 1)
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    # from a coarse grid: the logits upsampled to the guidance image first (bilinear commutes too)
    coarse = z[..., ::5, ::5]
    got = step(torch.softmax(65.0 * coarse, 1), Guidance(image=image))
    up = F.interpolate(coarse, size=(30, 34), mode="bilinear", align_corners=False)
    want = torch.softmax(65.0 * pamr_logits(up, image, dilations=(1, 2), iters=3), 1)
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_pamr_logits_step_is_a_chain_step():
    from maskclip_apro.refiners import Chain, build_refiner

    step = build_refiner("pamr_logits", {"pamr": {"dilations": [1], "iters": 2}})
    assert isinstance(step, PAMRLogits) and step.dilations == (1,) and step.iters == 2
    chain = Chain.from_steps(["pamr_logits"], {})
    out = chain(torch.softmax(torch.randn(1, 3, 4, 5), 1), Guidance(image=torch.rand(1, 3, 16, 20)))
    assert out.shape == (1, 3, 16, 20) and torch.allclose(out.sum(1), torch.ones(1, 16, 20))
    with pytest.raises(ValueError, match="guidance.image"):
        step(torch.rand(2, 3, 4, 4), Guidance(image=torch.rand(1, 3, 4, 4)))


# ---------------------------------------------------------------- the Segmenter under the harness


def test_segmenter_labels_are_the_harness_postprocess_with_and_without_pamr(text_cache):
    from maskclip_apro import Segmenter
    from maskclip_apro.refiners import Chain

    seg = Segmenter(harness_generator(text_cache, "sclip", prob_thd=0.4, area_thd=0.1))
    image = (torch.rand(45, 61, 3, generator=torch.Generator().manual_seed(15)) * 255).to(torch.uint8).numpy()
    chains = {"plain": Chain([]), "+PAMR": Chain.from_steps(["pamr_logits"], {})}
    preds = seg.predict_many(image, chains)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    out = seg.generate(x)
    owner = seg.generator.owner
    probs, labels = harness_labels(out.pixel_cos, owner, 3, logit_scale=40.0, prob_thd=0.4, area_thd=0.1)
    assert np.array_equal(preds["plain"].labels, labels[0].numpy())
    assert torch.equal(preds["plain"].probs, probs[0])
    # their PAMR: on the logits at the image size, guided by the normalised network input resized to it
    normed = (out.image - seg.generator.mean) / seg.generator.std
    probs, labels = harness_labels(pamr_logits(out.pixel_cos, normed), owner, 3, 40.0, 0.4, 0.1)
    torch.testing.assert_close(preds["+PAMR"].probs, probs[0], atol=1e-5, rtol=0)
    top2 = probs[0].topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-4) & ((probs[0].amax(0) - 0.4).abs() > 1e-4)
    assert np.array_equal(preds["+PAMR"].labels[clear.numpy()], labels[0][clear].numpy())
    assert set(preds["plain"].times) == {"generator", "postprocess"}
    assert set(preds["+PAMR"].times) == {"generator", "pamr_logits", "postprocess"}


def test_apro_under_the_harness_works_at_its_scale_of_the_patch_grid(text_cache):
    from maskclip_apro import Segmenter
    from maskclip_apro.refiners import Chain
    from maskclip_apro.refiners.apro import work_size

    seg = Segmenter(harness_generator(text_cache, "naclip"))
    image = (torch.rand(90, 120, 3, generator=torch.Generator().manual_seed(16)) * 255).to(torch.uint8).numpy()
    out = seg.generate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    probs, guidance = seg.harness_probabilities(out, {})
    assert guidance.grid == (3, 4) and probs.shape == (1, 5, 90, 120)  # 48 x 64 resized, 16-px cells
    apro = Chain.from_steps(["apro"], {"apro": {"lp_scale": 4.0, "gp_scale": 2.0, "iters": 2}})
    assert apro(probs, guidance).shape[-2:] == work_size((90, 120), (3, 4), 4.0) == (12, 16)
    pred = seg.predict_many(image, {"+APro": apro})["+APro"]
    assert pred.labels.shape == (90, 120) and pred.probs.shape == (3, 90, 120)
    with pytest.raises(ValueError, match="key smoothing"):
        seg.predict_many(image, {"+KS": Chain.from_steps(["ks"], {})})
