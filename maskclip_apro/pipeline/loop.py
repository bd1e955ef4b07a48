"""The per-image loop of refine, evaluate and compare: shards, read-ahead, batches, failures.

Under torchrun each rank takes every world_size-th item (distributed.shard), so the ranks'
shards are disjoint and together hold every item once. Reading an item (its saved record, its
decoded image and label) happens in DataLoader worker processes (`workers`; 0 = this process),
ahead of the model. Items whose saved result is reused go straight to the runner; the others
wait in one bucket per image size until `batch_size` of one size are there, which then go
through the model together (images are never padded or resized to share a batch, so each image
sees the geometry it would see alone). At most MAX_PENDING_BATCHES batches' worth of images
wait: past that the fullest bucket runs as it is, and every bucket runs at the end.

A batch that fails is retried image by image, so a bad image is reported by name and the
others still run. A failing image is listed and skipped (on_error=skip) or stops the run
(on_error=stop). Any rank's exception ends every rank: after each SYNC_ITEMS items the ranks
check together whether one has failed (one small all-reduce), so none waits for a rank that has
stopped; the failed rank raises its error and the others raise one naming it.
"""

from __future__ import annotations

import functools
import itertools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.base import Sample
from ..data.io import max_image_pixels, set_max_image_pixels
from ..distributed import DistInfo, all_gather_object, any_rank, shard

SYNC_ITEMS = 32  # items a rank reads between two checks that no rank has failed
MAX_PENDING_BATCHES = 4  # images waiting for a full batch of their size, in batches


@dataclass(frozen=True)
class RunOptions:
    """How a per-image job runs: batch size, read-ahead worker processes, what a bad image does,
    and which rank of how many this process is."""

    batch_size: int = 1
    workers: int = 0
    on_error: str = "stop"
    info: DistInfo = field(default_factory=DistInfo)

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            low = 1 if name == "batch_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.on_error not in ("skip", "stop"):
            raise ValueError(f"on_error must be skip or stop, got {self.on_error!r}")


@dataclass
class Prepared:
    """One item as a read-ahead worker hands it over.

    reason: why its result must be computed (None: the saved result is reused); key: what its
    result is made under and inputs: the identities of its input files (pipeline.reuse);
    sample: the decoded image and label, when needed; read_seconds: the time decoding them took;
    saved: what the runner read back for a reused item; error: why the item could not be read.
    """

    index: int
    name: str
    reason: str | None = None
    key: dict | None = None
    inputs: dict | None = None
    read_seconds: float = 0.0
    sample: Sample | None = None
    saved: Any = None
    error: Exception | None = None


class Failures:
    """Images that could not be processed, under on_error: "stop" re-raises, "skip" lists them."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self.entries: list[tuple[int, str, str]] = []  # (item index, name, error)

    def add(self, index: int, name: str, error: Exception) -> None:
        if self.on_error == "stop":
            raise error
        self.entries.append((index, name, str(error)))
        tqdm.write(f"skipped {name}: {error}", file=sys.stderr)

    @property
    def items(self) -> list[dict[str, str]]:
        """name and error of each failed image, in dataset order."""
        return [{"name": name, "error": error} for _, name, error in sorted(self.entries)]


def check_some_succeeded(failed: Sequence[Mapping[str, str]], total: int) -> None:
    """Every image failing (`failed`: Failures.items) is a run failure, not a list of skips."""
    if total and len(failed) == total:
        raise ValueError(f"all {total} images failed; first, {failed[0]['name']}: {failed[0]['error']}")


class _ReadAhead(Dataset):
    """Item j of this rank's shard, prepared by `prepare` (in a DataLoader worker when workers > 0)."""

    def __init__(self, indices: Sequence[int], prepare: Callable[[Prepared], None]) -> None:
        self.indices = indices
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> Prepared:
        item = Prepared(self.indices[j], str(self.indices[j]))
        try:
            self.prepare(item)
        except (ValueError, OSError) as error:
            item.error = error
        return item


def _as_is(item: Prepared) -> Prepared:
    return item


def run_items(
    count: int,
    prepare: Callable[[Prepared], None],
    predict: Callable[[list[Prepared]], list[Any]],
    finish: Callable[[Prepared, Any], None],
    options: RunOptions,
    desc: str = "images",
) -> Failures:
    """Run this rank's share of `count` items (module doc); returns every rank's failures.

    prepare(item) fills in a Prepared (read-ahead; it may raise ValueError / OSError for a bad
    item); predict(items) returns one result per item for images of one size (ValueError /
    OSError: the batch is retried image by image); finish(item, result) takes each item's result,
    or None for an item whose saved result is reused (its writes are not guarded: a failed write
    stops the run).
    """
    info = options.info
    indices = shard(count, info)
    failures = Failures(options.on_error)
    loader = DataLoader(
        _ReadAhead(indices, prepare), batch_size=None, shuffle=False, num_workers=options.workers,
        collate_fn=_as_is, worker_init_fn=functools.partial(_limit_pixels, max_image_pixels()),
    )
    pending: dict[tuple[int, int], list[Prepared]] = {}

    def run(batch: list[Prepared]) -> None:
        try:
            results = predict(batch)
        except (ValueError, OSError) as error:
            if len(batch) == 1:
                failures.add(batch[0].index, batch[0].name, error)
                return
            for item in batch:
                run([item])
            return
        for item, result in zip(batch, results):
            finish(item, result)

    def take(item: Prepared) -> None:
        if item.error is not None:
            failures.add(item.index, item.name, item.error)
        elif item.reason is None:
            finish(item, None)
        else:
            size = tuple(item.sample.image.shape[:2])
            bucket = pending.setdefault(size, [])
            bucket.append(item)
            if len(bucket) >= options.batch_size:
                run(pending.pop(size))
            elif sum(len(b) for b in pending.values()) > MAX_PENDING_BATCHES * options.batch_size:
                run(pending.pop(max(pending, key=lambda s: len(pending[s]))))

    per_rank = -(-count // info.world_size)
    error: Exception | None = None
    bar = tqdm(total=len(indices), desc=desc, unit="img", disable=not info.is_main)
    items = iter(loader)
    try:
        for _ in range(-(-per_rank // SYNC_ITEMS)):
            if error is None:
                try:
                    for item in itertools.islice(items, SYNC_ITEMS):
                        take(item)
                        bar.update(1)
                except Exception as e:  # noqa: BLE001 - every rank must learn of it (module doc)
                    error = e
            if any_rank(error is not None, info):
                break
        if error is None:
            try:
                while pending:
                    run(pending.pop(next(iter(pending))))
            except Exception as e:  # noqa: BLE001
                error = e
    finally:
        del items
        bar.close()
    return _merge_ranks(failures, error, count, info)


def _limit_pixels(limit: int, worker_id: int) -> None:
    """A read-ahead worker decodes under the run's image size limit (data.io.set_max_image_pixels)."""
    set_max_image_pixels(limit)


def _merge_ranks(failures: Failures, error: Exception | None, count: int, info: DistInfo) -> Failures:
    """Every rank's failures, or the error that stopped a rank raised on every rank."""
    parts = all_gather_object((None if error is None else f"{type(error).__name__}: {error}", failures.entries), info)
    if error is not None:
        raise error
    for rank, (message, _) in enumerate(parts):
        if message is not None:
            raise ValueError(f"rank {rank} of {info.world_size} stopped the run: {message}")
    merged = Failures(failures.on_error)
    merged.entries = sorted(entry for _, entries in parts for entry in entries)
    return merged
