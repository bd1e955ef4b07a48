"""HTML pages of a run, readable in any browser without scripts or network.

- report.html (evaluate, compare): the methods table, per-class IoU as a bar chart per method
  (inline SVG), and the images where the refinement gained or lost most against the first
  method (one method: its best and worst images), as panels with the ground truth.
- index.html (refine): the run's numbers and a grid of its overlays, each linking its label PNG
  (and panel when written).

Pictures are referenced by paths relative to the page, inside the output folder, so the folder
moves as a whole. Pages are written atomically (writing.write_text); this module only renders.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.vocab import primary_name
from ..writing import output_path, write_text
from .metric import ConfusionMatrix
from .table import methods_table

REPORT = "report.html"
INDEX = "index.html"
BAR_WIDTH = 360  # pixels for IoU 100 %
STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 6px; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
.grid figure img { width: 240px; }
figcaption { font-size: 13px; }
details { margin: 6px 0; }
"""


def image_miou(matrix: np.ndarray) -> float:
    """mIoU of one image's confusion matrix (classes present in its ground truth or prediction)."""
    cm = ConfusionMatrix(matrix.shape[0])
    cm.matrix = np.asarray(matrix, dtype=np.int64)
    return float(cm.compute()["mIoU"])


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def methods_table_html(results: Mapping[str, Any]) -> str:
    """The methods table of evaluation.table.methods_table as HTML: its heading line, then a row per method."""
    heading = methods_table(results).splitlines()[0]
    head = "".join(f"<th>{h}</th>" for h in ("Method", "mIoU (%)", "pixel acc (%)", "refiner s/img",
                                               "postprocess s/img"))
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=\"num\">{100 * r['mIoU']:.2f}</td>"
        f"<td class=\"num\">{100 * r['aAcc']:.2f}</td><td class=\"num\">{r['seconds_per_image']:.3f}</td>"
        f"<td class=\"num\">{r.get('postprocess_seconds_per_image', 0.0):.3f}</td></tr>"
        for name, r in results["methods"].items())
    return f"<p>{html.escape(heading)}</p><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def iou_bars_svg(iou: Sequence[float], class_names: Sequence[str]) -> str:
    """Per-class IoU as horizontal bars (inline SVG); classes absent from ground truth and prediction are left out."""
    rows = [(primary_name(n), v) for n, v in zip(class_names, iou) if v is not None and not math.isnan(v)]
    label_width, row = 150, 16
    height = row * len(rows) + 4
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + BAR_WIDTH + 60}" height="{height}" '
             f'role="img" font-size="12" font-family="sans-serif">']
    for i, (name, value) in enumerate(rows):
        y = 2 + i * row
        parts.append(f'<text x="{label_width - 6}" y="{y + 12}" text-anchor="end">{html.escape(name)}</text>'
                     f'<rect x="{label_width}" y="{y + 2}" width="{BAR_WIDTH * value:.1f}" height="{row - 4}" '
                     f'fill="#4a7ebb"><title>{html.escape(name)}: {100 * value:.2f}</title></rect>'
                     f'<text x="{label_width + BAR_WIDTH * value + 4:.1f}" y="{y + 12}">{100 * value:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def report_html(results: Mapping[str, Any], highlights: Mapping[str, Sequence[Mapping[str, Any]]],
                caption: str) -> str:
    """The report page (module doc). highlights: section title -> [{"name", "panel" (relative path),
    "scores": {method: per-image mIoU}}]; caption: what the highlighted sections compare."""
    classes = list(results["classes"])
    body = ["<h2>Methods</h2>", methods_table_html(results)]
    if highlights:
        body.append(f"<h2>Where it gained and lost most</h2><p>{html.escape(caption)}</p>")
    for title, items in highlights.items():
        body.append(f"<h3>{html.escape(title)}</h3>")
        if not items:
            body.append("<p>none</p>")
        for item in items:
            scores = ", ".join(f"{html.escape(m)} {100 * v:.1f}" for m, v in item["scores"].items())
            body.append(f'<figure><img src="{html.escape(item["panel"])}" alt="{html.escape(item["name"])}">'
                        f"<figcaption>{html.escape(item['name'])}: image mIoU {scores}</figcaption></figure>")
    body.append("<h2>Per-class IoU (%)</h2>")
    for i, (name, scores) in enumerate(results["methods"].items()):
        open_ = " open" if i < 2 else ""
        body.append(f"<details{open_}><summary>{html.escape(name)}: mIoU {100 * scores['mIoU']:.2f}</summary>"
                    f"{iou_bars_svg(scores['IoU'], classes)}</details>")
    failed = results.get("failed") or []
    if failed:
        body.append(f"<h2>Skipped images</h2><p>{len(failed)} image(s) could not be read or segmented; "
                    "results.json lists each with the reason.</p>")
    return _page(f"{results.get('generator', 'MaskCLIP')} on {results['images']} images", "\n".join(body))


def write_report(out: Path, results: Mapping[str, Any], highlights: Mapping[str, Sequence[Mapping[str, Any]]],
                 caption: str) -> Path:
    """Write <out>/report.html; returns its path."""
    path = output_path(out, REPORT)
    write_text(path, report_html(results, highlights, caption))
    return path


def index_html(summary: Mapping[str, Any], entries: Sequence[Mapping[str, str]], palette: np.ndarray) -> str:
    """refine's index page. entries: [{"name", "overlay", "label", optional "panel"}], paths relative to the page."""
    classes = list(summary.get("classes", []))
    stages = ", ".join(f"{k} {v:.3f} s" for k, v in summary.get("seconds_per_image", {}).items())
    failed = summary.get("failed") or []
    body = [f"<p>{summary.get('images', 0)} images, {summary.get('refined', 0)} refined in this run, "
            f"{summary.get('reused', 0)} reused, {len(failed)} failed (listed in summary.json). "
            f"Seconds per image: {html.escape(stages) or 'nothing ran'}.</p>"]
    if "metrics" in summary:
        body.append(f"<p>mIoU {100 * summary['metrics']['mIoU']:.2f} against the dataset's labels.</p>")
    swatches = "".join(
        f'<span style="margin-right:12px;white-space:nowrap"><span style="display:inline-block;width:12px;height:12px;'
        f'border:1px solid #000;background:rgb{tuple(int(v) for v in palette[i])}"></span> {html.escape(primary_name(n))}'
        f"</span>" for i, n in enumerate(classes[:256]))
    body.append(f"<p><b>Legend:</b> {swatches}</p>")
    figures = []
    for entry in entries:
        links = f' <a href="{html.escape(entry["label"])}">labels</a>'
        if entry.get("panel"):
            links += f' <a href="{html.escape(entry["panel"])}">panel</a>'
        figures.append(f'<figure><a href="{html.escape(entry["overlay"])}"><img loading="lazy" '
                       f'src="{html.escape(entry["overlay"])}" alt="{html.escape(entry["name"])}"></a>'
                       f"<figcaption>{html.escape(entry['name'])}{links}</figcaption></figure>")
    body.append('<div class="grid">' + "".join(figures) + "</div>")
    return _page(f"refine: {len(entries)} overlays", "\n".join(body))


def write_index(out: Path, summary: Mapping[str, Any], entries: Sequence[Mapping[str, str]],
                palette: np.ndarray) -> Path:
    """Write <out>/index.html; returns its path."""
    path = output_path(out, INDEX)
    write_text(path, index_html(summary, entries, palette))
    return path
