"""Labels at the input size: segmenter.labels_at against upsampling every class map to full size.

    python scripts/bench_labels.py --size 4000 6000 --classes 21 171

The baseline is the obvious form: F.interpolate of the (K, h, w) probabilities to (H, W) in
chunks of 32 classes, then the argmax. Each method runs in a fresh process; its peak is the
resident memory it adds over what the process held before the call (Linux: VmHWM, reset first). Probability maps are synthetic, at a 512-pixel long side
(APro's guidance resolution): "regions" (softmax of blocky class regions plus noise) and
"flat" (nearly uniform, every class close everywhere: the hard case for labels_at).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch, torch.nn.functional as F
from maskclip_apro.segmenter import labels_at

method, kind, k, height, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
scale = 512 / max(height, width)
h, w = max(1, round(height * scale)), max(1, round(width * scale))
g = torch.Generator().manual_seed(0)
if kind == "regions":
    blocks = torch.randint(0, k, (1, 1, h // 16 + 1, w // 16 + 1), generator=g).float()
    regions = F.interpolate(blocks, size=(h, w), mode="nearest").long()[:, 0]
    logits = 6 * F.one_hot(regions, k).permute(0, 3, 1, 2).float() + 0.5 * torch.randn(1, k, h, w, generator=g)
else:
    logits = 0.01 * torch.randn(1, k, h, w, generator=g)
probs = torch.softmax(logits, dim=1)


def baseline(p, size):
    best = idx = None
    for start in range(0, p.shape[1], 32):
        val, arg = F.interpolate(p[:, start:start + 32], size=size, mode="bilinear", align_corners=False).max(dim=1)
        arg += start
        if best is None:
            best, idx = val, arg
        else:
            better = val > best
            best, idx = torch.where(better, val, best), torch.where(better, arg, idx)
    return idx


def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


run = labels_at if method == "labels_at" else baseline
run(probs, (h, w))  # warm up at the small size
del logits
before = status_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # restart the peak (VmHWM) from the current size
    f.write("5")
start = time.perf_counter()
labels = run(probs, (height, width))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": status_mb("VmHWM") - before, "checksum": int(labels.sum())}))
"""


def measure(method: str, kind: str, k: int, height: int, width: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, method, kind, str(k), str(height), str(width)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[4000, 6000], metavar=("H", "W"))
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 171])
    args = parser.parse_args()
    height, width = args.size
    print(f"output {height} x {width}; probabilities at long side 512; peak = resident memory added by the call")
    print(f"{'K':>4} {'maps':>8} | {'baseline s':>10} {'MB':>7} | {'labels_at s':>11} {'MB':>7} | {'time ratio':>10} {'memory ratio':>12}")
    for k in args.classes:
        for kind in ("regions", "flat"):
            base = measure("baseline", kind, k, height, width)
            ours = measure("labels_at", kind, k, height, width)
            print(f"{k:>4} {kind:>8} | {base['seconds']:>10.2f} {base['peak_mb']:>7.0f} | {ours['seconds']:>11.2f} "
                  f"{ours['peak_mb']:>7.0f} | {ours['seconds'] / base['seconds']:>10.2f} "
                  f"{ours['peak_mb'] / max(base['peak_mb'], 1):>12.3f}")


if __name__ == "__main__":
    main()
