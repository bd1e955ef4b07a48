"""Text classifier: templates, prompt averaging, synonyms, background rules, trimming, disk cache."""

from __future__ import annotations

import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from maskclip_apro.generator import CLIP_TEMPLATES, MASKCLIP_TEMPLATES, build_generator
from maskclip_apro.generator import text as text_mod
from maskclip_apro.generator.models import load_clip
from maskclip_apro.generator.templates import resolve_templates
from maskclip_apro.generator.text import build_text_classifier, encode_tokens, name_embeddings

TEMPLATES = ("a photo of a {}.", "there is the small {} in the scene.", "{}")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("tiny_vit", None)


def classifier(clip, names, tmp_path, background=None, templates=TEMPLATES):
    model, identity = clip
    return build_text_classifier(model, "tiny_vit", identity, names, templates, background, tmp_path)


def unit_features(d=32, b=2, h=3, w=4, seed=1, scale=1.0):
    torch.manual_seed(seed)
    return F.normalize(torch.randn(b, d, h, w) * scale, dim=1)


def test_template_sets():
    assert len(MASKCLIP_TEMPLATES) == 85 and len(CLIP_TEMPLATES) == 80
    assert list(CLIP_TEMPLATES) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert MASKCLIP_TEMPLATES[:80] == CLIP_TEMPLATES and len(set(MASKCLIP_TEMPLATES)) == 85
    assert resolve_templates("clip") == CLIP_TEMPLATES
    with pytest.raises(ValueError, match="templates"):
        resolve_templates("imagenet")
    with pytest.raises(ValueError, match="template"):
        resolve_templates(["a photo"])


def test_trimmed_context_equals_full(clip):
    model, _ = clip
    tokens = open_clip.get_tokenizer("tiny_vit")(["a cat.", "a photo of the hard to see potted plant.", "x"])
    full = model.encode_text(tokens)
    trimmed = encode_tokens(model, tokens)
    torch.testing.assert_close(trimmed, full, atol=1e-6, rtol=1e-5)


def test_prompt_averaging_by_hand(clip, tmp_path):
    model, _ = clip
    tok = open_clip.get_tokenizer("tiny_vit")
    cls, display = classifier(clip, ["cat", "dog"], tmp_path)
    assert display == ["cat", "dog"]
    for row, name in enumerate(["cat", "dog"]):
        per_prompt = [F.normalize(model.encode_text(tok([t.format(name)]))[0], dim=0) for t in TEMPLATES]
        want = F.normalize(torch.stack(per_prompt).mean(0), dim=0)
        torch.testing.assert_close(cls.embeddings[row], want, atol=1e-6, rtol=1e-5)


def test_synonyms_take_the_max(clip, tmp_path):
    model, _ = clip
    cls, display = classifier(clip, ["cat, kitty , kitten", "dog"], tmp_path)
    assert display == ["cat", "dog"] and cls.num_classes == 2
    emb = name_embeddings(model, open_clip.get_tokenizer("tiny_vit"), ["cat", "kitty", "kitten", "dog"], TEMPLATES)
    f = unit_features()
    logits = cls(f, 100.0)
    per_name = 100.0 * torch.einsum("bdhw,md->bmhw", f, emb)
    torch.testing.assert_close(logits[:, 0], per_name[:, :3].amax(1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits[:, 1], per_name[:, 3], atol=1e-4, rtol=1e-5)


def test_background_prompts(clip, tmp_path):
    model, _ = clip
    bg = {"mode": "prompts", "names": ["sky", "wall"]}
    cls, display = classifier(clip, ["background", "cat"], tmp_path, background=bg)
    assert display == ["background", "cat"]
    emb = name_embeddings(model, open_clip.get_tokenizer("tiny_vit"), ["sky", "wall", "cat"], TEMPLATES)
    f = unit_features()
    per_name = 50.0 * torch.einsum("bdhw,md->bmhw", f, emb)
    logits = cls(f, 50.0)
    torch.testing.assert_close(logits[:, 0], per_name[:, :2].amax(1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits[:, 1], per_name[:, 2], atol=1e-4, rtol=1e-5)


def test_background_threshold_rule(clip, tmp_path):
    t = 0.45
    cls, _ = classifier(clip, ["background", "cat", "dog", "bird"], tmp_path, {"mode": "threshold", "thresh": t})
    f = unit_features(h=8, w=8)
    logits = cls(f, 10.0)
    probs = torch.softmax(logits, dim=1)
    fg = torch.softmax(logits[:, 1:], dim=1)
    torch.testing.assert_close(probs[:, 0], torch.full_like(probs[:, 0], t / (1 + t)))
    torch.testing.assert_close(probs[:, 1:], fg / (1 + t))
    labels = logits.argmax(1)
    b, _, h, w = logits.shape
    mixed = set()
    for i in range(b):
        for y in range(h):
            for x in range(w):
                pmax, kmax = fg[i, :, y, x].max(0)
                want = 0 if pmax < t else 1 + int(kmax)
                assert int(labels[i, y, x]) == want
                mixed.add(want == 0)
    assert mixed == {True, False}  # the case exercises both sides of the threshold


@pytest.mark.parametrize(
    "names,bg,match",
    [
        ([], None, "non-empty"),
        (["cat", "dog", "Cat"], None, "'Cat'"),
        (["cat,,kitty"], None, "empty name"),
        (["background", "cat"], {"mode": "guess"}, "background"),
        (["background", "cat"], {"mode": "threshold", "thresh": 1.5}, "thresh"),
        (["background", "cat"], {"mode": "prompts", "names": []}, "names"),
        (["background"], {"mode": "threshold", "thresh": 0.5}, "foreground"),
    ],
)
def test_bad_vocabulary(clip, tmp_path, names, bg, match):
    with pytest.raises(ValueError, match=match):
        classifier(clip, names, tmp_path, background=bg)


def test_build_generator_rejects_empty_vocabulary():
    with pytest.raises(ValueError, match="class_names"):
        build_generator("tiny_vit", None, [])


class Counter:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = text_mod.encode_prompts

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(text_mod, "encode_prompts", counted)

    def build(self, model="tiny_vit", names=("cat", "dog"), seed=0, pretrained=None, **kw):
        before = self.calls
        torch.manual_seed(seed)
        gen = build_generator(model, pretrained, list(names), short_side=64, window=64, stride=32, **kw)
        return gen, self.calls - before


def test_cache_hit_miss_invalidation(monkeypatch, tmp_path):
    counter = Counter(monkeypatch)
    kw = {"cache_dir": str(tmp_path)}
    first, calls = counter.build(**kw)
    assert calls > 0
    again, calls = counter.build(**kw)
    assert calls == 0
    assert torch.equal(first.classifier.embeddings, again.classifier.embeddings)
    assert counter.build(names=("cat", "horse"), **kw)[1] > 0
    assert counter.build(templates="clip", **kw)[1] > 0
    assert counter.build(model="tiny_resnet", **kw)[1] > 0
    assert counter.build(seed=1, **kw)[1] == 0  # random weights come from a fixed seed: same key
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_invalidated_by_checkpoint_change_and_corruption(monkeypatch, tmp_path):
    counter = Counter(monkeypatch)
    torch.manual_seed(3)
    ckpt = tmp_path / "w.pt"
    torch.save(open_clip.create_model("tiny_vit").state_dict(), ckpt)
    kw = {"cache_dir": str(tmp_path / "cache"), "pretrained": str(ckpt)}
    assert counter.build(**kw)[1] > 0
    assert counter.build(**kw)[1] == 0
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    gen, calls = counter.build(**kw)
    assert calls > 0
    for cached in (tmp_path / "cache").glob("*.safetensors"):
        cached.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="cannot be read"):
        regen, calls = counter.build(**kw)
    assert calls > 0 and torch.equal(regen.classifier.embeddings, gen.classifier.embeddings)


@pytest.mark.parametrize(
    "bad, reason",
    [(lambda e: torch.randn(e.shape[0], e.shape[1] + 8), "40 wide, the model.s 32"),
     (lambda e: e.clone().index_fill_(1, torch.tensor([3]), float("nan")), "NaN")],
)
def test_a_cache_file_of_the_wrong_width_or_with_nan_is_rebuilt(monkeypatch, tmp_path, bad, reason):
    """The warning blames the cache file; the rebuilt embeddings and the file are right again."""
    from maskclip_apro.generator.cache import load_cached, save_cached

    counter = Counter(monkeypatch)
    kw = {"cache_dir": str(tmp_path)}
    good, _ = counter.build(**kw)
    (cached,) = tmp_path.glob("*.safetensors")
    save_cached(cached, bad(good.classifier.embeddings), ["cat", "dog"])
    with pytest.warns(UserWarning, match=rf"cache file '{cached}' is not usable .*({reason})"):
        again, calls = counter.build(**kw)
    assert calls > 0 and torch.equal(again.classifier.embeddings, good.classifier.embeddings)
    assert torch.equal(load_cached(cached, ["cat", "dog"], 32), good.classifier.embeddings)
    out = again(torch.rand(1, 3, 64, 64))
    assert bool(torch.isfinite(out.logits).all())


def test_non_finite_text_embeddings_blame_the_weights(tmp_path):
    torch.manual_seed(0)
    clip, identity = load_clip("tiny_vit", None)
    with torch.no_grad():
        clip.text_projection.fill_(float("nan"))
    with pytest.raises(ValueError, match="text tower of tiny_vit gives NaN.*model.pretrained"):
        build_text_classifier(clip, "tiny_vit", identity + ":nan", ["cat"], TEMPLATES, None, tmp_path)


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(0)
    build_generator("tiny_vit", None, ["cat"], short_side=64, window=64, stride=32)
    assert list((tmp_path / "maskclip_apro" / "text").glob("*.safetensors"))


def test_unwritable_cache_warns_and_still_builds(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="cache"):
        gen = build_generator("tiny_vit", None, ["cat"], short_side=64, window=64, stride=32, cache_dir=str(blocker))
    assert gen.num_classes == 1
