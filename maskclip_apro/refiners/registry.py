"""The refiner registry: step names -> refiner classes, and how a family's parameters become kwargs.

A *family* is a group of parameters under `refine` in the configs (ks, pd, apro, pamr); its
keys are the keyword arguments of the family's class. A *step* is a name in a chain
(`refine.steps`, a row of the compare table): it builds one refiner of a class from its
family's parameters, with some arguments fixed by the step itself:

    step             class              family   fixed arguments
    ks               KeySmoothing       ks
    pd               PromptDenoising    pd
    pamr             PAMR               pamr
    pamr_logits      PAMRLogits         pamr                       (PAMR on the logits, docs/refiners.md)
    apro             APro               apro                       (runs refine.apro.mode)
    gp, lp, lp_gp,   APro               apro     mode = the step's combination
    gp_lp, gp_lp_parallel                        (gp_lp_parallel: mode "parallel")
    lposs            LPOSS              lposs    stages = "patch" (LPOSS)
    lposs_plus       LPOSS              lposs    stages = "patch_pixel" (LPOSS+)
    lposs_pixel      LPOSS              lposs    stages = "pixel" (LPOSS+'s pixel stage alone)

Everything here takes plain Python values: `params` is a mapping of family -> keyword
arguments (a config's `refine` block converted by the caller, e.g. config.refine_params).
Classes are imported on first use, so naming a step does not load the compiled kernels.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Iterable, Mapping, Optional

from .base import Refiner

FAMILIES = {"ks": "KeySmoothing", "pd": "PromptDenoising", "apro": "APro", "pamr": "PAMR"}
# Module of each refiner class, relative to this package.
CLASS_MODULES = {
    "KeySmoothing": ".ks",
    "PromptDenoising": ".pd",
    "APro": ".apro",
    "PAMR": ".pamr",
    "PAMRLogits": ".pamr_logits",
}


@dataclass(frozen=True)
class Step:
    """One chain step: the class it builds, the family whose parameters it reads, what it fixes.

    name: when set, the refiner's `name` (how the chain times and labels it) becomes this.
    """

    cls: str
    family: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    name: Optional[str] = None


STEP_TABLE: dict[str, Step] = {
    "ks": Step("KeySmoothing", "ks"),
    "pd": Step("PromptDenoising", "pd"),
    "pamr": Step("PAMR", "pamr"),
    "pamr_logits": Step("PAMRLogits", "pamr"),
    "apro": Step("APro", "apro", name="apro"),  # timed and named as the step, whichever mode it runs
    "gp": Step("APro", "apro", {"mode": "gp"}),
    "lp": Step("APro", "apro", {"mode": "lp"}),
    "lp_gp": Step("APro", "apro", {"mode": "lp_gp"}),
    "gp_lp": Step("APro", "apro", {"mode": "gp_lp"}),
    "gp_lp_parallel": Step("APro", "apro", {"mode": "parallel"}),
}
# LPOSS (refiners/lposs.py): the patch stage, LPOSS+ (patch then pixel stage), the pixel stage alone.
FAMILIES["lposs"] = "LPOSS"
CLASS_MODULES["LPOSS"] = ".lposs"
STEP_TABLE.update(
    lposs=Step("LPOSS", "lposs", {"stages": "patch"}),
    lposs_plus=Step("LPOSS", "lposs", {"stages": "patch_pixel"}),
    lposs_pixel=Step("LPOSS", "lposs", {"stages": "pixel"}),
)
STEPS = tuple(STEP_TABLE)


def refiner_class(name: str) -> type:
    """A refiner class by its name (KeySmoothing, PromptDenoising, APro, PAMR, PAMRLogits)."""
    return getattr(import_module(CLASS_MODULES[name], __package__), name)


def family_parameters(family: str) -> tuple[str, ...]:
    """The keyword arguments a family's parameters may set (its class's constructor arguments)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown refiner family {family!r}; the families are {tuple(FAMILIES)}")
    return tuple(inspect.signature(refiner_class(FAMILIES[family])).parameters)


def check_parameters(family: str, keys: Iterable[str]) -> None:
    """ValueError naming the first of `keys` that is not a parameter of the family's refiner."""
    accepted = family_parameters(family)
    unknown = [k for k in keys if k not in accepted]
    if unknown:
        raise ValueError(
            f"refine.{family}.{unknown[0]} is not a parameter of the {family} refiner; it takes {', '.join(accepted)}"
        )


def build_refiner(step: str, params: Optional[Mapping[str, Any]] = None) -> Refiner:
    """One refiner from its step name; `params` maps a refiner family (ks, pd, apro, pamr) to kwargs.

    Other keys of `params` (e.g. `steps`) are ignored, so a whole `refine` block can be passed.
    """
    if step not in STEP_TABLE:
        raise ValueError(f"unknown refiner step {step!r}; choose from {STEPS}")
    spec = STEP_TABLE[step]
    given = dict((params or {}).get(spec.family) or {})
    check_parameters(spec.family, given)
    kwargs = {**given, **spec.fixed}
    refiner = refiner_class(spec.cls)(**kwargs)
    if spec.name is not None:
        refiner.name = spec.name
    return refiner
