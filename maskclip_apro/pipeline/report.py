"""The HTML pages of a finished run (evaluation.report renders them): what the runners hand over.

run_report (evaluate, compare): per-image mIoU of every method from the run's per-image
records, the images where the best method gained or lost most against the first one (one
method: its best and worst images), their panels (image | ground truth | methods) made again
from one generator pass each into <out>/report/, then report.html. refine_index (refine): the
overlays of the images this run finished or reused, then index.html.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import numpy as np

from ..evaluation.report import image_miou, write_index, write_report
from ..palette import voc_palette
from ..refiners import Chain
from ..segmenter import Segmenter
from ..visualize import make_panel
from ..writing import output_path, save_rgb

SHOWN = 3  # images per section


def _per_image_scores(dataset: Any, out: Path, methods: list[str]) -> dict[int, dict[str, float]]:
    """dataset index -> {method: the image's mIoU}, from per_image/<name>.npz (unreadable records left out)."""
    scores = {}
    for index in range(len(dataset)):
        path = output_path(out, "per_image", f"{dataset.source(index).name}.npz")
        try:
            with np.load(path, allow_pickle=False) as record:
                if [str(m) for m in record["methods"]] != methods:
                    continue
                scores[index] = {m: image_miou(record[f"cm{j}"]) for j, m in enumerate(methods)}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            continue
    return scores


def run_report(segmenter: Segmenter, chains: Mapping[str, Chain], dataset: Any, out: Path,
               results: Mapping[str, Any]) -> Path | None:
    """Write <out>/report.html for a finished evaluate / compare run (module doc); its path, or None
    when it could not be made (said on stderr; the run's results stand)."""
    try:
        methods = list(results["methods"])
        scores = _per_image_scores(dataset, Path(out), methods)
        base = methods[0]
        if len(methods) > 1:
            focus = max(methods[1:], key=lambda m: results["methods"][m]["mIoU"])
            delta = {i: s[focus] - s[base] for i, s in scores.items() if not np.isnan(s[focus] - s[base])}
            ranked = sorted(delta, key=lambda i: delta[i])
            sections = {f"{focus} gained most over {base}": [i for i in ranked[::-1][:SHOWN] if delta[i] > 0],
                        f"{focus} lost most against {base}": [i for i in ranked[:SHOWN] if delta[i] < 0]}
            shown = [base, focus]
            caption = (f"Per-image mIoU of {focus} (the best method here) against {base}; panels: image, "
                       f"ground truth, {base}, {focus}.")
        else:
            valid = sorted((i for i, s in scores.items() if not np.isnan(s[base])), key=lambda i: scores[i][base])
            sections = {f"best images of {base}": valid[::-1][:SHOWN], f"worst images of {base}": valid[:SHOWN]}
            shown = [base]
            caption = f"Per-image mIoU of {base}; panels: image, ground truth, {base}."
        palette = voc_palette(256)
        highlights = {}
        for title, indices in sections.items():
            items = []
            for index in indices:
                sample = dataset[index]
                preds = segmenter.predict_many(sample.image, {m: chains[m] for m in shown}, keep_probs=False)
                columns = [("image", sample.image), ("ground truth", sample.label)]
                columns += [(m, preds[m].labels) for m in shown]
                panel = output_path(out, "report", f"{sample.name}.png")
                save_rgb(panel, make_panel(columns, class_names=segmenter.class_names, palette=palette))
                items.append({"name": sample.name, "panel": f"report/{quote(sample.name)}.png",
                              "scores": {m: scores[index][m] for m in shown}})
            highlights[title] = items
        return write_report(Path(out), results, highlights, caption)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"report.html not written: {error}", file=sys.stderr)
        return None


def refine_index(dataset: Any, out: Path, summary: Mapping[str, Any]) -> Path:
    """Write <out>/index.html: the overlays of every image whose outputs exist (module doc)."""
    out = Path(out)
    failed = {item["name"] for item in summary.get("failed", [])}
    entries = []
    for index in range(len(dataset)):
        name = dataset.source(index).name
        if name in failed or not output_path(out, "overlays", f"{name}.png").is_file():
            continue
        entry = {"name": name, "overlay": f"overlays/{quote(name)}.png", "label": f"labels/{quote(name)}.png"}
        if output_path(out, "panels", f"{name}.png").is_file():
            entry["panel"] = f"panels/{quote(name)}.png"
        entries.append(entry)
    return write_index(out, summary, entries, voc_palette(256))
