"""APro local propagation (LP) kernels: one stencil, a reference, a CPU route and a Triton kernel.

LP repeats a fixed k x k stencil over every channel of a map: y_i <- sum_j w_ij y_j, where
w_ij = psi(i, j) / sum_j' psi(i, j') and psi(i, j) = exp(-|I_i - I_j|^2 / zeta_s^2) for the
in-image neighbours j of i (self included). The weights depend only on the image, so they are
computed once (`lp_weights`, shape (B, k*k, H, W), tap d = dy * k + dx for the offset
(dy - r, dx - r), r = k // 2, zero for out-of-image neighbours) and every backend applies the
same pre-normalised stencil `iters` times:

- `lp_torch`: the readable, vectorised reference (shifted slices of a zero-padded map);
- `lp_cpu`: the fast CPU route (a numba stencil, channel-last ping-pong buffers);
  `lp_cpu_image` also makes the weights in numba, straight in the stencil's layout;
- `lp_triton`: a Triton kernel, one program per (image, pixel tile, channel block);
- `lp_unfold`: the official APro formulation (image shifted by +10 before zero padding,
  `unfold`, per-iteration normalisation), kept as a test oracle and benchmark baseline.

The op's one signature, shared by the backends (docs/kernels.md):
local_propagation(unary (B, K, H, W), image (B, C, H, W), zeta_s, kernel_size, iters) -> (B, K, H, W),
implemented by `lp_reference` (torch), `lp_cpu_image` (cpu) and `lp_triton_image` (triton).
zeta_s is the `zeta_s` of `maskclip_apro.apro.local_propagation` and of `refine.apro.zeta_s`; the
numba weights take it as inv_zeta_s2 = 1 / zeta_s^2 (computed in `lp_cpu_image`).
"""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
import torch.nn.functional as F

from ._triton import INTERPRETED, tl, triton


def _offsets(kernel_size: int) -> list[tuple[int, int, int]]:
    """(tap index, row shift, column shift) into a map zero-padded by r = k // 2."""
    return [(dy * kernel_size + dx, dy, dx) for dy in range(kernel_size) for dx in range(kernel_size)]


def lp_weights(image: torch.Tensor, zeta_s: float, kernel_size: int) -> torch.Tensor:
    """Row-normalised window affinities (B, k*k, H, W) of an image (B, C, H, W)."""
    _, _, h, w = image.shape
    r = kernel_size // 2
    padded = F.pad(image, (r, r, r, r))
    inside = F.pad(image.new_ones(1, 1, h, w), (r, r, r, r))
    taps = []
    for _, dy, dx in _offsets(kernel_size):
        diff = padded[:, :, dy : dy + h, dx : dx + w] - image
        psi = torch.exp(-(diff * diff).sum(1) / zeta_s**2)
        taps.append(psi * inside[:, 0, dy : dy + h, dx : dx + w])
    psi = torch.stack(taps, 1)
    return psi / psi.sum(1, keepdim=True)


def _kernel_size(weights: torch.Tensor) -> int:
    k = math.isqrt(weights.shape[1])
    if k * k != weights.shape[1] or k % 2 == 0:
        raise ValueError(f"weights must have k*k taps for an odd k, got {weights.shape[1]}")
    return k


def lp_torch(unary: torch.Tensor, weights: torch.Tensor, iters: int) -> torch.Tensor:
    """Reference: `iters` stencil steps as sums of weighted shifted slices."""
    k = _kernel_size(weights)
    r = k // 2
    _, _, h, w = unary.shape
    y = unary
    for _ in range(iters):
        padded = F.pad(y, (r, r, r, r))
        y = sum(weights[:, d : d + 1] * padded[:, :, dy : dy + h, dx : dx + w] for d, dy, dx in _offsets(k))
    return y.clone() if iters == 0 else y


def lp_reference(unary: torch.Tensor, image: torch.Tensor, zeta_s: float, kernel_size: int, iters: int) -> torch.Tensor:
    """torch backend: `lp_weights`, then `lp_torch`."""
    return lp_torch(unary, lp_weights(image, zeta_s, kernel_size), iters)


_LANES = 8  # channels are padded to a multiple of the AVX2 float32 width
_CHAINS = 5  # independent FMA chains per output vector: hides FMA latency without reassociation


@numba.njit(nogil=True, cache=True)
def _cpu_log_psi(image, inv_zeta_s2, k, out, first, last):  # pragma: no cover - compiled
    """log psi(p, p + o) for the k*k // 2 taps o after the centre, rows [first, last); -inf outside.

    out is (B, H, k*k // 2 * W), tap-major within a row. psi(p, q) = psi(q, p) bit for bit, so
    the taps before the centre are read from these in `_cpu_normalise` and each pair costs one
    exp (taken by torch, vectorised, in between). inv_zeta_s2 = 1 / zeta_s^2 carries the image
    dtype, so float32 images stay in float32.
    """
    n_ch, h, w = image.shape[1:]
    r = k // 2
    half = k * k // 2
    acc = np.empty(w, image.dtype)
    for task in range(first, last):
        b = task // h
        i = task % h
        row = out[b, i]
        for t in range(half):
            d = half + 1 + t
            ii = i + d // k - r
            dx = d % k - r
            lo, hi = max(0, -dx), min(w, w - dx)
            base = t * w
            for j in range(w):
                row[base + j] = -np.inf
            if ii >= h:
                continue
            for j in range(w):
                acc[j] = 0
            for ch in range(n_ch):
                here = image[b, ch, i]
                there = image[b, ch, ii, lo + dx : hi + dx]
                for j in range(hi - lo):
                    diff = here[lo + j] - there[j]
                    acc[lo + j] += diff * diff
            for j in range(lo, hi):
                row[base + j] = -acc[j] * inv_zeta_s2


@numba.njit(nogil=True, cache=True)
def _cpu_normalise(psi, k, out, first, last):  # pragma: no cover - compiled
    """Row-normalised weights out[b, i, j * k*k + d] from the forward affinities, rows [first, last).

    Each row is built tap-major (contiguous, vectorised) and transposed on the way out: the
    stencil reads a pixel's k*k weights contiguously, 1.3x faster here than k*k tap streams.
    """
    h = psi.shape[1]
    kk = k * k
    half = kk // 2
    w = out.shape[2] // kk
    r = k // 2
    total = np.empty(w, psi.dtype)
    row = np.empty(kk * w, psi.dtype)
    for task in range(first, last):
        b = task // h
        i = task % h
        for d in range(half):
            ii = i + d // k - r
            dx = d % k - r
            base = d * w
            for j in range(w):
                row[base + j] = 0
            if ii < 0:
                continue
            lo, hi = max(0, -dx), min(w, w - dx)
            source = psi[b, ii]
            at = (kk - 2 - d - half) * w + dx
            for j in range(lo, hi):
                row[base + j] = source[at + j]
        source = psi[b, i]
        for j in range(w):
            row[half * w + j] = 1
        for j in range(half * w):
            row[(half + 1) * w + j] = source[j]
        for j in range(w):
            total[j] = 0
        for d in range(kk):
            for j in range(w):
                total[j] += row[d * w + j]
        for j in range(w):
            total[j] = 1 / total[j]
        dest = out[b, i]
        for j in range(w):
            for d in range(kk):
                dest[j * kk + d] = row[d * w + j] * total[j]


@numba.njit(nogil=True, cache=True)
def _cpu_pack(unary, r, bufs, first, last):  # pragma: no cover - compiled
    """Rows [first, last) of the channel-last ping-pong buffers bufs (2, B, H + 2r, (W + 2r) * c).

    bufs[0] gets `unary` with zero padded channels; both get the zero r-pixel border (the
    stencil writes only the interior, padded channels included, so the border stays 0).
    """
    n_ch, h, w = unary.shape[1:]
    c = bufs.shape[3] // (w + 2 * r)
    rows = h + 2 * r
    for task in range(first, last):
        b = task // rows
        i = task % rows - r
        for s in range(2):
            row = bufs[s, b, i + r]
            if not 0 <= i < h:
                row[:] = 0
                continue
            row[: r * c] = 0
            row[(w + r) * c :] = 0
            if s == 0:
                for j in range(w):
                    at = (j + r) * c
                    for q in range(n_ch):
                        row[at + q] = unary[b, q, i, j]
                    for q in range(n_ch, c):
                        row[at + q] = 0


UNROLL_MAX = 9  # larger windows use the loop form: straight-line code and its compile time grow as k^2


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _cpu_step_loop(a, o, weights, dest, k, first, last):  # pragma: no cover - compiled
    """Loop form of the generated step (`_cpu_kernel`) for windows above UNROLL_MAX: any k, one compile per dtype."""
    h = weights.shape[1]
    kk = k * k
    w = weights.shape[2] // kk
    r = k // 2
    c = a.shape[2] // (w + 2 * r)
    final = dest.shape[0] > 0
    scratch = np.zeros(a.shape[2], a.dtype)
    acc = np.empty(c, a.dtype)
    for task in range(first, last):
        b = task // h
        i = task % h
        out = scratch if final else o[b, i + r]
        wrow = weights[b, i]
        for j in range(w):
            acc[:] = 0
            for dy in range(k):
                row = a[b, i + dy]
                for dx in range(k):
                    wv = wrow[j * kk + dy * k + dx]
                    at = (j + dx) * c
                    for q in range(c):
                        acc[q] += wv * row[at + q]
            at = (j + r) * c
            for q in range(c):
                out[at + q] = acc[q]
        if final:
            for q in range(dest.shape[1]):
                plane = dest[b, q, i]
                for j in range(w):
                    plane[j] = scratch[(j + r) * c + q]


@functools.lru_cache(maxsize=None)
def _cpu_kernel(kernel_size: int, channels: int):
    """One numba stencil step over rows [first, last) of the flattened (image, row) index.

    Compiled on first call for each dtype, for one (k, padded channel count); windows above
    UNROLL_MAX get `_cpu_step_loop` instead (same layout and arguments).

    Buffers are channel-last, flattened to (B, rows, cols * channels) with an r-pixel zero
    border. Both sizes are code constants: the k*k taps become straight-line code (LLVM
    hoists the pixel's weights out of the channel loop) and the channel loop has a fixed
    trip count, which lets LLVM vectorise it (2x faster here than a generic loop). The taps
    are summed in `_CHAINS` parenthesised chains and only FMA contraction is allowed (no
    reassociation, which would fold them back into one dependent chain): 1.3x faster here.
    When `dest` is not empty (the last step) each row goes through a scratch row into
    dest (B, K, H, W), which saves a separate layout conversion.
    """
    k, r, c = kernel_size, kernel_size // 2, channels
    if k > UNROLL_MAX:
        return lambda a, o, weights, dest, first, last: _cpu_step_loop(a, o, weights, dest, k, first, last)
    terms = [(dy, dx) for dy in range(k) for dx in range(k)]
    chains = [terms[m::_CHAINS] for m in range(min(_CHAINS, len(terms)))]
    taps = " + ".join(
        "(" + " + ".join(f"wrow[wt + {dy * k + dx}] * a{dy}[at + {dx * c} + q]" for dy, dx in chain) + ")"
        for chain in chains
    )
    lines = [
        "def step(a, o, weights, dest, first, last):",
        "    h = weights.shape[1]",
        f"    w = weights.shape[2] // {k * k}",
        "    final = dest.shape[0] > 0",
        "    scratch = np.zeros(a.shape[2], a.dtype)",
        "    for task in range(first, last):",
        "        b = task // h",
        "        i = task % h",
        f"        out = scratch if final else o[b, i + {r}]",
        "        wrow = weights[b, i]",
        *[f"        a{dy} = a[b, i + {dy}]" for dy in range(k)],
        "        for j in range(w):",
        f"            at = j * {c}",
        f"            wt = j * {k * k}",
        f"            for q in range({c}):",
        f"                out[at + {r * c} + q] = {taps}",
        "        if final:",
        "            for q in range(dest.shape[1]):",
        "                plane = dest[b, q, i]",
        "                for j in range(w):",
        f"                    plane[j] = scratch[(j + {r}) * {c} + q]",
    ]
    namespace: dict = {"np": np}
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from integers only
    return numba.njit(nogil=True, fastmath={"contract"})(namespace["step"])


class _Rows:
    """A pool of torch.get_num_threads() Python threads that splits row ranges evenly.

    The kernels release the GIL. Numba's own parallel layer is avoided because its OpenMP
    workers keep spinning after a parallel region and slowed the following torch ops ~20x
    on this machine.
    """

    def __init__(self, n_rows: int) -> None:
        self.n_threads = max(1, min(torch.get_num_threads(), n_rows))
        self.pool = ThreadPoolExecutor(self.n_threads)

    def __enter__(self) -> "_Rows":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()

    def run(self, fn, n_tasks: int, *args) -> None:
        """fn(*args, first, last) for `n_tasks` rows split evenly over the threads; waits for all."""
        bounds = [n_tasks * t // self.n_threads for t in range(self.n_threads + 1)]
        list(self.pool.map(lambda t: fn(*args, bounds[t], bounds[t + 1]), range(self.n_threads)))


_workspace = threading.local()


def _scratch(size: int, dtype: np.dtype) -> np.ndarray:
    """A flat array of `size` elements, kept per thread and dtype and reused by later calls.

    Fresh memory costs a page fault per 4 KiB on first touch (~6 ms per 25 MB here, a third
    of a 20-step run at 512x512), so the buffers of the largest call so far are kept.
    """
    cache = _workspace.__dict__.setdefault("arrays", {})
    array = cache.get(dtype)
    if array is None or array.size < size:
        array = cache[dtype] = np.empty(size, dtype)
    return array[:size]


def _cpu_run(unary: torch.Tensor, kernel_size: int, iters: int, fill_weights) -> torch.Tensor:
    """Shared CPU route: fill_weights(rows, weights, spare), pack, `iters` stencil steps into the result.

    fill_weights writes the (B, H, W * k*k) stencil weights and may use `spare` (at least
    B*H*W * (k*k // 2) elements, it becomes the ping-pong buffers afterwards) as scratch.
    """
    if iters == 0:
        return unary.clone()
    r = kernel_size // 2
    b, n_ch, h, w = unary.shape
    c = -(-n_ch // _LANES) * _LANES
    dtype = np.dtype(str(unary.dtype).removeprefix("torch."))
    n_buf = b * (h + 2 * r) * (w + 2 * r) * c
    n_weights = b * h * w * kernel_size * kernel_size
    n_spare = max(2 * n_buf, b * h * w * (kernel_size * kernel_size // 2))
    scratch = _scratch(n_spare + n_weights, dtype)
    bufs = scratch[: 2 * n_buf].reshape(2, b, h + 2 * r, (w + 2 * r) * c)
    weights = scratch[n_spare:].reshape(b, h, w * kernel_size * kernel_size)
    out = torch.empty_like(unary, memory_format=torch.contiguous_format)
    none = np.empty((0, 0, 0, 0), dtype)
    step = _cpu_kernel(kernel_size, c)
    with _Rows(b * h) as rows:
        fill_weights(rows, weights, scratch[:n_spare])
        rows.run(_cpu_pack, b * (h + 2 * r), unary.detach().contiguous().numpy(), r, bufs)
        for t in range(iters):
            dest = out.numpy() if t == iters - 1 else none
            rows.run(step, b * h, bufs[t % 2], bufs[(t + 1) % 2], weights, dest)
    return out


def lp_cpu(unary: torch.Tensor, weights: torch.Tensor, iters: int) -> torch.Tensor:
    """Fast CPU route from precomputed `lp_weights`: the generated numba stencil (`_cpu_kernel`)."""
    k = _kernel_size(weights)
    b, _, h, w = unary.shape

    def fill(rows: _Rows, flat: np.ndarray, spare: np.ndarray) -> None:
        torch.from_numpy(flat).view(b, h, w, k * k).copy_(weights.detach().permute(0, 2, 3, 1))

    return _cpu_run(unary, k, iters, fill)


def lp_cpu_image(unary: torch.Tensor, image: torch.Tensor, zeta_s: float, kernel_size: int, iters: int) -> torch.Tensor:
    """Fast CPU route from the image: `lp_weights` made in numba in the stencil's layout, then `lp_cpu`'s steps.

    unary and image share one float dtype. Each symmetric pair psi(p, q) = psi(q, p) costs
    one exp (`_cpu_log_psi`, then torch's vectorised exp), then `_cpu_normalise` gathers and
    normalises the k*k taps; 10x faster than `lp_weights` plus the layout change here.
    """
    b, _, h, w = unary.shape
    image_np = image.detach().contiguous().numpy()
    half = kernel_size * kernel_size // 2

    def fill(rows: _Rows, flat: np.ndarray, spare: np.ndarray) -> None:
        psi = spare[: b * h * w * half].reshape(b, h, w * half)
        rows.run(_cpu_log_psi, b * h, image_np, image_np.dtype.type(1.0 / zeta_s**2), kernel_size, psi)
        torch.from_numpy(psi).exp_()
        rows.run(_cpu_normalise, b * h, psi, kernel_size, flat)

    return _cpu_run(unary, kernel_size, iters, fill)


def lp_unfold(unary: torch.Tensor, image: torch.Tensor, zeta_s: float, kernel_size: int, iters: int) -> torch.Tensor:
    """Official APro style: +10 image shift before zero padding, unfold, normalise every step."""
    b, k_ch, h, w = unary.shape
    kk = kernel_size * kernel_size
    unfold = torch.nn.Unfold(kernel_size, padding=kernel_size // 2)
    shifted = image + 10
    neighbours = unfold(shifted).reshape(b, image.shape[1], kk, h * w)
    aff = torch.exp(-(((neighbours - shifted.reshape(b, -1, 1, h * w)) ** 2) / zeta_s**2).sum(1))
    y = unary
    for _ in range(iters):
        windows = unfold(y).reshape(b, k_ch, kk, h * w)
        y = ((windows * aff[:, None]).sum(2) / (aff.sum(1)[:, None] + 1e-10)).reshape(b, k_ch, h, w)
    return y.clone() if iters == 0 else y


if triton is not None:

    @triton.jit
    def _lp_tap(acc, y_img, w_img, d, p, row, col, p_ok, c_ok, h, w, hw, KS: tl.constexpr):
        rr = row + (d // KS - KS // 2)
        cc = col + (d % KS - KS // 2)
        inside = p_ok & (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        wv = tl.load(w_img + d * hw + p, mask=p_ok, other=0.0)
        yv = tl.load(y_img + (rr * w + cc)[None, :], mask=c_ok[:, None] & inside[None, :], other=0.0)
        return acc + wv[None, :] * yv

    @triton.jit
    def _lp_step_kernel(y_ptr, w_ptr, out_ptr, n_ch, h, w, KS: tl.constexpr, UNROLL: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """One stencil step for a tile of BLOCK_P pixels and BLOCK_C channels of one image.

        The k*k taps are unrolled up to UNROLL_MAX (compile time grows with k^2), a loop above.
        """
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2)
        hw = h * w
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = p < hw
        c_ok = c < n_ch
        row = p // w
        col = p % w
        y_img = y_ptr + b * n_ch * hw + c[:, None] * hw
        w_img = w_ptr + b * (KS * KS) * hw
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=out_ptr.dtype.element_ty)
        if UNROLL:
            for d in tl.static_range(KS * KS):
                acc = _lp_tap(acc, y_img, w_img, d, p, row, col, p_ok, c_ok, h, w, hw, KS)
        else:
            for d in range(KS * KS):
                acc = _lp_tap(acc, y_img, w_img, d, p, row, col, p_ok, c_ok, h, w, hw, KS)
        tl.store(out_ptr + b * n_ch * hw + c[:, None] * hw + p[None, :], acc, mask=c_ok[:, None] & p_ok[None, :])


def _block(total: int, interpreted_cap: int, device_cap: int) -> int:
    """Elements per program along one axis: few, large programs under the interpreter (its cost grows
    with their number), `device_cap` at most on a GPU."""
    return min(triton.next_power_of_2(total), interpreted_cap if INTERPRETED else device_cap)


def lp_triton(unary: torch.Tensor, weights: torch.Tensor, iters: int) -> torch.Tensor:
    """Triton route: one kernel launch per iteration, ping-ponging two buffers."""
    k = _kernel_size(weights)
    b, n_ch, h, w = unary.shape
    block_p, block_c = _block(h * w, 4096, 256), _block(n_ch, 64, 8)
    grid = (triton.cdiv(h * w, block_p), triton.cdiv(n_ch, block_c), b)
    src, dst = unary.contiguous().clone(), torch.empty_like(unary, memory_format=torch.contiguous_format)
    weights = weights.contiguous()
    for _ in range(iters):
        _lp_step_kernel[grid](src, weights, dst, n_ch, h, w, KS=k, UNROLL=k <= UNROLL_MAX, BLOCK_C=block_c,
                              BLOCK_P=block_p)
        src, dst = dst, src
    return src


def lp_triton_image(unary: torch.Tensor, image: torch.Tensor, zeta_s: float, kernel_size: int, iters: int) -> torch.Tensor:
    """triton backend: `lp_weights` (torch, on the device), then `lp_triton`."""
    return lp_triton(unary, lp_weights(image, zeta_s, kernel_size), iters)
