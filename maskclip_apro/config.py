"""Hydra glue shared by the commands and the Python API: config folder, compose, builders."""

from __future__ import annotations

from importlib import resources
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(resources.files("maskclip_apro.conf"))
GENERATOR_KEYS = (
    "templates", "logit_scale", "mode", "short_side", "img_scale", "window", "stride", "normalize", "cache_dir"
)


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a primary config from conf/ without running an app (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def hydra_app(config_name: str, run: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """A command-line entry point: `run` under Hydra, with failures the user can fix reported as one line.

    A ValueError or OSError (bad config value, missing or unwritable file, corrupt image) ends
    the program with "error: <message>" and exit status 1 instead of a traceback; Ctrl-C ends it
    with one line and status 130 (files already written are complete: writes are atomic).
    """
    import sys

    import hydra

    def task(cfg: DictConfig) -> Any:
        try:
            return run(cfg)
        except (ValueError, OSError) as error:
            raise SystemExit(f"error: {error}") from None

    task.__name__ = run.__module__.rsplit(".", 1)[-1]
    app = hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(task)

    def main() -> Any:
        try:
            return app()
        except KeyboardInterrupt:
            print(f"\n{config_name} interrupted (Ctrl-C); every file already written is complete", file=sys.stderr)
            raise SystemExit(130) from None

    main.__doc__ = f"The {config_name} command (Hydra overrides as arguments)."
    return main


def generator_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """build_generator's keyword arguments from a run config.

    The `generator` block (conf/_run.yaml plus the protocol), overridden by the same keys in the
    model preset; with generator.dataset_scale, the img_scale of the run's dataset (when it has
    one and no `input` replaces it) replaces generator.img_scale; model.act / model.ln_eps set
    the image tower.
    """
    merged: dict[str, Any] = {}
    for block in (cfg.get("generator"), cfg.get("model")):
        if block is not None:
            merged.update({k: v for k, v in OmegaConf.to_container(block, resolve=True).items() if k in GENERATOR_KEYS})
    generator, model, dataset = cfg.get("generator") or {}, cfg.get("model") or {}, cfg.get("dataset")
    if generator.get("dataset_scale") and dataset is not None and not cfg.get("input"):
        if dataset.get("img_scale") is not None:
            merged["img_scale"] = OmegaConf.to_container(dataset.img_scale, resolve=True)
    for key in ("act", "ln_eps"):
        merged[key] = model.get(key)
    background = cfg.get("background")
    if background is not None:
        merged["background"] = OmegaConf.to_container(background, resolve=True)
    return merged


def protocol_name(cfg: DictConfig) -> str:
    """The test protocol a run config names (conf/protocol/), for tagging results."""
    generator = cfg.get("generator") or {}
    return str(generator.get("protocol") or "unnamed")


def build_generator_from_config(cfg: DictConfig, class_names: Sequence[str]):
    """The MaskCLIP generator named by cfg.model, for `class_names`, on cfg.device."""
    from .generator import build_generator

    return build_generator(
        cfg.model.name, cfg.model.get("pretrained"), list(class_names), device=cfg.get("device", "cpu"),
        **generator_kwargs(cfg),
    )


def refine_steps(cfg: DictConfig) -> list[str]:
    """The refiner step names of the run's refine preset."""
    return list(cfg.refine.get("steps", []))
