"""Markdown rendering of metric results."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..data.vocab import primary_name


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100.0 * value:.2f}"


def format_table(result: dict[str, Any], class_names: Sequence[str]) -> str:
    """Per-class IoU and accuracy (percent; "-" for classes absent from gt and pred),
    then a summary row of mIoU, mAcc and aAcc, as a markdown table."""
    iou = result["IoU"]
    acc = result.get("Acc", [float("nan")] * len(iou))
    if len(class_names) != len(iou):
        raise ValueError(f"{len(class_names)} class names given for {len(iou)} classes in the result")
    rows = ["| class | IoU | Acc |", "|---|---:|---:|"]
    rows += [f"| {primary_name(n)} | {_pct(i)} | {_pct(a)} |" for n, i, a in zip(class_names, iou, acc)]
    rows += [
        "",
        "| mIoU | mAcc | aAcc |",
        "|---:|---:|---:|",
        f"| {_pct(result['mIoU'])} | {_pct(result.get('mAcc', float('nan')))} | {_pct(result.get('aAcc', float('nan')))} |",
    ]
    return "\n".join(rows)


def methods_table(results: Mapping[str, Any]) -> str:
    """Markdown: method, mIoU, refiner and postprocess seconds per image."""
    failed = len(results.get("failed", []))
    lines = [
        f"{results.get('generator', 'MaskCLIP')} generator, protocol {results['protocol']}: "
        f"{results['generator_seconds_per_image']:.3f} s/img over {results['images']} images"
        + (f" ({failed} unreadable image(s) skipped, listed in results.json)" if failed else "")
        + (f"; {results['images_per_second']:.2f} img/s computed by {results['processes']} process(es)"
           if results.get("processes") else ""),
        "",
        "| Method | mIoU (%) | pixel acc (%) | refiner s/img | postprocess s/img |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {100 * r['mIoU']:.2f} | {100 * r['aAcc']:.2f} | {r['seconds_per_image']:.3f} "
                     f"| {r.get('postprocess_seconds_per_image', 0.0):.3f} |")
    return "\n".join(lines)
