"""Score refiner chains on a labelled dataset, one generator pass per image (evaluate, compare).

Per-image confusion matrices and times go to <out>/per_image/<name>.npz as each image finishes
(atomically), with the key they were made under (pipeline.reuse), the identities of the input
files and a digest of the record's own arrays; a rerun reuses the records whose key matches and
computes the rest, so an interrupted run continues where it stopped and a changed config,
vocabulary, weights or input file is never served stale. Before a record is used it is checked
(check_record: its digest, shapes, dtypes, non-negative counts that sum to the label's scored
pixels); a bad one is named and recomputed. Under torchrun each
rank scores its share of the images (pipeline.loop) and the confusion matrices are summed over
the ranks: integer counts, so the scores equal a single process's exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from ..distributed import all_gather_object, barrier
from ..evaluation.metric import ConfusionMatrix
from ..palette import voc_palette
from ..refiners import Chain
from ..segmenter import Segmenter
from ..visualize import make_panel
from ..writing import atomic_write, output_path, save_rgb
from .loop import Prepared, RunOptions, check_some_succeeded, run_items
from .reuse import ResultKey, ReuseLog, read_key, stale_reason


def _read(path: Path) -> tuple[dict | None, str | None]:
    """The saved record of one image and None, or None and why there is none to use."""
    if not path.exists():
        return None, "new"
    try:
        with np.load(path, allow_pickle=False) as data:
            record = {k: data[k] for k in data.files}
        read_key(str(record["key"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        tqdm.write(f"{path} is unreadable ({error}); recomputing it", file=sys.stderr)
        return None, "unreadable record"
    return record, None


def record_digest(record: Mapping[str, np.ndarray]) -> str:
    """A digest of a record's arrays (names, dtypes, shapes, bytes) but its own "digest" entry."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(k for k in record if k != "digest"):
        array = np.ascontiguousarray(record[name])
        h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def check_record(record: Mapping[str, np.ndarray], names: Sequence[str], k: int, scored: int | None) -> str | None:
    """None when a saved record can be used for methods `names` over k classes, else what is wrong.

    scored: the label's pixels that are scored (not the ignore index); every matrix must sum to it.
    """
    if str(record.get("digest", "")) != record_digest(record):
        return "its content does not match its digest (edited, or written by another version)"
    try:
        return _check_arrays(record, names, k, scored)
    except (TypeError, ValueError) as error:  # arrays of the wrong kind (text where numbers belong)
        return f"it holds malformed arrays ({error})"


def _check_arrays(record: Mapping[str, np.ndarray], names: Sequence[str], k: int, scored: int | None) -> str | None:
    if [str(m) for m in np.atleast_1d(record.get("methods", np.array([])))] != list(names):
        return f"it holds methods {record.get('methods')}, expected {list(names)}"
    for j in range(len(names)):
        cm = record.get(f"cm{j}")
        if cm is None or cm.shape != (k, k) or cm.dtype.kind not in "iu":
            shape = None if cm is None else f"{cm.dtype} {cm.shape}"
            return f"confusion matrix {j} is {shape}, expected integer ({k}, {k})"
        if (cm < 0).any():
            return f"confusion matrix {j} holds negative counts"
        if scored is not None and int(cm.sum()) != scored:
            return f"confusion matrix {j} counts {int(cm.sum())} pixels, the label scores {scored}"
    for name in ("seconds", "postprocess_seconds"):
        times = record.get(name)
        if times is None or times.shape != (len(names),) or not np.all(np.isfinite(times)) or (times < 0).any():
            return f"{name} is not {len(names)} finite non-negative numbers"
    generator = record.get("generator_seconds")
    if generator is None or generator.shape != () or not np.isfinite(generator) or generator < 0:
        return "generator_seconds is not a finite non-negative number"
    return None


def _save(path: Path, record: dict) -> None:
    record["digest"] = np.array(record_digest(record))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **record)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


class _Reader:
    """The read-ahead half (pipeline.loop): the image's checked saved record, or its pixels and label."""

    def __init__(self, dataset: Any, out: Path, keys: ResultKey, names: Sequence[str], k: int) -> None:
        self.dataset, self.out, self.keys, self.names, self.k = dataset, out, keys, list(names), k

    def __call__(self, item: Prepared) -> None:
        source = self.dataset.source(item.index)
        item.name = source.name
        path = output_path(self.out, "per_image", f"{item.name}.npz")
        record, item.reason = _read(path)
        known = None
        if record is not None and "inputs" in record:
            with contextlib.suppress(ValueError):
                known = read_key(str(record["inputs"]))
        item.key, item.inputs = self.keys.of(source, known)
        if record is not None:
            item.reason = stale_reason(read_key(str(record["key"])), item.key)
        if item.reason is None:
            problem = check_record(record, self.names, self.k, self._scored(item.index))
            if problem is None:
                item.saved = record
                return
            tqdm.write(f"{path}: {problem}; recomputing it", file=sys.stderr)
            item.reason = "bad record"
        item.sample = self.dataset[item.index]
        if item.sample.label is None:
            raise ValueError(f"image {item.name!r} has no ground-truth label; evaluation needs a labelled dataset")

    def _scored(self, index: int) -> int | None:
        """How many pixels of the sample's label are scored (not the ignore index)."""
        read = getattr(self.dataset, "label", None)
        label = read(index) if callable(read) else self.dataset[index].label
        return None if label is None else int((np.asarray(label) != self.dataset.ignore_index).sum())


class _Totals:
    """What one rank accumulates; summed over the ranks at the end."""

    def __init__(self, matrices: list[ConfusionMatrix]) -> None:
        self.matrices = matrices
        self.images = 0
        self.seconds = np.zeros(len(matrices))
        self.post_seconds = np.zeros(len(matrices))
        self.generator_seconds = 0.0
        self.log = ReuseLog()

    def add(self, record: Mapping[str, np.ndarray]) -> None:
        self.images += 1
        for j, matrix in enumerate(self.matrices):
            matrix.matrix += record[f"cm{j}"]
        self.seconds += record["seconds"]
        self.post_seconds += record["postprocess_seconds"]
        self.generator_seconds += float(record["generator_seconds"])

    @staticmethod
    def merge(parts: list["_Totals"]) -> "_Totals":
        total = parts[0]
        for part in parts[1:]:
            for mine, theirs in zip(total.matrices, part.matrices):
                mine.merge(theirs)
            total.images += part.images
            total.seconds += part.seconds
            total.post_seconds += part.post_seconds
            total.generator_seconds += part.generator_seconds
            total.log.merge(part.log)
        return total


def score_methods(
    segmenter: Segmenter,
    chains: Mapping[str, Chain],
    steps: Mapping[str, Sequence[str]],
    dataset: Any,
    out: Path,
    keys: ResultKey,
    protocol: str,
    panels: int = 0,
    options: RunOptions = RunOptions(),
    desc: str = "evaluate",
) -> dict[str, Any]:
    """mIoU and seconds per image of every chain over `dataset`; resumable (module doc).

    chains: method name -> chain, all run on one generator pass per image; steps: each method's
    step names, reported with its scores; protocol: the test protocol's name, for the results;
    panels: side-by-side panels (image, ground truth, one column per method) of the first N
    images. An image that cannot be read or segmented (missing, corrupt, too large or too small,
    bad label values) stops the run (on_error=stop) or is skipped and listed under "failed"
    (on_error=skip); metrics are then over the images that ran. The first batch a rank computes
    runs twice and is timed the second time (the first compiles kernels). desc: the progress bar's name.
    """
    out = Path(out)
    names = list(chains)
    k = len(segmenter.class_names)
    ignore = dataset.ignore_index
    totals = _Totals([ConfusionMatrix(k, ignore_index=ignore) for _ in names])
    warm = [False]
    palette = voc_palette(256)

    def predict(items: list[Prepared]) -> list[tuple[dict, np.ndarray | None]]:
        images = [it.sample.image for it in items]
        if not warm[0]:
            segmenter.predict_batch(images, chains, keep_probs=False)
            warm[0] = True
        batch = segmenter.predict_batch(images, chains, keep_probs=False)
        results = []
        for item, preds in zip(items, batch):
            record = {"methods": np.array(names)}
            record["seconds"] = np.array(
                [sum(v for s, v in preds[m].times.items() if s not in ("generator", "postprocess")) for m in names])
            record["postprocess_seconds"] = np.array([preds[m].times["postprocess"] for m in names])
            record["generator_seconds"] = np.array(preds[names[0]].times["generator"])
            for j, m in enumerate(names):
                record[f"cm{j}"] = ConfusionMatrix(k, ignore_index=ignore).update(preds[m].labels, item.sample.label).matrix
            panel = None
            if item.index < panels:
                columns = [("image", item.sample.image), ("ground truth", item.sample.label)]
                columns += [(m, p.labels) for m, p in preds.items()]
                panel = make_panel(columns, class_names=segmenter.class_names, palette=palette)
            results.append((record, panel))
        return results

    def finish(item: Prepared, result: tuple[dict, np.ndarray | None] | None) -> None:
        record = item.saved
        if result is not None:
            record, panel = result
            record["key"] = np.array(json.dumps(item.key))
            record["inputs"] = np.array(json.dumps(item.inputs))
            if panel is not None:
                save_rgb(output_path(out, "panels", f"{item.name}.png"), panel)
            _save(output_path(out, "per_image", f"{item.name}.npz"), record)
        totals.log.add(item.reason)
        totals.add(record)

    barrier(options.info)
    start = time.perf_counter()
    failures = run_items(len(dataset), _Reader(dataset, out, keys, names, k), predict, finish, options, desc=desc)
    merged = _Totals.merge(all_gather_object(totals, options.info))
    wall = time.perf_counter() - start
    check_some_succeeded(failures.items, len(dataset))
    n = max(merged.images, 1)
    computed = sum(merged.log.not_reused.values())
    return {
        "images": merged.images,
        **merged.log.summary(),
        "failed": failures.items,
        "protocol": protocol,
        "generator": segmenter.generator.name,
        "classes": list(segmenter.class_names),
        "generator_seconds_per_image": merged.generator_seconds / n,
        "wall_seconds": wall,
        "images_per_second": computed / wall if wall > 0 else 0.0,
        "processes": options.info.world_size,
        "methods": {
            m: {"steps": list(steps[m]), "seconds_per_image": merged.seconds[j] / n,
                "postprocess_seconds_per_image": merged.post_seconds[j] / n, **merged.matrices[j].compute()}
            for j, m in enumerate(names)
        },
    }

