"""APro local propagation (LP) kernels, design 3.3 and 4.

LP repeats a fixed k x k stencil over every channel of a map: y_i <- sum_j w_ij y_j, where
w_ij = psi(i, j) / sum_j' psi(i, j') and psi(i, j) = exp(-|I_i - I_j|^2 / zeta^2) for the
in-image neighbours j of i (self included). The weights depend only on the image, so they are
computed once (`lp_weights`, shape (B, k*k, H, W), tap d = dy * k + dx for the offset
(dy - r, dx - r), r = k // 2, zero for out-of-image neighbours) and every backend applies the
same pre-normalised stencil `iters` times:

- `lp_torch`: the readable, vectorised reference (shifted slices of a zero-padded map);
- `lp_cpu`: the fast CPU route (a generated numba stencil, channel-last ping-pong buffers);
- `lp_triton`: a Triton kernel, one program per (image, pixel tile, channel block);
- `lp_unfold`: the official APro formulation (image shifted by +10 before zero padding,
  `unfold`, per-iteration normalisation), kept as a test oracle and benchmark baseline.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numba
import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch here
    triton = None


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


_LANES = 8  # channels are padded to a multiple of the AVX2 float32 width


@functools.lru_cache(maxsize=None)
def _cpu_kernel(kernel_size: int, channels: int):
    """One numba stencil step over rows [first, last) of the flattened (image, row) index.

    Compiled on first call for each dtype, for one (k, padded channel count).

    Buffers are channel-last, flattened to (B, rows, cols * channels) with an r-pixel zero
    border. Both sizes are code constants: the k*k taps become straight-line code with the
    weights in registers and the channel loop has a fixed trip count, which lets LLVM
    vectorise it without aliasing checks (2x faster here than a generic loop).
    """
    k, r, c = kernel_size, kernel_size // 2, channels
    taps = " + ".join(f"w{dy * k + dx} * a{dy}[at + {dx * c} + q]" for dy in range(k) for dx in range(k))
    lines = [
        "def step(a, o, weights, first, last):",
        "    h = weights.shape[1]",
        "    for task in range(first, last):",
        "        b = task // h",
        "        i = task % h",
        f"        w = a.shape[2] // {c} - {2 * r}",
        f"        out = o[b, i + {r}]",
        "        wrow = weights[b, i]",
        *[f"        a{dy} = a[b, i + {dy}]" for dy in range(k)],
        "        for j in range(w):",
        f"            at = j * {c}",
        *[f"            w{d} = wrow[j * {k * k} + {d}]" for d in range(k * k)],
        f"            for q in range({c}):",
        f"                out[at + {r * c} + q] = {taps}",
    ]
    namespace: dict = {}
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from integers only
    return numba.njit(nogil=True, fastmath=True)(namespace["step"])


def lp_cpu(unary: torch.Tensor, weights: torch.Tensor, iters: int) -> torch.Tensor:
    """Fast CPU route: the generated numba stencil on channel-last zero-bordered buffers.

    Rows are split over torch.get_num_threads() Python threads (the kernel releases the GIL);
    numba's own parallel layer is avoided because its OpenMP workers keep spinning after a
    parallel region and slowed the following torch ops ~20x on this machine.
    """
    if iters == 0:
        return unary.clone()
    k = _kernel_size(weights)
    r = k // 2
    b, n_ch, h, w = unary.shape
    c = -(-n_ch // _LANES) * _LANES
    bufs = [unary.new_zeros(b, h + 2 * r, w + 2 * r, c) for _ in range(2)]
    bufs[0][:, r : r + h, r : r + w, :n_ch] = unary.permute(0, 2, 3, 1)
    src, dst = (x.reshape(b, h + 2 * r, -1).numpy() for x in bufs)
    flat_w = weights.permute(0, 2, 3, 1).contiguous().reshape(b, h, w * k * k).numpy()
    step = _cpu_kernel(k, c)
    n_threads = max(1, min(torch.get_num_threads(), b * h))
    bounds = [b * h * t // n_threads for t in range(n_threads + 1)]
    with ThreadPoolExecutor(n_threads) as pool:
        for _ in range(iters):
            list(pool.map(lambda t: step(src, dst, flat_w, bounds[t], bounds[t + 1]), range(n_threads)))
            src, dst = dst, src
    out = bufs[iters % 2]
    return out[:, r : r + h, r : r + w, :n_ch].permute(0, 3, 1, 2).contiguous()


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
    def _lp_step_kernel(y_ptr, w_ptr, out_ptr, n_ch, h, w, KS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """One stencil step for a tile of BLOCK_P pixels and BLOCK_C channels of one image."""
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
        for d in tl.static_range(KS * KS):
            rr = row + (d // KS - KS // 2)
            cc = col + (d % KS - KS // 2)
            inside = p_ok & (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            wv = tl.load(w_img + d * hw + p, mask=p_ok, other=0.0)
            yv = tl.load(y_img + (rr * w + cc)[None, :], mask=c_ok[:, None] & inside[None, :], other=0.0)
            acc += wv[None, :] * yv
        tl.store(out_ptr + b * n_ch * hw + c[:, None] * hw + p[None, :], acc, mask=c_ok[:, None] & p_ok[None, :])

    _INTERPRETED = type(_lp_step_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    _INTERPRETED = False


def triton_ready(device: torch.device) -> bool:
    """Whether `lp_triton` can run on tensors of `device` (CUDA, or the Triton interpreter)."""
    return triton is not None and (device.type == "cuda" or _INTERPRETED)


def lp_triton(unary: torch.Tensor, weights: torch.Tensor, iters: int) -> torch.Tensor:
    """Triton route: one kernel launch per iteration, ping-ponging two buffers."""
    if not triton_ready(unary.device):
        raise ValueError(
            f"backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before the kernels are imported; "
            f"got tensors on {unary.device}"
        )
    k = _kernel_size(weights)
    b, n_ch, h, w = unary.shape
    if _INTERPRETED:  # few, large programs: the interpreter's cost grows with their number
        block_p, block_c = min(triton.next_power_of_2(h * w), 4096), min(triton.next_power_of_2(n_ch), 64)
    else:
        block_p, block_c = 256, min(triton.next_power_of_2(n_ch), 8)
    grid = (triton.cdiv(h * w, block_p), triton.cdiv(n_ch, block_c), b)
    src, dst = unary.contiguous().clone(), torch.empty_like(unary, memory_format=torch.contiguous_format)
    weights = weights.contiguous()
    for _ in range(iters):
        _lp_step_kernel[grid](src, weights, dst, n_ch, h, w, KS=k, BLOCK_C=block_c, BLOCK_P=block_p)
        src, dst = dst, src
    return src
