"""Key smoothing and prompt denoising against a hand-written recomputation of MaskCLIP's official head.

The oracle follows `refine_output` of chongzhou96/MaskCLIP (mmseg/models/decode_heads/maskclip_head.py)
on cosine scores: PD sets the scores of classes whose image-wide max of softmax(100 cos) is below
pd_thresh to -100; KS takes P = softmax(100 cos), keys normalised along the positions, W = k k^T,
and replaces P by W P at positions whose float32 max probability is below ks_thresh. Our chain gets
what the Segmenter gives it, softmax(100 cos), and must give the same argmax on the patch grid.
"""

from __future__ import annotations

import pytest
import torch

from maskclip_apro.config import compose
from maskclip_apro.refiners import Chain
from maskclip_apro.refiners.base import Guidance
from maskclip_apro.refiners.ks import KeySmoothing
from maskclip_apro.refiners.pd import PromptDenoising

B, K, H, W, C = 2, 5, 6, 7, 8


def official_argmax(cos, keys, pd_thresh=0.0, ks_thresh=0.0, norm="position"):
    """Argmax (B, H*W) of the official head's refined scores; cos (B, K, H, W) float32, keys (B, C, H, W).

    Softmaxes and the KS selection in float32 as the official code runs; W P in float64.
    """
    b, k = cos.shape[:2]
    out = cos.float().clone()
    if pd_thresh > 0:
        peak = torch.softmax(out * 100, dim=1).reshape(b, k, -1).amax(dim=2)
        for i in range(b):
            for j in range(k):
                if peak[i, j] < pd_thresh:
                    out[i, j] = -100.0
    out = out.reshape(b, k, -1).transpose(1, 2)  # (B, N, K)
    if ks_thresh > 0:
        p = torch.softmax(out * 100, dim=2)
        kk = keys.reshape(b, keys.shape[1], -1).transpose(1, 2).double()  # (B, N, C), the official layout
        unit = kk / kk.norm(dim=1 if norm == "position" else 2, keepdim=True)
        weight = unit @ unit.transpose(1, 2)
        # class by class, so that equal columns of P give equal columns of W P (ties stay ties)
        smoothed = torch.stack([weight @ p[:, :, j].double().unsqueeze(2) for j in range(k)], dim=2)[..., 0]
        selected = p.amax(dim=2, keepdim=True) < ks_thresh
        out = torch.where(selected, smoothed, p.double())
    return out.argmax(dim=2)


def chain_argmax(preset, cos, keys, dtype=torch.float32, **extra):
    cfg = compose("refine", [f"refine={preset}", *(f"refine.{k}={v}" for k, v in extra.items())])
    probs = torch.softmax(100 * cos.to(dtype), dim=1)  # what Segmenter.probabilities hands the chain
    out = Chain.from_steps(cfg.refine.steps, cfg.refine)(probs, Guidance(image=torch.rand(B, 3, 4 * H, 4 * W), keys=keys))
    assert out.shape == probs.shape
    torch.testing.assert_close(out.sum(1), torch.ones_like(out.sum(1)))
    assert bool((out >= 0).all())
    return out.reshape(B, K, -1).argmax(dim=1)


def random_case(seed, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    cos = 0.2 + spread * torch.randn(B, K, H, W, generator=g)
    keys = torch.randn(B, C, H, W, generator=g) + 0.3  # keys of both signs: W has negative entries
    return cos, keys


OFFICIAL = {"none": {}, "ks": {"ks_thresh": 1.0}, "pd": {"pd_thresh": 0.5}, "ks_pd": {"pd_thresh": 0.5, "ks_thresh": 1.0}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("preset", list(OFFICIAL))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_presets_give_the_official_argmax(preset, seed, dtype):
    cos, keys = random_case(seed)
    cos[0, 3, :2, :3] += 0.1  # class 3 confident in image 0 only: PD keeps it there, drops it in image 1
    expected = official_argmax(cos, keys, **OFFICIAL[preset])
    assert torch.equal(chain_argmax(preset, cos, keys, dtype), expected)


def test_every_class_below_the_threshold_falls_to_class_0():
    cos, keys = random_case(3, spread=0.001)  # softmax(100 cos) near uniform: every peak < 0.5
    assert bool((torch.softmax(100 * cos, 1).amax(1) < 0.5).all())
    for preset in ("pd", "ks_pd"):
        expected = official_argmax(cos, keys, **OFFICIAL[preset])
        assert bool((expected == 0).all())
        assert torch.equal(chain_argmax(preset, cos, keys), expected)


def test_saturated_positions_are_left_alone():
    cos, keys = random_case(4)
    cos[:, 2, 1, 1] += 0.5  # a 50-logit lead: softmax(100 cos) is exactly 1.0 in float32 there
    assert bool((torch.softmax(100 * cos, 1)[:, 2, 1, 1] == 1.0).all())
    keys[:, :, 1, 1] = keys[:, :, 0, 0]  # and its key matches a neighbour's, so W P would be that neighbour's
    expected = official_argmax(cos, keys, ks_thresh=1.0)
    assert bool((expected[:, 1 * W + 1] == 2).all())
    smoothed_everywhere = official_argmax(cos, keys, ks_thresh=2.0)
    assert not bool((smoothed_everywhere[:, 1 * W + 1] == 2).all())  # the test would see a wrong selection
    for dtype in (torch.float32, torch.float64):  # float64 P just below 1.0 is still "saturated" (float32 rule)
        assert torch.equal(chain_argmax("ks", cos, keys, dtype), expected)


def test_a_position_whose_smoothed_row_is_all_negative():
    """Keys of position 0 opposite to every other: W_0j < 0 for j != 0, so (W P)_0 < 0 in every class."""
    g = torch.Generator().manual_seed(5)
    v = torch.rand(C, generator=g) + 0.5
    keys = v.view(1, C, 1, 1).expand(B, C, H, W).clone()
    keys[:, :, 0, 0] = -v
    cos = 0.2 + 0.05 * torch.randn(B, K, H, W, generator=g)
    p = torch.softmax(100 * cos, 1).reshape(B, K, -1)
    unit = torch.nn.functional.normalize(keys.reshape(B, C, -1).double(), dim=2)
    row0 = (p.double() @ (unit.transpose(1, 2) @ unit))[:, :, 0]
    assert bool((row0 < 0).all())
    expected = official_argmax(cos, keys, ks_thresh=1.0)
    assert torch.equal(expected[:, 0], row0.argmax(1))
    assert not torch.equal(expected[:, 0], p[:, :, 0].argmax(1))  # clipping at 0 would have kept P_0's argmax
    assert torch.equal(chain_argmax("ks", cos, keys), expected)


def test_channel_normalised_keys_option():
    cos, keys = random_case(6)
    expected = official_argmax(cos, keys, ks_thresh=1.0, norm="channel")
    assert not torch.equal(expected, official_argmax(cos, keys, ks_thresh=1.0))  # the axis matters
    assert torch.equal(chain_argmax("ks", cos, keys, **{"ks.norm": "channel"}), expected)


def test_key_smoothing_output_is_a_positive_affine_map_of_w_p():
    cos, keys = random_case(7)
    probs = torch.softmax(100 * cos.double(), 1)
    out = KeySmoothing(thresh=2.0)(probs, Guidance(image=torch.rand(B, 3, H, W), keys=keys.double()))
    unit = torch.nn.functional.normalize(keys.reshape(B, C, -1).double(), dim=2)
    s = probs.reshape(B, K, -1) @ (unit.transpose(1, 2) @ unit)
    q = out.reshape(B, K, -1)
    # per position, q = a s + c with a > 0: differences between classes scale by one positive factor
    ratio = (q[:, 1:] - q[:, :1]) / (s[:, 1:] - s[:, :1])
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert bool((ratio > 0).all())
    assert bool((q.amin(1) >= 0).all()) and bool(((q.amin(1) == 0) | (s.amin(1) >= 0)).all())


def test_key_smoothing_needs_matching_keys_and_valid_options():
    probs = torch.softmax(torch.randn(B, K, H, W), 1)
    with pytest.raises(ValueError, match="keys"):
        KeySmoothing()(probs, Guidance(image=torch.rand(B, 3, H, W)))
    with pytest.raises(ValueError, match="keys"):
        KeySmoothing()(probs, Guidance(image=torch.rand(B, 3, H, W), keys=torch.rand(B, C, H + 1, W)))
    with pytest.raises(ValueError, match="thresh"):
        KeySmoothing(thresh=0)
    with pytest.raises(ValueError, match="norm"):
        KeySmoothing(norm="key")


def test_prompt_denoising_is_the_minus_100_rule_on_probabilities():
    cos, _ = random_case(8)
    cos[:, 1] += 0.1
    probs = torch.softmax(100 * cos.double(), 1)
    out = PromptDenoising(0.5)(probs, Guidance(image=torch.rand(B, 3, H, W)))
    dropped = probs.flatten(2).amax(2) < 0.5
    assert bool(dropped.any()) and not bool(dropped.all(1).any())
    masked = cos.double().masked_fill(dropped[:, :, None, None], -100.0)
    torch.testing.assert_close(out, torch.softmax(100 * masked, 1), atol=1e-12, rtol=1e-10)


def test_prompt_denoising_all_dropped_is_uniform_and_keep_list():
    probs = torch.full((1, 4, 2, 2), 0.25, dtype=torch.float64)
    probs[0, :, 0, 0] = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    g = Guidance(image=torch.rand(1, 3, 2, 2))
    out = PromptDenoising(0.5)(probs, g)  # every peak below 0.5: every class at -100, a uniform softmax
    torch.testing.assert_close(out, torch.full_like(probs, 0.25))
    out = PromptDenoising(0.5, keep=[2])(probs, g)  # the kept class alone survives
    assert torch.equal(out[0, 2], torch.ones(2, 2, dtype=torch.float64)) and float(out.sum()) == 4.0
    with pytest.raises(ValueError, match="keep"):
        PromptDenoising(0.5, keep=[7])(probs, g)
    with pytest.raises(ValueError, match="thresh"):
        PromptDenoising(1.5)


def test_prompt_denoising_no_kept_mass_becomes_uniform_over_kept():
    third = 1.0 / 3.0
    probs = torch.tensor([[[[0.0, 1.0]], [[third, 0.0]], [[third, 0.0]], [[third, 0.0]]]])
    g = Guidance(image=torch.rand(1, 3, 1, 2))
    out = PromptDenoising(0.5)(probs, g)  # only class 0 survives; position 0 had none of its mass
    assert out[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    out = PromptDenoising(0.5, keep=[0, 2, 3])(probs, g)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 0.0, 0.5, 0.5]))


def official_maskclip_labels(cos, k, seen, size, pd_thresh=0.0, ks_thresh=0.0):
    """Pixel labels of MaskCLIP's official test path for the head's cosines cos (N, C, H, W) and keys
    k (N, HW, Ck), the network having seen the image at size `seen`, its original size `size`:
    refine_output, encode_decode's and whole_inference's bilinear resizes, inference's softmax,
    simple_test's argmax. Transcribed
    from chongzhou96/MaskCLIP 245d31f809be9c1938f8f30561b6bf9ed033d746,
    mmseg/models/decode_heads/maskclip_head.py (refine_output) and
    mmseg/models/segmentors/encoder_decoder.py (encode_decode, whole_inference, inference, simple_test)."""
    import torch.nn.functional as F

    from official_maskclip import refine_output

    output = refine_output(cos.clone(), k, pd_thresh, ks_thresh)
    out = F.interpolate(output, size=seen, mode="bilinear", align_corners=False)  # encode_decode: img.shape
    seg_logit = F.interpolate(out, size=size, mode="bilinear", align_corners=False)  # whole_inference: ori_shape
    return F.softmax(seg_logit, dim=1).argmax(dim=1)


@pytest.mark.parametrize("model,seen", [("tiny_vit", (64, 96)), ("tiny_vit", (48, 72)), ("tiny_resnet", (80, 120))])
def test_segmenter_pixel_labels_equal_the_official_pipeline(model, seen, tmp_path):
    """none / pd / ks / ks_pd on the tiny models' cosines and keys: the chains' argmax on the patch
    grid, and the Segmenter's labels at every pixel, are the official ones (what is upsampled is
    the official head's output, resized to the image the network saw, then to the image's size)."""
    from maskclip_apro.segmenter import Segmenter

    g = torch.Generator().manual_seed(11)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(64, 96), mode="bilinear")
    array = (image[0].permute(1, 2, 0) * 255).round().byte().numpy()
    seg = Segmenter.from_pretrained(model=model, vocab=["cat", "dog", "grass", "sky", "tree"], refine="none",
                                    overrides=["protocol=maskclip", f"generator.cache_dir={tmp_path}",
                                               "generator.templates=['a photo of a {}.']", "model.short_side=null",
                                               f"generator.img_scale=[300,{seen[0]}]"])
    with torch.no_grad():  # random offsets, so that the tiny towers' classes vary over the image
        for p in seg.generator.backbone.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    out = seg.generate(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)
    assert tuple(out.image.shape[-2:]) == seen  # (64, 96): the network sees the image at its size, one resize
    probs, guidance = Segmenter.probabilities(out, out.image)
    assert out.keys is not None and out.keys.shape[-2:] == probs.shape[-2:]
    cos = (out.logits.double() / seg.generator.logit_scale).float()
    keys = out.keys.flatten(2).transpose(1, 2)
    official = {"none": {}, "pd": {"pd_thresh": 0.3}, "ks": {"ks_thresh": 1.0}, "ks_pd": {"pd_thresh": 0.3, "ks_thresh": 1.0}}
    chains = {}
    for preset in official:
        cfg = compose("refine", [f"refine={preset}", "refine.pd.thresh=0.3"])
        chains[preset] = Chain.from_steps(cfg.refine.steps, cfg.refine)
        grid = official_argmax(cos, out.keys, **{"ks_thresh": 0.0, **official[preset]})
        assert torch.equal(chains[preset](probs, guidance).flatten(2).argmax(1), grid)
    got = seg.predict_many(array, chains)
    labels = set()
    for preset, kw in official.items():
        expected = official_maskclip_labels(cos, keys, seen, (64, 96), **kw)[0].numpy()
        assert (got[preset].labels == expected).all(), (preset, float((got[preset].labels != expected).mean()))
        labels |= set(expected.flatten().tolist())
    assert len(labels) > 1


@pytest.mark.parametrize("tile", [8, 128])
def test_labels_via_the_network_input_equal_mmseg_two_resizes(tile):
    """segmenter.labels_via (one composed operator, tiles with class pruning) against
    encode_decode's resize to the network input then whole_inference's to the original size."""
    import torch.nn.functional as F

    from maskclip_apro.segmenter import labels_via

    g = torch.Generator().manual_seed(3)
    regions = F.interpolate(torch.randint(0, 9, (1, 1, 3, 4), generator=g).float(), size=(9, 12)).long()[:, 0]
    scores = 4 * F.one_hot(regions, 9).permute(0, 3, 1, 2).float() + torch.randn(1, 9, 9, 12, generator=g)
    scores = torch.cat([scores, torch.randn(1, 9, 9, 12, generator=g)])  # and one image of noise
    for via, size in (((144, 192), (75, 101)), ((40, 50), (97, 130)), ((9, 12), (30, 40))):
        out = F.interpolate(scores, size=via, mode="bilinear", align_corners=False)
        expected = F.interpolate(out, size=size, mode="bilinear", align_corners=False).argmax(dim=1)
        assert torch.equal(labels_via(scores, via, size, tile=tile), expected)
