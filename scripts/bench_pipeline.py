"""Throughput of the refine command: batch size, read-ahead workers and processes, against one baseline.

    python scripts/bench_pipeline.py                                  # tiny random-weight model, synthetic images
    python scripts/bench_pipeline.py --model vit_b16 --device cuda --images 256 --size 512 640

Every configuration refines the same synthetic images (all of one size, so batches fill) into a
fresh folder; images/s is refine's own figure (images refined over the wall time of the loop,
all processes together; building the model is not counted). Each ratio is against the baseline
(batch_size=1, workers=0, one process) measured in the same run, best of --repeats. On a CPU
the processes share its cores: one process gets `--threads` torch and numba threads, each of
several gets --threads / processes. Progress bars go to stderr (2>/dev/null hides them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import tempfile
from pathlib import Path

import torch


def _overrides(args: argparse.Namespace, out: Path, batch_size: int, workers: int) -> list[str]:
    return [
        f"model={args.model}", "dataset=synthetic", f"dataset.num_images={args.images}",
        f"dataset.size=[{args.size[0]},{args.size[1]}]", f"refine={args.refine}", f"device={args.device}",
        f"batch_size={batch_size}", f"workers={workers}", f"output_dir={out}",
        f"generator.cache_dir={out.parent / 'text_cache'}",
    ]


def _threads(count: int) -> None:
    """torch's and numba's threads (the CPU GP kernels run images of a batch in parallel)."""
    import numba

    torch.set_num_threads(count)
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))


def _refine(overrides: list[str]) -> dict:
    """refine's summary; what the command prints is dropped."""
    from maskclip_apro.cli import refine
    from maskclip_apro.config import compose

    with contextlib.redirect_stdout(io.StringIO()):
        return refine.run(compose("refine", overrides))


def _rank(rank: int, world: int, port: int, device: str, overrides: list[str], warm: list[str], threads: int,
          result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    _threads(threads)
    from maskclip_apro.distributed import process_group

    with process_group(device):
        _refine(warm)  # a fresh process loads its compiled kernels, as the parent did before the baseline
        summary = _refine(overrides)
    if rank == 0:
        Path(result).write_text(json.dumps(summary, default=float))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace, root: Path, batch_size: int, workers: int, processes: int) -> float:
    """Best images/s over the repeats, each into a fresh output folder."""
    import torch.multiprocessing as mp

    best = 0.0
    for repeat in range(args.repeats):
        out = root / f"b{batch_size}_w{workers}_p{processes}_{repeat}"
        overrides = _overrides(args, out, batch_size, workers)
        if processes == 1:
            _threads(args.threads)
            summary = _refine(overrides)
        else:
            result = out.parent / f"{out.name}.json"
            threads = max(1, args.threads // processes)
            warm = _overrides(args, out.parent / f"{out.name}_warm", batch_size, workers) + [f"limit={2 * processes}"]
            mp.spawn(_rank, args=(processes, _free_port(), args.device, overrides, warm, threads, str(result)), nprocs=processes)
            summary = json.loads(result.read_text())
        best = max(best, summary["images_per_second"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_vit")
    parser.add_argument("--refine", default="apro", help="refine preset (conf/refine/)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (several processes: cuda:<rank> each, NCCL)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=[128, 160], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--processes", type=int, default=2, help="process count of the multi-process row")
    args = parser.parse_args()

    rows = [("baseline: batch_size=1, workers=0, 1 process", 1, 0, 1),
            ("batch_size=4", 4, 0, 1),
            ("workers=2", 1, 2, 1),
            ("batch_size=4, workers=2", 4, 2, 1),
            (f"{args.processes} processes", 1, 0, args.processes)]
    with tempfile.TemporaryDirectory() as tmp:
        _refine(_overrides(args, Path(tmp) / "warm", 1, 0) + ["limit=2"])  # text cache, kernel compilation
        speeds = [(name, measure(args, Path(tmp), b, w, p)) for name, b, w, p in rows]
    print(f"refine={args.refine}, model={args.model}, {args.images} synthetic images of {args.size[0]}x{args.size[1]}, "
          f"device={args.device}, torch {torch.__version__}, {args.threads} thread(s) in all, best of {args.repeats}")
    print("\n| configuration | images/s | vs baseline |\n|---|---:|---:|")
    base = speeds[0][1]
    for name, speed in speeds:
        print(f"| {name} | {speed:.2f} | {speed / base:.2f}x |")


if __name__ == "__main__":
    main()
