"""build_generator: a dense generator from an open_clip model, a last-block mode and a protocol's settings.

The factory of the package: it picks MaskCLIPGenerator (maskclip.py, modes "whole" and "slide")
or HarnessGenerator (harness.py, mode "harness") and the dense backbone (vit.ViTDense for any
last-block mode, resnet.ResNetDense), so that neither generator module imports the other.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .dense_attention import PROXY_BETA, PROXY_GAMMA
from .harness import HarnessGenerator, check_harness_settings
from .maskclip import MaskCLIPGenerator

TOWER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_dense_backbone(
    visual: nn.Module,
    dense: str = "maskclip",
    *,
    pos_interp: str = "size",
    remainder: str = "pad",
    naclip_sigma: float = 5.0,
    proxy: Optional[Mapping[str, float]] = None,
    vfm: Optional[nn.Module] = None,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
) -> nn.Module:
    """ViTDense (any dense mode) or ResNetDense (maskclip only), chosen from the image tower's class."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    from .resnet import ResNetDense
    from .vit import ViTDense

    if isinstance(visual, VisionTransformer):
        proxy = dict(proxy or {})
        unknown = sorted(set(proxy) - {"beta", "gamma"})
        if unknown:
            raise ValueError(f"model.proxy takes beta and gamma, got {unknown}")
        return ViTDense(
            visual, dense, pos_interp=pos_interp, remainder=remainder, naclip_sigma=naclip_sigma,
            proxy_beta=proxy.get("beta", PROXY_BETA), proxy_gamma=proxy.get("gamma", PROXY_GAMMA),
            vfm=vfm, mean=mean, std=std,
        )
    if isinstance(visual, ModifiedResNet):
        if dense != "maskclip":
            raise ValueError(
                f"model.dense={dense} rebuilds a ViT's last attention block; a ResNet tower has none "
                "(only model.dense=maskclip, the attention pool's projections per position)"
            )
        return ResNetDense(visual)
    raise ValueError(f"unsupported image tower {type(visual).__name__}: need an open_clip ViT or ModifiedResNet")


def tower_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (TOWER_DTYPES); ValueError for any other name."""
    if precision not in TOWER_DTYPES:
        raise ValueError(f"precision must be one of {tuple(TOWER_DTYPES)}, got {precision!r}")
    return TOWER_DTYPES[precision]


def set_tower_precision(backbone: nn.Module, precision: str) -> None:
    """Cast the image tower's weights (and ProxyCLIP's VFM's) to `precision` (TOWER_DTYPES), as the
    SCLIP-family codes run their towers; each casts its input to its weights' dtype and the
    generators take its outputs as float32, so text, heads and refiners keep their precision."""
    dtype = tower_dtype(precision)
    backbone.visual.to(dtype)
    vfm = getattr(backbone, "vfm", None)
    if vfm is not None:
        vfm.model.to(dtype)


def build_generator(
    model: str,
    pretrained: Optional[str],
    class_names: Sequence[str],
    *,
    templates: Union[str, Sequence[str]] = "maskclip",
    background: Optional[dict] = None,
    logit_scale: float = 100.0,
    mode: str = "whole",
    short_side: Optional[int] = None,
    img_scale: Optional[Sequence[int]] = (2048, 512),
    window: Optional[int] = 448,
    stride: Optional[int] = 224,
    normalize: str = "imagenet",
    act: Optional[str] = None,
    ln_eps: Optional[float] = None,
    cache_dir: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    dense: str = "maskclip",
    pos_interp: str = "size",
    naclip_sigma: float = 5.0,
    proxy: Optional[Mapping[str, float]] = None,
    vfm: Optional[Mapping[str, Any]] = None,
    class_lines: Optional[Sequence[str]] = None,
    pad_to: Union[None, str, int] = None,
    prob_thd: float = 0.0,
    area_thd: Optional[float] = None,
    precision: str = "fp32",
    vfm_values: bool = False,
    load_clip: Optional[Callable[[str, Optional[str], Any], tuple[nn.Module, str]]] = None,
) -> nn.Module:
    """A dense generator for `class_names` from an open_clip model and checkpoint (models.load_clip).

    The defaults are the geometry and normalisation of MaskCLIP's test protocol (whole image,
    keep-ratio scale (2048, 512), ImageNet mean/std) and MaskCLIP's last block. act / ln_eps set
    the image tower's MLP activation ("quick_gelu" | "gelu") and LayerNorm eps; None keeps what
    the weights need. dense: the last block (dense_attention.ATTENTION_MODES; naclip_sigma,
    proxy={beta, gamma} and vfm={name, pretrained} for the modes that use them). pos_interp:
    "size" or "offset" (pos_embed.py).

    mode "whole" / "slide" -> MaskCLIPGenerator; "harness" -> harness.HarnessGenerator, which
    also takes class_lines (the text of each class, synonyms separated by commas, e.g. a
    method's class file; default class_names, which then only name the classes), pad_to,
    prob_thd and area_thd (harness.py), and reads short_side as the S of Resize((2048, S)).
    vfm_values (harness only): also hand the refiners the last-block value features of every
    window from the VFM `vfm` names (LPOSS; shared with proxyclip's attention when both run).
    load_clip(model, pretrained, device) -> (clip, identity) replaces models.load_clip, e.g. to
    serve weights already in memory (the demo builds several generators on one load).
    """
    from .dense_attention import ATTENTION_MODES, DENSE_NAMES
    from .models import check_normalize, check_tower_settings, configure_image_tower, image_mean_std
    from .models import load_clip as read_clip
    from .templates import resolve_templates
    from .text import build_text_classifier, parse_class_names

    harness = mode == "harness"
    if not harness and (pad_to is not None or prob_thd != 0.0 or area_thd is not None or vfm_values):
        raise ValueError(
            "generator.pad_to, prob_thd, area_thd and vfm_values belong to the SCLIP-family harness (mode=harness)"
        )
    if dense not in ATTENTION_MODES:
        raise ValueError(f"model.dense must be one of {ATTENTION_MODES}, got {dense!r}")
    lines = list(class_names if class_lines is None else class_lines)
    parse_class_names(lines)  # fail on bad settings before loading weights
    if len(lines) != len(class_names):
        raise ValueError(f"{len(lines)} class lines for {len(class_names)} classes")
    template_list = resolve_templates(templates)
    check_normalize(normalize)
    check_tower_settings(act, ln_eps)
    if harness:
        check_harness_settings(short_side, window, stride, pad_to, logit_scale, prob_thd, area_thd)
    tower_dtype(precision)  # fail on a bad name before loading weights
    clip, identity = (load_clip or read_clip)(model, pretrained, device)
    configure_image_tower(clip.visual, act, ln_eps)
    mean, std = image_mean_std(clip, normalize)
    vfm_model = None
    if dense == "proxyclip" or vfm_values:
        from .vfm import DEFAULT_VFM, load_vfm

        vfm = dict(vfm or {})
        vfm_model = load_vfm(vfm.get("name", DEFAULT_VFM), vfm.get("pretrained", True), device)
    backbone = build_dense_backbone(
        clip.visual, dense, pos_interp=pos_interp, remainder="drop" if harness else "pad",
        naclip_sigma=naclip_sigma, proxy=proxy, vfm=vfm_model if dense == "proxyclip" else None, mean=mean, std=std,
    )
    set_tower_precision(backbone, precision)
    classifier, display = build_text_classifier(
        clip, model, identity, lines, template_list, background=background, cache_dir=cache_dir
    )
    if class_lines is not None:
        display = [line.split(",")[0].strip() for line in class_names]
    common = dict(model=clip, name=DENSE_NAMES[dense], logit_scale=logit_scale, window=window, stride=stride)
    if harness:
        gen = HarnessGenerator(
            backbone, classifier, display, mean, std, short_side=short_side, pad_to=pad_to, prob_thd=prob_thd,
            area_thd=area_thd, vfm=vfm_model if vfm_values else None, **common,
        )
    else:
        gen = MaskCLIPGenerator(
            backbone, classifier, display, mean, std, mode=mode, short_side=short_side, img_scale=img_scale, **common
        )
    gen.precision = precision
    # which weights, in which dtype: saved results made with other weights are not reused
    gen.identity = identity if precision == "fp32" else f"{identity} ({precision})"
    return gen.to(device).eval()
