"""The APro refiner combinations and refiner chains, against the public APro calls."""

import pytest
import torch
import torch.nn.functional as F

from maskclip_apro.apro import build_tree, global_propagation, local_propagation, propagate, reweight
from maskclip_apro.refiners import Chain, Guidance, build_refiner
from maskclip_apro.refiners.apro import APro, guide_size, work_size


def normalized(image):
    """(x - mean) / std with ImageNet's statistics written out: the oracle of Guidance.normalized_image()."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return torch.stack([(image[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)


def _case(seed=0, k=3, h=12, w=10):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(1, k, h, w, generator=g), dim=1)
    image = torch.rand(1, 3, h, w, generator=g)
    return probs, Guidance(image=image)


@pytest.mark.parametrize("mode", ["parallel", "gp", "lp", "lp_gp", "gp_lp"])
def test_apro_modes_compose_gp_and_lp(mode):
    probs, guidance = _case()
    image = normalized(guidance.image)  # APro reads the ImageNet-normalised image
    refiner = APro(mode=mode, zeta_g=0.2, zeta_s=0.15, kernel_size=3, iters=4, backend="torch", gp_scale=None, lp_scale=None)
    gp = lambda p: global_propagation(p, image, 0.2, backend="torch")  # noqa: E731
    lp = lambda p: local_propagation(p, image, zeta_s=0.15, kernel_size=3, iters=4, backend="torch")  # noqa: E731
    expected = {
        "parallel": lambda p: 0.5 * (gp(p) + lp(p)),
        "gp": gp,
        "lp": lp,
        "lp_gp": lambda p: gp(lp(p)),
        "gp_lp": lambda p: lp(gp(p)),
    }[mode](probs)
    torch.testing.assert_close(refiner(probs, guidance), expected, rtol=1e-5, atol=1e-6)


def test_apro_upsamples_to_the_guidance_resolution_and_keeps_rows_normalised():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(2, 4, 3, 4, generator=g), dim=1)
    guidance = Guidance(image=torch.rand(2, 3, 30, 40, generator=g))
    out = APro(iters=2, kernel_size=3, lp_scale=5)(probs, guidance)
    assert out.shape == (2, 4, 15, 20)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 15, 20), rtol=1e-5, atol=1e-5)


def test_guide_size_caps_the_long_side_only():
    assert guide_size(300, 400, 200) == (150, 200)
    assert guide_size(300, 400, None) == (300, 400)
    assert guide_size(30, 40, 200) == (30, 40)


def test_work_size_is_relative_to_the_unary_grid_and_capped_by_the_image():
    assert work_size((375, 500), (23, 31), 4) == (93, 124)  # long side 4 x 31
    assert work_size((375, 500), (23, 31), 1) == (23, 31)
    assert work_size((375, 500), (23, 31), 32) == (375, 500)
    assert work_size((375, 500), (23, 31), None) == (375, 500)


def test_guidance_derives_the_normalised_image_and_takes_a_given_one():
    image = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(2))
    guidance = Guidance(image=image)
    torch.testing.assert_close(guidance.normalized_image(), normalized(image))
    assert guidance.normalized_image() is guidance.normalized_image()  # computed once
    given = torch.zeros(2, 3, 5, 4)
    assert Guidance(image=image, normalized=given).normalized_image() is given
    with pytest.raises(ValueError, match="guidance.normalized"):
        Guidance(image=image, normalized=torch.zeros(2, 3, 4, 4)).normalized_image()
    with pytest.raises(ValueError, match="guidance.image"):
        Guidance(image=torch.rand(2, 1, 5, 4)).normalized_image()


def test_apro_reads_the_normalised_image():
    probs, guidance = _case(seed=5)
    other = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(6))
    refiner = APro(mode="parallel", zeta_g=0.3, zeta_s=0.5, kernel_size=3, iters=3, backend="torch", gp_scale=None, lp_scale=None)
    got = refiner(probs, Guidance(image=guidance.image, normalized=other))
    expected = 0.5 * (global_propagation(probs, other, 0.3, backend="torch")
                      + local_propagation(probs, other, zeta_s=0.5, kernel_size=3, iters=3, backend="torch"))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gp_runs_at_its_own_resolution_and_is_upsampled_to_the_output():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(3 * torch.randn(1, 3, 4, 5, generator=g), dim=1)
    image = torch.rand(1, 3, 40, 50, generator=g)
    refiner = APro(mode="gp_lp", zeta_g=0.3, zeta_s=0.5, kernel_size=3, iters=2, backend="torch",
                   lp_scale=5, gp_scale=2)
    norm = normalized(image)
    small = F.interpolate(norm, size=(8, 10), mode="bilinear", align_corners=False, antialias=True)
    out_guide = F.interpolate(norm, size=(20, 25), mode="bilinear", align_corners=False, antialias=True)
    gp = global_propagation(F.interpolate(probs, size=(8, 10), mode="bilinear", align_corners=False), small, 0.3,
                            backend="torch")
    gp = F.interpolate(gp, size=(20, 25), mode="bilinear", align_corners=False)
    expected = local_propagation(gp, out_guide, zeta_s=0.5, kernel_size=3, iters=2, backend="torch")
    torch.testing.assert_close(refiner(probs, Guidance(image=image)), expected, rtol=1e-5, atol=1e-6)


def test_second_pass_on_features_needs_features():
    probs, guidance = _case()
    with pytest.raises(ValueError, match="features"):
        APro(mode="gp", second_pass="features", backend="torch")(probs, guidance)


def test_second_pass_on_features_reweights_the_same_tree():
    probs, guidance = _case(seed=3)
    feats = torch.randn(1, 8, 6, 5, generator=torch.Generator().manual_seed(4))
    refiner = APro(mode="gp", second_pass="features", zeta_g=0.2, zeta_h=0.7, backend="torch", gp_scale=None, lp_scale=None)
    out = refiner(probs, Guidance(image=guidance.image, features=feats))
    high = F.normalize(F.interpolate(feats, size=(12, 10), mode="bilinear", align_corners=False), dim=1)
    tree = build_tree(normalized(guidance.image), backend="torch")
    pass1 = propagate(tree, probs, 0.2, backend="torch")
    expected = propagate(reweight(tree, high, backend="torch"), pass1, 0.7, backend="torch")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 12, 10), rtol=1e-5, atol=1e-5)


def test_chain_applies_steps_in_order_and_times_them():
    probs, guidance = _case()
    params = {"apro": {"kernel_size": 3, "iters": 2, "backend": "torch", "gp_scale": None, "lp_scale": None}}
    chain = Chain.from_steps(["lp", "gp"], params)
    expected = build_refiner("gp", params)(build_refiner("lp", params)(probs, guidance), guidance)
    torch.testing.assert_close(chain(probs, guidance), expected)
    assert set(chain.last_times) == {"lp", "gp"}
    assert Chain([])(probs, guidance) is probs


def test_the_apro_step_runs_the_configured_combination():
    params = {"apro": {"mode": "gp_lp", "zeta_g": 0.2}}
    assert build_refiner("apro", params).mode == "gp_lp" and build_refiner("apro", params).name == "apro"
    assert build_refiner("gp", params).mode == "gp" and build_refiner("lp_gp", params).mode == "lp_gp"
    assert build_refiner("gp_lp_parallel", params).mode == "parallel"
    assert build_refiner("apro", {}).mode == "parallel"  # the class defaults are refine=apro's
    assert params["apro"]["mode"] == "gp_lp"  # the caller's mapping is left alone


def test_unknown_step_and_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown refiner step 'crf'"):
        build_refiner("crf")
    with pytest.raises(ValueError, match="mode"):
        APro(mode="both")
    with pytest.raises(ValueError, match="second_pass"):
        APro(second_pass="clip")
    with pytest.raises(ValueError, match="zeta_g"):
        APro(zeta_g=0)
    with pytest.raises(ValueError, match="gp_scale"):
        APro(gp_scale=0)
    with pytest.raises(ValueError, match="lp_scale"):
        APro(lp_scale="big")


def test_refine_params_are_one_source_and_not_a_preset():
    from hydra.errors import MissingConfigException

    from maskclip_apro.config import compose, refine_params

    cfg = compose("refine", ["refine=apro"])
    assert set(cfg.refine) == {"steps", "ks", "pd", "apro", "pamr", "lposs"}
    assert compose("refine", ["refine=ks_pd"]).refine.steps == ["pd", "ks"]
    assert compose("refine", ["refine=apro_pd"]).refine.steps == ["pd", "apro"]
    official = refine_params(compose("refine", ["refine=apro_official"]))
    assert official["steps"] == ["apro"] and official["apro"]["second_pass"] == "output"
    assert build_refiner("apro", official).zeta_g == 0.01
    with pytest.raises(MissingConfigException):
        compose("refine", ["refine=_params"])


def test_refiner_classes_are_exported_by_name():
    import maskclip_apro.refiners as refiners

    assert {refiners.KeySmoothing.name, refiners.PromptDenoising.name, refiners.PAMR.name} == {"ks", "pd", "pamr"}
    assert refiners.APro(mode="gp").name == "gp"
    with pytest.raises(AttributeError):
        refiners.CRF  # noqa: B018


def test_the_registry_builds_every_step_from_plain_keyword_arguments():
    """Each step: its class, its family's parameters, the arguments it fixes (refiners/registry.py)."""
    import inspect

    from maskclip_apro import refiners
    from maskclip_apro.refiners.registry import FAMILIES, STEP_TABLE, family_parameters

    params = {"ks": {"thresh": 0.9}, "pd": {"thresh": 0.4, "keep": [0]}, "pamr": {"dilations": [1, 2], "iters": 3},
              "apro": {"mode": "lp", "zeta_g": 0.3, "iters": 2}, "steps": ["ignored"]}
    expected = {"ks": ("KeySmoothing", "ks"), "pd": ("PromptDenoising", "pd"), "pamr": ("PAMR", "pamr"),
                "pamr_logits": ("PAMRLogits", "pamr_logits"), "apro": ("APro", "apro"), "gp": ("APro", "gp"),
                "lp": ("APro", "lp"), "lp_gp": ("APro", "lp>gp"), "gp_lp": ("APro", "gp>lp"),
                "gp_lp_parallel": ("APro", "apro"), "lposs": ("LPOSS", "lposs"),
                "lposs_plus": ("LPOSS", "lposs_plus"), "lposs_pixel": ("LPOSS", "lposs_pixel")}
    assert set(STEP_TABLE) == set(expected) == set(refiners.STEPS)
    for step, (cls, name) in expected.items():
        refiner = build_refiner(step, params)
        assert type(refiner) is getattr(refiners, cls) and refiner.name == name, step
    assert build_refiner("ks", params).thresh == 0.9 and build_refiner("pd", params).keep == (0,)
    assert build_refiner("pamr_logits", params).dilations == (1, 2) == build_refiner("pamr", params).dilations
    assert build_refiner("apro", params).mode == "lp" and build_refiner("gp", params).zeta_g == 0.3
    for family, cls in FAMILIES.items():
        assert family_parameters(family) == tuple(inspect.signature(getattr(refiners, cls)).parameters)


def test_the_registry_names_an_unknown_parameter():
    with pytest.raises(ValueError, match="refine.apro.zeta is not a parameter of the apro refiner; it takes mode, zeta_g"):
        build_refiner("gp", {"apro": {"zeta": 0.1}})
    with pytest.raises(ValueError, match="refine.pamr.dilation is not a parameter"):
        Chain.from_steps(["pd", "pamr_logits"], {"pamr": {"dilation": 3}})
