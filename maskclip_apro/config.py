"""Hydra glue shared by the commands and the Python API: config folder, compose, builders."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from .data.io import read_weights

CONF_DIR = str(resources.files("maskclip_apro.conf"))
GENERATOR_KEYS = (
    "templates", "logit_scale", "mode", "short_side", "img_scale", "window", "stride", "normalize", "cache_dir",
    "pos_interp",
)
HARNESS_KEYS = ("pad_to", "prob_thd", "area_thd", "class_file", "vfm_values")  # mode=harness only (generator/harness.py)
DENSE_KEYS = ("dense", "naclip_sigma", "proxy", "vfm")  # the model block's last-block settings


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

    from .writing import check_output_dir

    def task(cfg: DictConfig) -> Any:
        try:
            return run(cfg)
        except (ValueError, OSError) as error:
            raise SystemExit(f"error: {error}") from None

    task.__name__ = run.__module__.rsplit(".", 1)[-1]
    app = hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(task)

    def main() -> Any:
        try:
            # Hydra creates output_dir and opens its log file there before `run` starts.
            path, whole = _output_dir_argument(config_name, sys.argv[1:])
            if path:
                check_output_dir(path, links=whole)
        except (ValueError, OSError) as error:
            raise SystemExit(f"error: {error}") from None
        try:
            return app()
        except KeyboardInterrupt as interrupt:
            what = str(interrupt) or "every file already written is complete"
            print(f"\n{config_name} interrupted (Ctrl-C); {what}", file=sys.stderr)
            raise SystemExit(130) from None

    main.__doc__ = f"The {config_name} command (Hydra overrides as arguments)."
    return main


def _output_dir_argument(config_name: str, args: Sequence[str]) -> tuple[str, bool]:
    """The output_dir a command line asks for (the config's default when it names none), up to its
    first interpolation (`${now:...}` is only known once Hydra runs), and whether that is all of it."""
    value = None
    for arg in args:
        key, sep, given = arg.partition("=")
        if sep and key.lstrip("+") == "output_dir":
            value = given.strip("'\"")
    if value is None:
        raw = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/{config_name}.yaml"), resolve=False)
        value = str(raw.get("output_dir", "."))
    head = value.split("${", 1)[0]
    if head == value:
        return value, True
    return head.rsplit("/", 1)[0] if "/" in head else "", False


def generator_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """build_generator's keyword arguments from a run config (class_file left as a name).

    In order, later winning: the `generator` block (conf/_run.yaml plus the protocol); under
    mode=harness, the protocol's `generator.per_dataset` entry for the run's dataset (when no
    `input` replaces the dataset); otherwise, with generator.dataset_scale, the dataset's own
    img_scale; then the same generator keys in the model preset. model.act / model.ln_eps set
    the image tower, model.dense and its parameters the last block. The harness keys (pad_to,
    prob_thd, area_thd, class_file) are dropped unless mode=harness, so a command that runs the
    generator on whole crops (train) can use a harness protocol's normalisation and templates.
    """
    keys = GENERATOR_KEYS + HARNESS_KEYS
    merged: dict[str, Any] = {}
    generator = cfg.get("generator") or {}
    if generator:
        merged.update({k: v for k, v in OmegaConf.to_container(generator, resolve=True).items() if k in keys})
    model, dataset = cfg.get("model") or {}, cfg.get("dataset")
    dataset_name = None if dataset is None or cfg.get("input") else dataset.get("name")
    harness = merged.get("mode") == "harness"
    if harness and dataset_name is not None and generator.get("per_dataset") is not None:
        table = OmegaConf.to_container(generator.per_dataset, resolve=True)
        entry = table.get(dataset_name) or {}
        unknown = sorted(set(entry) - set(keys))
        if unknown:
            raise ValueError(f"generator.per_dataset.{dataset_name} sets {unknown}; it takes {list(keys)}")
        merged.update(entry)
    elif generator.get("dataset_scale") and dataset_name is not None and dataset.get("img_scale") is not None:
        merged["img_scale"] = OmegaConf.to_container(dataset.img_scale, resolve=True)
    if model:
        merged.update({k: v for k, v in OmegaConf.to_container(model, resolve=True).items() if k in GENERATOR_KEYS})
    if not harness:
        for key in HARNESS_KEYS:
            merged.pop(key, None)
    for key in ("act", "ln_eps"):
        merged[key] = model.get(key)
    for key in DENSE_KEYS:
        if model.get(key) is not None:
            value = model.get(key)
            merged[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    background = cfg.get("background")
    if background is not None:
        merged["background"] = OmegaConf.to_container(background, resolve=True)
    return merged


def protocol_name(cfg: DictConfig) -> str:
    """The test protocol a run config names (conf/protocol/), for tagging results."""
    generator = cfg.get("generator") or {}
    return str(generator.get("protocol") or "unnamed")


def build_generator_from_config(cfg: DictConfig, class_names: Sequence[str], load_clip=None):
    """The generator named by cfg.model and the protocol, for `class_names`, on cfg.device (run_device)
    with its image tower in tower_precision's dtype (load_clip: see generator.build_generator).

    Under mode=harness a `class_file` (a built-in name such as voc21_sclip, or a path) gives the
    text of each class; it must have one line per class of `class_names`.
    """
    from .data.class_file import read_class_file
    from .generator import build_generator

    kwargs = generator_kwargs(cfg)
    class_file = kwargs.pop("class_file", None)
    if class_file is not None:
        lines = read_class_file(class_file)
        if len(lines) != len(class_names):
            raise ValueError(
                f"generator.class_file {class_file!r} has {len(lines)} classes but the run has {len(class_names)}"
            )
        kwargs["class_lines"] = lines
    vfm = kwargs.get("vfm") or {}
    if kwargs.get("dense") == "proxyclip" and isinstance(vfm.get("pretrained"), str):
        # timm would unpickle anything in the file; only tensors pass this check (mapped, not read).
        read_weights(str(Path(vfm["pretrained"]).expanduser()), "model.vfm.pretrained file", mmap=True)
    device = run_device(cfg)
    return build_generator(
        cfg.model.name, cfg.model.get("pretrained"), list(class_names), device=device,
        precision=tower_precision(cfg, device), load_clip=load_clip, **kwargs
    )


def run_device(cfg: DictConfig):
    """cfg.device as a torch.device: auto (the default) is cuda when torch finds a GPU, else cpu."""
    from .distributed import resolve_device

    return resolve_device(str(cfg.get("device") or "auto"))


def tower_precision(cfg: DictConfig, device) -> str:
    """The image towers' dtype name for a run on `device`: cfg.precision, where auto (the default)
    means generator.cuda_precision on a CUDA device (the protocol's: what its official code runs)
    and fp32 anywhere else."""
    precision = str(cfg.get("precision") or "auto")
    if precision != "auto":
        return precision
    generator = cfg.get("generator") or {}
    return str(generator.get("cuda_precision") or "fp32") if device.type == "cuda" else "fp32"


def refine_steps(cfg: DictConfig) -> list[str]:
    """The refiner step names of the run's refine preset."""
    return list(cfg.refine.get("steps", []))


def refine_params(cfg: DictConfig) -> dict[str, Any]:
    """The run's refine block as plain Python values: refiner family -> keyword arguments (and the
    steps), what refiners.Chain.from_steps and build_refiner take."""
    return OmegaConf.to_container(cfg.refine, resolve=True)
