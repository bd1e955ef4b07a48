"""APro kernels stage by stage on one device: GP (weights, MST, sort, KRT, leaf ranges, propagation) and LP.

    python scripts/bench_apro.py --device cuda                  # 512 and 1024 px, K 21 / 171, batch 1 / 16
    python scripts/bench_apro.py --device cuda --json gpu.json  # the same, with a record of every row
    python scripts/bench_apro.py --device cpu --quick           # 128 and 256 px, batch 1 / 2 (a minute or two)
    python scripts/bench_apro.py --structure                    # launches, host reads, loops per stage (interpreter)

The device path is backend="triton" on CUDA and backend="cpu" on the CPU. On CUDA the CPU path
(backend="cpu" on the same CUDA tensors, host copies included) is timed once per row in the
same run. Stage times come from a run that synchronises around every stage; "GP total" (public
global_propagation) and "LP" (local_propagation, 20 iterations, 5x5) run without those
synchronisations. Best of --repeats after a warm-up that compiles every kernel. Peak memory is
torch.cuda.max_memory_allocated during the GP and LP calls (CUDA only; scripts/bench_gp.py
measures the CPU path's peak in a fresh process). Nothing needs the network: the guide is
scikit-image's astronaut.

--structure runs the triton backend under TRITON_INTERPRET=1 on one guide (default 512 px) and
counts, per stage, Triton launches, torch ops, host reads (synchronisations), rounds / levels
and the longest in-kernel loops: the structure of the GPU path where no GPU is at hand.
"""

from __future__ import annotations

import os
import sys

if "--structure" in sys.argv:  # Triton reads this when kernels are decorated, i.e. at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import torch  # noqa: E402

import bench_gp  # noqa: E402
from maskclip_apro.apro import global_propagation, local_propagation  # noqa: E402
from maskclip_apro.kernels import _triton, gp_tree, gp_tree_triton, registry  # noqa: E402
from maskclip_apro.writing import write_json  # noqa: E402

ZETA = bench_gp.ZETA
STAGES = ["weights", "mst", "sort", "krt", "leaf ranges", "propagate"]


def make_batch(size: int, k: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """B guides (flips and shifts of the astronaut) and softmax unaries (B, K, size, size) on `device`."""
    guide, _ = bench_gp.make_inputs(size, 1)
    variants = [guide, guide.flip(-1), guide.flip(-2), guide.transpose(-1, -2)]
    guides = torch.cat([variants[i % 4].roll(17 * (i // 4), dims=-1) for i in range(batch)]).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    unary = torch.rand(batch, k, size, size, device=device, generator=gen).softmax(1)
    return guides.contiguous(), unary


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


class StageTimer:
    """Stage hook for the tree builders: synchronise, time, accumulate (seconds) under the stage's column."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start


def tree_stages(guide: torch.Tensor, backend: str, repeats: int) -> dict[str, float]:
    """Best time of every tree stage over `repeats` builds."""
    build = gp_tree_triton.build_tree_triton if backend == "triton" else gp_tree.build_tree_cpu
    runs = []
    for _ in range(repeats):
        timer = StageTimer(guide.device)
        tree = build(guide, timer)
        runs.append(timer.seconds)
    return {name: min(r.get(name, float("nan")) for r in runs) for name in STAGES[:-1]}, tree


def cuda_peak(fn, device: torch.device) -> float:
    """Peak allocated CUDA memory (MiB) while fn runs, inputs included."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def run_rows(device: torch.device, sizes, ks, batches, repeats: int, cpu_path: bool, on_row=None) -> list[dict]:
    """Every (size, batch, K) row; `on_row(rows)` after each. A row whose inputs or temporaries do not
    fit in GPU memory is recorded with its error, and the next row runs."""
    rows: list[dict] = []
    on_row = on_row or (lambda rows: None)
    for size in sizes:
        for batch in batches:
            try:
                run_batch(device, size, ks, batch, repeats, cpu_path, rows, on_row)
            except torch.cuda.OutOfMemoryError as error:
                done = {r["K"] for r in rows if (r["size"], r["batch"]) == (size, batch)}
                for k in (k for k in ks if k not in done):
                    rows.append({"device": device.type, "size": size, "K": k, "batch": batch,
                                 "error": f"out of memory ({str(error).splitlines()[0][:120]})"})
                    print(f"| {size} | {k} | {batch} | {rows[-1]['error']} |", flush=True)
                    on_row(rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def run_batch(device, size: int, ks, batch: int, repeats: int, cpu_path: bool, rows: list, on_row) -> None:
    """The rows of one (size, batch): the tree's stages once, then propagation, GP and LP per K."""
    backend = "triton" if device.type == "cuda" else "cpu"
    guide, unary = make_batch(size, max(ks), batch, device)
    tree_stages(guide, backend, 1)  # warm-up: compiles every kernel of the tree build
    stages, tree = tree_stages(guide, backend, repeats)
    for k in ks:
        u = unary[:, :k].softmax(1).contiguous()
        flat = u.reshape(batch, k, -1)
        parts = (tree.order, tree.lo, tree.hi, tree.children, tree.altitude)
        propagate = lambda: registry.run("propagate", backend, flat, *parts, ZETA)  # noqa: E731
        gp = lambda: global_propagation(u, guide, ZETA, backend=backend)  # noqa: E731
        lp = lambda: local_propagation(u, guide, kernel_size=5, iters=20, backend=backend)  # noqa: E731
        gp(), lp()  # warm-up
        row = {"device": device.type, "size": size, "K": k, "batch": batch}
        row.update({f"{name}_ms": 1e3 * t for name, t in stages.items()})
        row["propagate_ms"] = 1e3 * best(propagate, repeats, device)
        row["gp_total_ms"] = 1e3 * best(gp, repeats, device)
        row["lp_ms"] = 1e3 * best(lp, repeats, device)
        if device.type == "cuda":
            row["peak_gp_mib"] = cuda_peak(gp, device)
            row["peak_lp_mib"] = cuda_peak(lp, device)
        if cpu_path and device.type != "cpu":
            row["cpu_gp_total_ms"] = 1e3 * best(lambda: global_propagation(u, guide, ZETA, backend="cpu"), 1, device)
            row["cpu_lp_ms"] = 1e3 * best(
                lambda: local_propagation(u, guide, kernel_size=5, iters=20, backend="cpu"), 1, device
            )
        rows.append(row)
        print(format_row(row), flush=True)
        on_row(rows)


COLUMNS = ["weights", "mst", "sort", "krt", "leaf ranges", "propagate", "gp_total", "lp"]


def header(device: torch.device, cpu_path: bool) -> str:
    names = ["size", "K", "B", "weights", "MST", "sort", "KRT", "leaf ranges", "propagate", "GP total", "LP 20 it",
             "peak GP / LP (MiB)"]
    if cpu_path and device.type != "cpu":
        names += ["CPU path GP", "CPU path LP"]
    return "| " + " | ".join(names) + " |\n|" + "---:|" * len(names)


def format_row(row: dict) -> str:
    def ms(key):
        value = row.get(f"{key}_ms")
        return "—" if value is None or value != value else f"{value:.2f}"

    peak = f"{row['peak_gp_mib']:.0f} / {row['peak_lp_mib']:.0f}" if "peak_gp_mib" in row else "—"
    cells = [str(row["size"]), str(row["K"]), str(row["batch"]), *(ms(c) for c in COLUMNS), peak]
    if "cpu_gp_total_ms" in row:
        cells += [ms("cpu_gp_total"), ms("cpu_lp")]
    return "| " + " | ".join(cells) + " |"


# ----------------------------------------------------------------------------------------------
# structure (interpreter)

_FREE_OPS = {  # aten calls that launch no kernel: views, allocations, metadata
    "view", "_unsafe_view", "expand", "slice", "select", "unsqueeze", "squeeze", "permute", "t", "transpose",
    "as_strided", "alias", "detach", "empty", "empty_like", "empty_strided", "lift_fresh", "_reshape_alias",
    "unbind", "split", "reshape", "contiguous", "new_empty", "resize_",
}
_SYNC_OPS = {"nonzero", "masked_select", "_local_scalar_dense", "item", "unique", "_unique2"}  # output needs the host


class Counter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts torch ops (outside Triton launches), Triton launches per kernel and host reads, per stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = "other"
        self.table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.inside_triton and name not in _FREE_OPS:
            self.table[self.stage]["torch ops"] += 1
            if name in _SYNC_OPS:
                self.table[self.stage]["host reads"] += 1
        return out

    @contextlib.contextmanager
    def at(self, name: str):
        previous, self.stage = self.stage, name
        yield
        self.stage = previous


def structure(size: int, k: int, lp_size: int) -> list[dict]:
    """Run the triton backend under the interpreter and count what a GPU would execute, per stage."""
    if not _triton.INTERPRETED:
        raise SystemExit("--structure needs TRITON_INTERPRET=1 set before the kernels are imported")
    from triton.runtime.interpreter import InterpretedFunction

    counter = Counter()
    original = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        counter.table[counter.stage][f"launch:{self.fn.__name__}"] += 1
        counter.inside_triton += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.inside_triton -= 1

    guide, unary = make_batch(size, k, 1, torch.device("cpu"))
    lp_guide, lp_unary = make_batch(lp_size, k, 1, torch.device("cpu"))
    InterpretedFunction.run = counted
    try:
        with counter:
            tree = gp_tree_triton.build_tree_triton(guide, counter.at)
            with counter.at("propagate"):
                parts = (tree.order, tree.lo, tree.hi, tree.children, tree.altitude)
                registry.run("propagate", "triton", unary.reshape(1, k, -1), *parts, ZETA)
            with counter.at(f"LP 20 it ({lp_size} px)"):
                registry.run("local_propagation", "triton", lp_unary, lp_guide, 0.15, 5, 20)
    finally:
        InterpretedFunction.run = original
    cpu = gp_tree.build_tree_cpu(guide)
    if not all(torch.equal(getattr(tree, f), getattr(cpu, f)) for f in gp_tree.Tree.ARRAYS):
        raise AssertionError("the triton tree differs from the cpu tree")
    trips = {name: t.tolist() for name, t in gp_tree_triton.TRIPS.items()}
    rows = []
    for stage, counts in counter.table.items():
        launches = {key[7:]: v for key, v in counts.items() if key.startswith("launch:")}
        loops = sum(sum(trips[name]) for name in launches if name in trips)
        rounds = {"mst": launches.get("_mst_union_kernel", 0), "krt": launches.get("_krt_hook_kernel", 0),
                  "leaf ranges": launches.get("_rank_kernel", 0)}.get(stage, 0)
        rows.append({
            "stage": stage, "triton_launches": sum(launches.values()), "kernels": launches,
            "torch_ops": counts["torch ops"], "host_reads": counts["host reads"], "rounds": rounds,
            "loop_trips": loops, "longest_loop": max((max(trips[n]) for n in launches if n in trips), default=0),
            "chain": sum(launches.values()) + counts["torch ops"] + loops,
        })
    return rows


def structure_table(rows: list[dict], size: int) -> str:
    lines = [
        f"Triton backend under TRITON_INTERPRET=1, one {size}x{size} guide (tree identical to the cpu backend's)",
        "",
        "| stage | Triton launches | torch ops | host reads | rounds / levels / jumps | longest in-kernel loop "
        "| loop trips, all launches | sequential chain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['triton_launches']} | {r['torch_ops']} | {r['host_reads']} | {r['rounds'] or '—'} "
            f"| {r['longest_loop'] or '—'} | {r['loop_trips'] or '—'} | {r['chain']} |"
        )
    lines += ["", "kernels per stage: " + "; ".join(
        f"{r['stage']}: " + ", ".join(f"{k} x{v}" for k, v in r["kernels"].items()) for r in rows if r["kernels"]
    )]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="128 and 256 px, batch 1 and 2 (for a CPU-only machine)")
    parser.add_argument("--sizes", type=int, nargs="+", help="guide side lengths (default 512 1024)")
    parser.add_argument("--ks", type=int, nargs="+", default=[21, 171], help="numbers of channels")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is reported)")
    parser.add_argument("--no-cpu-path", action="store_true", help="on CUDA, skip timing the CPU path")
    parser.add_argument("--json", metavar="FILE", help="also write the rows (and the machine) to FILE, after every row")
    parser.add_argument("--structure", action="store_true", help="count launches per stage under the interpreter")
    parser.add_argument("--structure-size", type=int, default=512)
    args = parser.parse_args()
    sizes = args.sizes or ([128, 256] if args.quick else [512, 1024])
    batches = args.batches or ([1, 2] if args.quick else [1, 16])
    if min(sizes) < 2 or min(args.ks) < 1 or min(batches) < 1 or args.repeats < 1:
        parser.error("sizes must be >= 2; K, batch and --repeats >= 1")
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "numba": numba.__version__, "torch_threads": torch.get_num_threads()}
    if args.structure:
        rows = structure(args.structure_size, 21, 64)
        print(structure_table(rows, args.structure_size))
    else:
        device = torch.device(args.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                parser.error("--device cuda: no CUDA device visible")
            meta["gpu"] = torch.cuda.get_device_name(device)
        print(f"{meta.get('gpu', meta['machine'])}, torch {meta['torch']} ({meta['torch_threads']} threads), "
              f"numba {meta['numba']}; ms, best of {args.repeats}; zeta {ZETA}\n")
        print(header(device, not args.no_cpu_path))
        save = (lambda rows: write_json(args.json, {"meta": meta, "rows": rows}, indent=1)) if args.json else None
        rows = run_rows(device, sizes, args.ks, batches, args.repeats, not args.no_cpu_path, save)
        if device.type == "cpu":
            print("\ncpu path: 'mst' picks the spanning tree (official tie order); 'sort' and 'krt' order its N-1 edges")
    if args.json:
        write_json(args.json, {"meta": meta, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
