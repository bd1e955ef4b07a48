"""Types of the command configs, checked once Hydra has composed them.

Hydra hands `panel=no` over as the string "no", which Python treats as true, and passes an
unknown `+refine.apro.zeta_gg=1` on to the refiner as a keyword it does not take. check_config
turns each such mistake into one ValueError that names the key, the value and what the key
accepts. It checks the keys listed here when present (keys added elsewhere are left alone), the
parameters of the refiner families against the refiners' own arguments (refiners.registry), and
unset `???` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Rule:
    """What a key accepts, in words for the error message, and the test."""

    accepts: str
    test: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optional(rule: Rule) -> Rule:
    return Rule(f"{rule.accepts}, or null", lambda v: v is None or rule.test(v))


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str) and v != "")
VOCAB = Rule(
    "a vocabulary name (voc21, context59, ...), a class file, or a list of names",
    lambda v: (isinstance(v, str) and v != "") or (isinstance(v, list) and len(v) > 0),
)


def integer(low: int) -> Rule:
    return Rule(f"an integer >= {low}", lambda v: _is_int(v) and v >= low)


def number(low: float, high: float | None = None, strict_low: bool = False) -> Rule:
    words = f"a number {'>' if strict_low else '>='} {low}" + ("" if high is None else f" and <= {high}")
    return Rule(words, lambda v: _is_number(v) and (v > low if strict_low else v >= low) and (high is None or v <= high))


def choice(*options: str) -> Rule:
    return Rule(" or ".join(options), lambda v: v in options)


_GENERATOR = {
    "logit_scale": number(0, strict_low=True),
    "mode": choice("slide", "whole", "harness"),
    "short_side": _optional(integer(1)),
    "window": _optional(integer(1)),
    "stride": _optional(integer(1)),
    "cache_dir": _optional(TEXT),
}
TOWER_PRECISIONS = ("fp32", "fp16", "bf16")
COMMON = {
    "output_dir": TEXT,
    "precision": choice("auto", *TOWER_PRECISIONS),
    "generator.cuda_precision": choice(*TOWER_PRECISIONS),
    "max_image_pixels": _optional(integer(1)),
    **{f"generator.{k}": rule for k, rule in _GENERATOR.items()},
    **{f"model.{k}": rule for k, rule in _GENERATOR.items() if k != "cache_dir"},
}
_INPUTS = {"input": _optional(TEXT), "vocab": VOCAB, "limit": _optional(integer(1)), "on_error": choice("skip", "stop"),
           "batch_size": integer(1), "workers": integer(0)}
COMMANDS: dict[str, dict[str, Rule]] = {
    "refine": {
        **_INPUTS,
        "save_probs": BOOL,
        "panel": BOOL,
        "overwrite": BOOL,
        "overlay_alpha": number(0, 1),
    },
    "evaluate": dict(_INPUTS),
    "compare": {**_INPUTS, "panels": integer(0)},
    "train": {"amp": BOOL, "augment.flip": BOOL, "seed": integer(0), "accum": integer(1),
              "workers": _optional(integer(0)), "batch_size": integer(1), "log_interval": integer(1),
              "eval.interval": integer(0), "checkpoint.interval": integer(0), "checkpoint.keep": integer(1)},
}
# Refiner parameter values the refiners' constructors accept but their first image would reject.
REFINER_VALUES = {
    "apro.kernel_size": Rule("an odd integer >= 1 (a window centred on each pixel)",
                             lambda v: _is_int(v) and v >= 1 and v % 2 == 1),
    "apro.backend": choice("auto", "torch", "cpu", "triton"),
}


def check_config(cfg: DictConfig, command: str) -> None:
    """Raise ValueError naming the first key of `cfg` whose value `command` cannot use."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: pass "
            + " ".join(f"{key}=..." for key in missing)
        )
    for key, rule in {**COMMON, **COMMANDS[command]}.items():
        node = OmegaConf.select(cfg, key, default=_ABSENT)
        if node is _ABSENT:
            continue
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if not rule.test(value):
            raise ValueError(f"{key}={_show(value)} is not valid: {key} takes {rule.accepts}")
    _check_device(cfg)
    _check_refiner_params(cfg)
    if command == "compare":
        _check_methods(cfg)


_ABSENT = object()


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _check_device(cfg: DictConfig) -> None:
    """auto, cpu, cuda or cuda:N, and a GPU that exists where one is asked for (auto: a GPU when there is one)."""
    import re

    import torch

    value = cfg.get("device")
    if value is None:
        return
    accepts = "auto, cpu, cuda or cuda:N"
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"device={_show(value)} is not a device: device takes {accepts}")
    if value.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.partition(":")[2] or 0)
        if index >= count:
            found = "no CUDA GPU" if count == 0 else f"{count} CUDA GPU(s)"
            raise ValueError(f"device={value} asks for a GPU but torch finds {found}; use device=cpu")


def _check_refiner_params(cfg: DictConfig) -> None:
    """Every key under refine.<family> must be an argument of that family's refiner (refiners.registry),
    and every value one it runs with: each family's refiner is built from its parameters (its
    constructor's checks), and REFINER_VALUES adds what only a refined image would show, so a bad
    value stops the run before the first image."""
    from .refiners.registry import FAMILIES, check_parameters, refiner_class

    for family in FAMILIES:
        node = OmegaConf.select(cfg, f"refine.{family}", default=None)
        if not isinstance(node, DictConfig):
            continue
        check_parameters(family, node)
        params = OmegaConf.to_container(node, resolve=True)
        for name, value in params.items():
            rule = REFINER_VALUES.get(f"{family}.{name}")
            if rule is not None and not rule.test(value):
                raise ValueError(f"refine.{family}.{name}={_show(value)} is not valid: it takes {rule.accepts}")
        try:
            refiner_class(FAMILIES[family])(**params)
        except (ValueError, TypeError) as error:
            raise ValueError(f"refine.{family}: {error}") from None


def _check_methods(cfg: DictConfig) -> None:
    """compare's methods: a mapping of names to lists of refiner step names."""
    from .refiners.registry import STEPS

    methods = cfg.get("methods")
    container = OmegaConf.to_container(methods, resolve=True) if OmegaConf.is_config(methods) else methods
    if not isinstance(container, Mapping) or not container:
        raise ValueError(f"methods={_show(container)} is not valid: methods maps names to lists of refiner steps")
    for name, steps in container.items():
        if not isinstance(steps, list) or any(s not in STEPS for s in steps):
            raise ValueError(
                f"methods.{name}={_show(steps)} is not valid: a method is a list of refiner steps from {', '.join(STEPS)}"
            )
