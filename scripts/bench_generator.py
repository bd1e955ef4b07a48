"""Seconds per image of the generator forward (and the one-off text classifier build), per dense mode.

    python scripts/bench_generator.py                                   # tiny_vit, random weights
    python scripts/bench_generator.py --model ViT-B-16 --pretrained none  # real architecture, random weights
    python scripts/bench_generator.py --protocol clip                   # short side 448, sliding windows
    python scripts/bench_generator.py --model ViT-B-16 --protocol sclip --dense maskclip,sclip,naclip,clearclip

With several --dense modes each forward time is also given as a ratio to the first mode's,
measured in the same run (proxyclip adds a random-weight DINO ViT-B/8, or tiny_dino for tiny_vit).

`--pretrained none` builds random weights, so the real architecture is timed without a download.
The text cache goes to a fresh temporary folder so the text build is timed too (in the first mode's build).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch

from maskclip_apro.data import load_vocab
from maskclip_apro.config import compose, generator_kwargs
from maskclip_apro.generator import build_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_vit")
    ap.add_argument("--pretrained", default="none", help="'none' for random weights, a tag, or a file")
    ap.add_argument("--size", default="375x500", help="input HxW (VOC-like default)")
    ap.add_argument("--protocol", default="maskclip", choices=("maskclip", "clip", "sclip", "naclip", "clearclip",
                    "proxyclip"), help="conf/protocol/: maskclip (keep-ratio (2048, 512), whole image), clip (short "
                    "side --short-side, --window every --stride) or a harness (its own defaults)")
    ap.add_argument("--dense", default="maskclip", help="comma-separated model.dense modes")
    ap.add_argument("--short-side", type=int, default=448)
    ap.add_argument("--window", type=int, default=448)
    ap.add_argument("--stride", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained

    classes = load_vocab("voc21")
    image = torch.rand(1, 3, h, w, device=args.device)
    first = None
    cache = tempfile.mkdtemp()  # shared by the modes: only the first build encodes the text
    for dense in args.dense.split(","):
        torch.manual_seed(0)
        start = time.perf_counter()
        overrides = [f"protocol={args.protocol}", f"generator.cache_dir={cache}", f"model.dense={dense}",
                     "model.vfm.pretrained=null"]
        if args.model == "tiny_vit":
            overrides.append("model.vfm.name=tiny_dino")
        if args.protocol == "clip":
            overrides += [f"generator.short_side={args.short_side}", f"generator.window={args.window}",
                          f"generator.stride={args.stride}"]
        settings = generator_kwargs(compose("evaluate", overrides))
        settings.pop("class_file", None)
        gen = build_generator(args.model, pretrained, classes, device=args.device, **settings)
        build = time.perf_counter() - start
        out = gen(image)  # warm-up
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            gen(image)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        first = median if first is None else first
        print(
            f"model={args.model} pretrained={args.pretrained} protocol={args.protocol} dense={dense} input={h}x{w} -> "
            f"{tuple(out.image.shape[-2:])} grid={tuple(out.logits.shape[-2:])} threads={torch.get_num_threads()}"
        )
        print(f"  build (weights + text classifier, {len(classes)} classes): {build:.2f} s")
        print(f"  forward: {median:.3f} s/image (median of {args.repeats}; min {min(times):.3f}); "
              f"{median / first:.2f}x the first mode")
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
