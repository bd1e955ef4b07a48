"""maskclip_apro.checks: one clear ValueError per bad argument, naming it; accepted values come back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskclip_apro.checks import check_int, check_map, check_pair, check_positive, check_range


def test_accepted_values_come_back():
    x = torch.rand(1, 2, 3, 4)
    assert check_map("x", x) is x and check_map("v", torch.rand(5), ndim=1).shape == (5,)
    assert check_positive("zeta", 1) == 1.0 and check_positive("zeta", np.float32(0.5)) == 0.5
    assert check_positive("scale", None, optional=True) is None
    assert check_range("thresh", 0, 0, 1) == 0.0 and check_int("iters", np.int64(3), 0) == 3
    check_pair("a", x, "b", torch.rand(1, 7, 3, 4))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: check_map("probs", np.zeros((1, 1, 1, 1))), "probs must be a torch.Tensor"),
        (lambda: check_map("probs", torch.rand(2, 3)), r"probs must have 4 dimensions \(B, C, H, W\)"),
        (lambda: check_map("probs", torch.rand(1, 0, 2, 2)), "probs is empty"),
        (lambda: check_map("probs", torch.ones(1, 1, 2, 2, dtype=torch.int64)), "floating-point"),
        (lambda: check_map("probs", torch.tensor([[[[float("nan")]]]])), "NaN or inf"),
        (lambda: check_pair("a", torch.rand(1, 1, 2, 2), "b", torch.rand(2, 1, 2, 2)), "a .* and b .* must share"),
        (lambda: check_positive("zeta", 0), "zeta must be a positive finite number, got 0"),
        (lambda: check_positive("zeta", float("inf")), "zeta"),
        (lambda: check_positive("zeta", "0.5"), "zeta"),
        (lambda: check_positive("zeta", True), "zeta"),
        (lambda: check_positive("zeta", None), "zeta"),
        (lambda: check_positive("scale", -1, optional=True), "scale must be a positive finite number or null"),
        (lambda: check_range("thresh", 1.5, 0, 1), r"thresh must be a number in \[0, 1\], got 1.5"),
        (lambda: check_int("iters", 2.0, 0), "iters must be an integer >= 0, got 2.0"),
        (lambda: check_int("iters", -1, 0), "iters"),
        (lambda: check_int("iters", False, 0), "iters"),
    ],
)
def test_errors_name_the_argument_and_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()
