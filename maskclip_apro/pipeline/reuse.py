"""When a result saved by an earlier run may stand in for recomputing it.

A saved per-image result carries the key it was made under: the package version, the
identity of the CLIP weights, a digest of the config entries that decide results (model,
generator with its test protocol, background, refiners, dataset settings and the command's own,
such as the compared methods), the vocabulary, and a digest of the bytes of the input image and
label files (or the parameters of a generated sample). A rerun reuses a result only when every
part matches, and counts the others by the first part that differs. So that a rerun does not read
every input again, a record also keeps each input file's identity (data.base.file_identity:
inode, size, modification and status-change times) with its digest: a file whose identity is
unchanged is not re-read.
Where the data lives (dataset.root, input) and how much of it runs (limit) are not part of the
key: the file fingerprints say whether the inputs are the same.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any, Mapping, Sequence

from .. import __version__
from ..data.base import Source, file_digest

RESULT_KEYS = ("model", "generator", "background", "refine", "dataset")
NOT_RESULTS = {"generator": ("cache_dir",), "dataset": ("root", "limit", "classes")}
KEY_PARTS = {  # part of the key -> reason given when it differs
    "version": "package version",
    "weights": "weights",
    "config": "config",
    "vocab": "vocabulary",
    "image": "image file",
    "label": "label file",
}


def digest(payload: Any) -> str:
    """Short stable hash of JSON-able data."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultKey:
    """The key of every per-image result of one run (module doc)."""

    def __init__(self, resolved: Mapping[str, Any], class_names: Sequence[str], weights: str,
                 extra: Mapping[str, Any]) -> None:
        """resolved: the run's config as plain data; weights: the generator's identity; extra: the
        command's own settings that decide its results (compared methods, overlay opacity)."""
        config = {}
        for name in RESULT_KEYS:
            block = resolved.get(name)
            if isinstance(block, dict):
                block = {k: v for k, v in block.items() if k not in NOT_RESULTS.get(name, ())}
            config[name] = block
        self.common = {
            "version": __version__,
            "weights": weights,
            "config": digest({**config, **extra}),
            "vocab": digest(list(class_names)),
        }

    def of(self, source: Source, known: Mapping[str, Any] | None = None) -> tuple[dict[str, str | None], dict]:
        """The key of one sample's result, and what its record keeps so that a rerun need not read
        unchanged input files again: each input file's [identity, digest]. known: that part of
        an earlier record."""
        key: dict[str, str | None] = {**self.common, "image": source.image, "label": source.label}
        inputs = {}
        for part, path in source.files.items():
            saved = (known or {}).get(part) if isinstance(known, Mapping) else None
            identity, key[part] = file_digest(path, tuple(saved) if isinstance(saved, (list, tuple)) else None)
            inputs[part] = [identity, key[part]]
        return key, inputs


def stale_reason(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str | None:
    """None when a saved key matches, else why the result must be recomputed."""
    if saved is None:
        return "new"
    for part, reason in KEY_PARTS.items():
        if saved.get(part) != current.get(part):
            return reason
    return None


class ReuseLog:
    """How many results were reused and, for the others, why not ("new" when there was none)."""

    def __init__(self) -> None:
        self.reused = 0
        self.not_reused: Counter[str] = Counter()

    def add(self, reason: str | None) -> None:
        if reason is None:
            self.reused += 1
        else:
            self.not_reused[reason] += 1

    def merge(self, other: "ReuseLog") -> None:
        """Add another log's counts (another rank's)."""
        self.reused += other.reused
        self.not_reused.update(other.not_reused)

    def summary(self) -> dict[str, Any]:
        return {"reused": self.reused, "not_reused": dict(sorted(self.not_reused.items()))}

    @staticmethod
    def describe(summary: Mapping[str, Any]) -> str:
        """Part of a line from a summary: how many reused, how many computed and why."""
        counts = summary["not_reused"]
        why = ", ".join(f"{n} {reason}" for reason, n in counts.items())
        return f"{summary['reused']} reused" + (f", {sum(counts.values())} computed ({why})" if counts else "")


def read_key(text: str) -> dict[str, Any]:
    """A key saved as JSON text; ValueError when the text is not one."""
    key = json.loads(text)
    if not isinstance(key, dict):
        raise ValueError(f"a saved key is a JSON object, got {type(key).__name__}")
    return key
