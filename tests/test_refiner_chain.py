"""The APro refiner combinations (design 3.4) and refiner chains, against the public APro calls."""

import pytest
import torch

from maskclip_apro.apro import global_propagation, local_propagation
from maskclip_apro.refiners import Chain, Guidance, build_refiner
from maskclip_apro.refiners.apro import APro, guide_size


def _case(seed=0, k=3, h=12, w=10):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(1, k, h, w, generator=g), dim=1)
    image = torch.rand(1, 3, h, w, generator=g)
    return probs, Guidance(image=image)


@pytest.mark.parametrize("mode", ["parallel", "gp", "lp", "lp_gp", "gp_lp"])
def test_apro_modes_compose_gp_and_lp(mode):
    probs, guidance = _case()
    image = guidance.image
    refiner = APro(mode=mode, zeta_g=0.2, zeta_s=0.15, kernel_size=3, iters=4, backend="torch", guide_long_side=None)
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
    out = APro(iters=2, kernel_size=3, guide_long_side=20)(probs, guidance)
    assert out.shape == (2, 4, 15, 20)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 15, 20), rtol=1e-5, atol=1e-5)


def test_guide_size_caps_the_long_side_only():
    assert guide_size(300, 400, 200) == (150, 200)
    assert guide_size(300, 400, None) == (300, 400)
    assert guide_size(30, 40, 200) == (30, 40)


def test_second_pass_on_features_needs_features():
    probs, guidance = _case()
    with pytest.raises(ValueError, match="features"):
        APro(mode="gp", second_pass="features", backend="torch")(probs, guidance)


def test_second_pass_reweights_the_same_tree():
    from maskclip_apro.apro import build_tree, propagate, reweight

    probs, guidance = _case(seed=3)
    feats = torch.randn(1, 8, 6, 5, generator=torch.Generator().manual_seed(4))
    refiner = APro(mode="gp", second_pass="features", zeta_g=0.2, zeta_h=0.7, backend="torch", guide_long_side=None)
    out = refiner(probs, Guidance(image=guidance.image, features=feats))
    high = torch.nn.functional.normalize(
        torch.nn.functional.interpolate(feats, size=(12, 10), mode="bilinear", align_corners=False), dim=1
    )
    pass1 = propagate(build_tree(guidance.image, backend="torch"), probs, 0.2, backend="torch")
    expected = propagate(reweight(build_tree(guidance.image, backend="torch"), high), pass1, 0.7, backend="torch")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 12, 10), rtol=1e-5, atol=1e-5)

    tree2 = reweight(build_tree(guidance.image, backend="torch"), pass1)
    torch.testing.assert_close(
        APro(mode="gp", second_pass="output", zeta_g=0.2, zeta_h=0.7, backend="torch", guide_long_side=None)(
            probs, guidance
        ),
        propagate(tree2, pass1, 0.7, backend="torch"),
    )


def test_chain_applies_steps_in_order_and_times_them():
    probs, guidance = _case()
    params = {"apro": {"kernel_size": 3, "iters": 2, "backend": "torch", "guide_long_side": None}}
    chain = Chain.from_steps(["lp", "gp"], params)
    expected = build_refiner("gp", params)(build_refiner("lp", params)(probs, guidance), guidance)
    torch.testing.assert_close(chain(probs, guidance), expected)
    assert set(chain.last_times) == {"lp", "gp"}
    assert Chain([])(probs, guidance) is probs


def test_unknown_step_and_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown refiner step 'crf'"):
        build_refiner("crf")
    with pytest.raises(ValueError, match="mode"):
        APro(mode="both")
    with pytest.raises(ValueError, match="second_pass"):
        APro(second_pass="clip")
