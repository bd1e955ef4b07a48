#!/usr/bin/env bash
# The first-GPU check, in one call from the repository root (docs/kernels.md, "GPU check"):
#
#   bash scripts/gpu_check.sh                 # the installed environment (the device machine has no network)
#   bash scripts/gpu_check.sh --install       # first: pip install "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
#   bash scripts/gpu_check.sh --dry           # no GPU: skips the CUDA parts, small CPU runs of the rest
#   bash scripts/gpu_check.sh --out DIR       # output folder (default ./gpu_check_out)
#
# Steps (each logged to DIR/<step>.log, with its status and seconds in DIR/summary.md):
#   gpu        the card, driver and torch / triton versions
#   tier       pytest -m cuda (tests/test_cuda.py), Triton compiled for the GPU (TRITON_INTERPRET=0)
#   memcheck   compute-sanitizer memcheck on scripts/gpu_check_gp.py (tree + GP + LP), when the toolkit is present
#   bench      scripts/bench_apro.py --device cuda: every stage at 512 and 1024 px, K 21 / 171, batch 1 / 16,
#              then the CPU path beside the GPU path at 512 px, batch 1 (JSON in DIR/bench_*.json)
#   refine_*   refine images/s, model=vit_b16 model.pretrained=null (random weights: nothing downloads),
#              512x512 synthetic images, precision fp32 and fp16
# GPU_CHECK_DRY=1 is --dry. Budget: under 5 minutes on one H100; each step has its own time limit, all
# together 570 s, so one 10-minute device call always ends with a summary (PYTHON=... picks the interpreter).
# Everything is written under the output folder, Triton's and the text-embedding caches included
# (numba keeps its cache with the installed kernels, as in any run: docs/kernels.md).
set -u -o pipefail

OUT=./gpu_check_out
DRY=${GPU_CHECK_DRY:-0}
INSTALL=0
PY=${PYTHON:-python}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry) DRY=1 ;;
        --install) INSTALL=1 ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -f scripts/gpu_check.sh ] || { echo "error: run from the repository root (bash scripts/gpu_check.sh)" >&2; exit 2; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.tsv"
: > "$STEPS"
export TRITON_CACHE_DIR="$OUT/cache/triton" MPLCONFIGDIR="$OUT/cache/matplotlib"

# step NAME LIMIT_SECONDS COMMAND...: run, log, and record status and seconds (124: over its limit)
step() {
    local name=$1 limit=$2 start rc ms
    shift 2
    [ "$DRY" = 1 ] && limit=300  # the limits budget a GPU; a busy CPU may need more
    echo "== $name: $*" | tee "$OUT/$name.log"
    start=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf '%s\t%s\t%d.%d\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000 / 100)) >> "$STEPS"
    tail -n 3 "$OUT/$name.log"
}
# parallel NAME LIMIT COMMAND...: `step`, in the background on a dry run (small CPU jobs: both cores), in turn on a GPU
parallel() { if [ "$DRY" = 1 ]; then step "$@" & else step "$@"; fi; }
skip() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$STEPS"; echo "== $1: skipped ($2)"; }

if [ "$INSTALL" = 1 ]; then
    step install 600 "$PY" -m pip install "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
fi

parallel gpu 30 bash -c "command -v nvidia-smi >/dev/null && nvidia-smi; $PY - <<'EOF'
import platform, torch, triton
print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')
print(f'GPU: {torch.cuda.get_device_name(0)}' if torch.cuda.is_available() else 'GPU: none (torch finds no CUDA device)')
raise SystemExit(0 if torch.cuda.is_available() or $DRY == 1 else 1)
EOF"

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    skip tier "dry run"
    parallel memcheck_dry 120 "$PY" scripts/gpu_check_gp.py --device cpu --backend cpu --sizes 16 --classes 3
    parallel bench 120 "$PY" scripts/bench_apro.py --device cpu --sizes 32 --ks 3 --batches 1 --repeats 1 \
        --json "$OUT/bench_gpu.json"
    skip bench_cpu_path "dry run"
    REFINE=(model=tiny_vit dataset.size=64 dataset.num_images=1 refine=none)
    PRECISIONS="fp16"  # the loop's plumbing; fp32 is the same command
else
    DEVICE=cuda
    step tier 150 env TRITON_INTERPRET=0 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider --basetemp "$OUT/pytest" tests
    SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ -n "$SANITIZER" ]; then
        step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 TRITON_INTERPRET=0 "$SANITIZER" --tool memcheck \
            --error-exitcode 1 --report-api-errors no --print-limit 20 "$PY" scripts/gpu_check_gp.py
    else
        skip memcheck "compute-sanitizer not found (CUDA toolkit not installed)"
    fi
    step bench 120 env TRITON_INTERPRET=0 "$PY" scripts/bench_apro.py --device cuda --no-cpu-path \
        --json "$OUT/bench_gpu.json"
    step bench_cpu_path 60 env TRITON_INTERPRET=0 "$PY" scripts/bench_apro.py --device cuda --sizes 512 \
        --batches 1 --json "$OUT/bench_cpu_path.json"
    REFINE=(model=vit_b16 model.pretrained=null dataset.size=512 dataset.num_images=32)
    PRECISIONS="fp32 fp16"
fi

for precision in $PRECISIONS; do
    parallel "refine_$precision" 60 env TRITON_INTERPRET=0 "$PY" scripts/refine.py dataset=synthetic "${REFINE[@]}" \
        device=$DEVICE precision=$precision overwrite=true "generator.cache_dir=$OUT/cache/text" \
        "output_dir=$OUT/refine_$precision"
done
wait

"$PY" - "$OUT" "$DRY" <<'EOF' | tee "$OUT/summary.md"
"""summary.md: every step's status and time, the card, the bench rows and the refine throughput."""
import json, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
print(f"# GPU check{' (dry run: no GPU used)' if dry else ''}\n")
gpu = [l for l in (out / "gpu.log").read_text().splitlines() if l.startswith(("GPU:", "python "))]
print("\n".join(f"- {l}" for l in gpu) + "\n")
print("| step | status | seconds | note |\n|---|---|---:|---|")
for name, status, seconds, *note in steps:
    word = {"0": "ok", "124": "TIMED OUT", "137": "KILLED", "skipped": "skipped"}.get(status, f"FAILED ({status})")
    log = out / f"{name}.log"
    last = [l for l in log.read_text().splitlines() if l.strip()][-1:] if log.exists() else []
    print(f"| {name} | {word} | {seconds} | {(note or last or [''])[0][:160]} |")
for name in ("bench_gpu", "bench_cpu_path"):
    path = out / f"{name}.json"
    if path.exists():
        rows = json.loads(path.read_text())["rows"]
        keys = [k for k in rows[0] if k.endswith(("_ms", "_mib", "error"))] if rows else []
        print(f"\n## {name} (ms; {path.name})\n\n| size | K | B | " + " | ".join(keys) + " |")
        print("|" + "---:|" * (3 + len(keys)))
        for r in rows:
            cells = [r.get(k) for k in keys]
            text = [f"{c:.2f}" if isinstance(c, float) else ("—" if c is None else str(c)) for c in cells]
            print(f"| {r['size']} | {r['K']} | {r['batch']} | " + " | ".join(text) + " |")
print("\n## refine\n\n| precision | device | images | images/s | seconds per image by stage |\n|---|---|---:|---:|---|")
for precision in ("fp32", "fp16"):
    path = out / f"refine_{precision}" / "summary.json"
    if path.exists():
        s = json.loads(path.read_text())
        stages = ", ".join(f"{k} {v:.4f}" for k, v in s["seconds_per_image"].items())
        print(f"| {s['precision']} | {s['device']} | {s['refined']} | {s['images_per_second']:.2f} | {stages} |")
failed = [name for name, status, *_ in steps if status not in ("0", "skipped")]
print(f"\n{'all steps passed' if not failed else 'FAILED: ' + ', '.join(failed)} -> {out}")
sys.exit(1 if failed else 0)
EOF
