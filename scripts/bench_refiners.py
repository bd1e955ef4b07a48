"""Seconds and peak memory per refiner (APro, PAMR, LPOSS, LPOSS+) on one 512 x 683 image, the same unary.

    python scripts/bench_refiners.py --device cpu                    # K 21 and 171
    python scripts/bench_refiners.py --device cuda --json gpu.json   # the same, with a record of every row
    python scripts/bench_refiners.py --device cpu --ks 21 --skip lposs_plus:171

The unary is what the SCLIP-family harness hands the refiners (generator/harness.py): windows of
224 pixels every 112 (24 windows), on each a 14 x 14 grid of random CLIP features (D 512) scored
against K random text embeddings, and random DINO-sized value features (C 768) for LPOSS; APro
and PAMR get softmax(40 cos) of the window-averaged cosines at the image size (guidance.grid the
32 x 43 patch grid), LPOSS and LPOSS+ the same windows' features. Refiner parameters are the
defaults of conf/_refine_params.yaml. The guide is scikit-image's astronaut resized to 512 x 683.

Each (refiner, K) runs in a fresh process: a warm-up on a small input (numba / Triton
compilation), then the best of --repeats. Peak memory: on CUDA torch.cuda.max_memory_allocated
during the call, less what was allocated before it; on the CPU the growth of the peak RSS over the
inputs already allocated (as scripts/bench_gp.py), the child's allocations above 64 KiB mapped
and unmapped one by one (MALLOC_MMAP_THRESHOLD_) so memory freed earlier does not hide it. Ratios are to APro's seconds at the same K in
the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import time

import torch
import torch.nn.functional as F

import bench_gp
from maskclip_apro.generator.slide import slide_boxes
from maskclip_apro.refiners import Chain, Guidance
from maskclip_apro.refiners.lposs import WindowScores, window_average
from maskclip_apro.writing import write_json

SIZE = (512, 683)
WINDOW, STRIDE, PATCH = 224, 112, 16
LOGIT_SCALE = 40.0
REFINERS = {"apro": ["apro"], "pamr": ["pamr"], "lposs": ["lposs"], "lposs_plus": ["lposs_plus"]}


def refine_params() -> dict:
    """The refiner parameters every command uses (conf/_refine_params.yaml)."""
    from omegaconf import OmegaConf

    from maskclip_apro.config import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/_refine_params.yaml"), resolve=True)


def make_inputs(k: int, size: tuple[int, int], device: torch.device, seed: int = 0) -> tuple[torch.Tensor, Guidance]:
    """The harness's probabilities (1, K, H, W) and guidance (with window scores) for a K-class unary."""
    gen = torch.Generator().manual_seed(seed)
    guide, _ = bench_gp.make_inputs(max(size), 1)
    image = F.interpolate(guide, size=size, mode="bilinear", align_corners=False).to(device)
    boxes = slide_boxes(size[0], size[1], WINDOW, STRIDE)
    grid = (min(WINDOW, size[0]) // PATCH, min(WINDOW, size[1]) // PATCH)
    features = torch.randn(1, len(boxes), 512, *grid, generator=gen).to(device)
    values = torch.randn(1, len(boxes), 768, *grid, generator=gen).to(device)
    text = F.normalize(torch.randn(k, 512, generator=gen), dim=-1).to(device)
    cos = torch.einsum("ndhw,kd->nkhw", F.normalize(features[0], dim=1), text)
    pixel_cos = window_average(list(cos), boxes, size)[None]
    windows = WindowScores(features=features, text=text, boxes=boxes, image=image, logit_scale=LOGIT_SCALE,
                           values=values, vfm_patch=PATCH)
    probs = torch.softmax(LOGIT_SCALE * pixel_cos, dim=1)
    grid_cells = (round(size[0] / PATCH), round(size[1] / PATCH))
    return probs, Guidance(image=image, grid=grid_cells, windows=windows)


def _child(name: str, k: int, device: str, repeats: int, queue) -> None:
    dev = torch.device(device)
    chain = Chain.from_steps(REFINERS[name], refine_params())
    small_probs, small_guidance = make_inputs(k, (240, 250), dev, seed=1)
    chain(small_probs, small_guidance)  # warm-up: compilation, caches
    probs, guidance = make_inputs(k, SIZE, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = bench_gp._rss_peak_kib(reset=True) * 1024
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = chain(probs, guidance)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds.append(time.perf_counter() - start)
        del out
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = bench_gp._rss_peak_kib(reset=False) * 1024 - base
    queue.put((min(seconds), peak / 2**20))


def measure(name: str, k: int, device: str, repeats: int) -> tuple[float, float]:
    """(best seconds, peak MiB) of one refiner at K classes, in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, k, device, repeats, queue))
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        proc.start()
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    result = queue.get()
    proc.join()
    return result


def to_markdown(rows: list[dict], device: str) -> str:
    lines = [f"Refiners on one {SIZE[0]} x {SIZE[1]} image, {device} ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads)", "",
             "| refiner | K | seconds | x APro | peak MiB |", "|---|---|---|---|---|"]
    for row in rows:
        if row.get("skipped"):
            lines.append(f"| {row['refiner']} | {row['k']} | skipped | | |")
            continue
        ratio = f"{row['ratio']:.1f}" if row.get("ratio") is not None else ""
        lines.append(f"| {row['refiner']} | {row['k']} | {row['seconds']:.3f} | {ratio} | {row['peak_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ks", type=int, nargs="+", default=[21, 171])
    parser.add_argument("--refiners", nargs="+", default=list(REFINERS), choices=list(REFINERS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], help="refiner:K pairs not to run (e.g. lposs_plus:171)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    rows = []
    for k in args.ks:
        apro_seconds = None
        for name in args.refiners:
            if f"{name}:{k}" in args.skip:
                rows.append(dict(refiner=name, k=k, skipped=True))
                continue
            seconds, peak = measure(name, k, args.device, args.repeats)
            if name == "apro":
                apro_seconds = seconds
            ratio = None if apro_seconds is None else seconds / apro_seconds
            rows.append(dict(refiner=name, k=k, seconds=seconds, peak_mib=peak, ratio=ratio))
            print(f"{name} K={k}: {seconds:.3f} s, peak {peak:.0f} MiB", flush=True)
    print(to_markdown(rows, args.device))
    if args.json:
        write_json(args.json, dict(device=args.device, size=list(SIZE), threads=torch.get_num_threads(), rows=rows))


if __name__ == "__main__":
    main()
