"""LPOSS and LPOSS+: label propagation over the patches of every window, then over pixels (docs/refiners.md).

Stojnić et al., CVPR 2025; official code vladan-stojnic/LPOSS (commit e489a74),
`segmentation/evaluation/lposs_eval.py`, values from `configs/lposs.yaml` / `lposs_plus.yaml`.

Patch stage (step `lposs`): one graph whose nodes are the patches of all windows of an image.
Seeds Y: the cosine of each window's L2-normalised CLIP features (bilinearly resized to the VFM's
grid when it differs) with every text query, no softmax. Edges: the k nearest neighbours by inner
product of the L2-normalised VFM value features (k 400), weight max(s, 0)^gamma * exp(-sigma * d^p),
d the distance of the patch centres in the resized image's pixels (window start + p/2 + p * index);
W + W^T, self-loops removed, Wn = D^-1/2 W D^-1/2 (a zero degree counts as 1). Per query
Z = cg(I - alpha Wn, Y) from 0, tolerance 1e-6 of |Y|, at most 10 iterations (cupyx's cg in the
official code). Each window's Z is upsampled bilinearly to the window and the windows are averaged.
Pixel stage (step `lposs_plus` after the patch stage; `lposs_pixel` alone on the probabilities it is
given): one node per pixel, its neighbours the r x r window (r 13) without itself, weight
exp(-|Lab_i - Lab_j| / tau) (tau 0.01) on Lab / (100, 128, 128); the same normalisation and solver,
seeded with the patch stage's upsampled scores. The pixel graph is a stencil of (r^2 - 1, H, W)
weights, never a matrix.

Exactness: the graph weights are float32 and the solves float64, as in the official code (its
sparse identity is float64). The k-NN is exact (a stable sort of all inner products, so among equal
scores the lower node index wins; faiss's GPU selection leaves that order unspecified, so a tie at
the k-th place may keep another neighbour than faiss would). With fewer than k nodes every node is
a neighbour (faiss would pad with -1, which the official code cannot index).

Output: the scores scaled back to cosine units by (1 - alpha) per stage, softmax at the harness's
logit scale (the argmax is the official one's); `lposs_pixel` returns its propagated probabilities
renormalised per pixel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .base import Guidance

STAGES = ("patch", "patch_pixel", "pixel")
LAB_SCALE = (100.0, 128.0, 128.0)
CHUNK_ELEMENTS = 1 << 23  # float64 elements per CG vector in the pixel stage (64 MB): classes go in chunks
NO_WINDOWS = (
    "refine step {step} needs the per-window scores and VFM values of the SCLIP-family harness: "
    "generator.mode=harness with generator.vfm_values=true (protocol=lposs sets both); this generator gave none"
)
NO_VALUES = (
    "refine step {step} needs the VFM value features of every window: set generator.vfm_values=true "
    "(model.vfm names the VFM, LPOSS uses vit_base_patch16_224.dino; protocol=lposs sets both)"
)


@dataclass
class WindowScores:
    """What the harness computed per window, for refiners that work window by window (LPOSS).

    features: (B, n, D, gh, gw) each window's dense CLIP features, not normalised. text: (M, D) the
    L2-normalised text query embeddings. boxes: the (y, x, h, w) of each window in the resized image.
    image: (B, 3, H', W') the resized image in [0, 1]. logit_scale: the harness's softmax scale.
    values: (B, n, C, gv, gwv) the VFM's last-block value features of each window (None: no VFM).
    vfm_patch: the VFM's patch size in pixels.
    """

    features: torch.Tensor
    text: torch.Tensor
    boxes: Sequence[tuple[int, int, int, int]]
    image: torch.Tensor
    logit_scale: float
    values: Optional[torch.Tensor] = None
    vfm_patch: Optional[int] = None


def rgb_to_lab(image: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65, 2 degree observer) of sRGB (..., 3, H, W) in [0, 1], the constants of kornia's rgb_to_lab."""
    linear = torch.where(image > 0.04045, ((image + 0.055) / 1.055).pow(2.4), image / 12.92)
    r, g, b = linear.unbind(-3)
    xyz = torch.stack(
        [
            0.412453 * r + 0.357580 * g + 0.180423 * b,
            0.212671 * r + 0.715160 * g + 0.072169 * b,
            0.019334 * r + 0.119193 * g + 0.950227 * b,
        ],
        dim=-3,
    )
    white = torch.tensor([0.95047, 1.0, 1.08883], device=xyz.device, dtype=xyz.dtype)[:, None, None]
    xyz = xyz / white
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856).pow(1 / 3.0), 7.787 * xyz + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def patch_centres(boxes: Sequence[tuple[int, int]], grids: Sequence[tuple[int, int]], patch: int) -> torch.Tensor:
    """(N, 2) float32 (row, column) pixel centres of every window's patches, window by window, row-major."""
    parts = []
    for (y, x), (gh, gw) in zip(boxes, grids):
        rows = y + patch // 2 + torch.arange(gh) * patch
        cols = x + patch // 2 + torch.arange(gw) * patch
        parts.append(torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2))
    return torch.cat(parts).float()


def knn(features: torch.Tensor, k: int, rows_per_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours by inner product: (N, k) scores and indices, best first, ties to the lower index.

    The k-th best score of each row is found with topk; every larger score is kept, and of the
    scores equal to it the lowest indices fill the row; the k kept are then sorted by score,
    stably, so equal scores stay in index order.
    """
    n = features.shape[0]
    k = min(k, n)
    scores, index = [], []
    for start in range(0, n, rows_per_chunk):
        sims = features[start : start + rows_per_chunk] @ features.T
        kth = sims.topk(k, dim=1).values[:, -1:]
        above = sims > kth
        tied = sims == kth
        keep = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
        cols = keep.nonzero()[:, 1].view(-1, k)
        values = sims.gather(1, cols)
        values, order = torch.sort(values, dim=1, descending=True, stable=True)
        scores.append(values)
        index.append(cols.gather(1, order))
    return torch.cat(scores), torch.cat(index)


def normalize_graph(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """D^-1/2 W D^-1/2 as a sparse CSR matrix (values' dtype) of the (n, n) matrix given as COO entries.

    Duplicate entries are summed and the diagonal dropped; a row whose sum is 0 counts as degree 1.
    """
    w = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=False).coalesce()
    (r, c), v = w.indices(), w.values()
    keep = r != c
    r, c, v = r[keep], c[keep], v[keep]
    degree = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, r, v)
    degree[degree == 0] = 1
    d = 1.0 / degree.sqrt()
    d[~torch.isfinite(d)] = 0
    v = d[r] * v * d[c]
    crow = torch.zeros(n + 1, dtype=torch.int64, device=v.device)
    crow[1:] = torch.bincount(r, minlength=n).cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, c, v, (n, n), check_invariants=False)


def patch_graph(
    features: torch.Tensor, centres: torch.Tensor, k: int, gamma: float, sigma: float, power: float
) -> torch.Tensor:
    """The patch stage's normalised affinity Wn (N, N) sparse CSR float32 (module doc).

    features: (N, C) L2-normalised; centres: (N, 2) pixel positions.
    """
    n = features.shape[0]
    sims, index = knn(features.float(), k)
    sims = sims.clamp(min=0) ** gamma
    dist = (centres[:, None, :] - centres[index]).pow(2).sum(-1).sqrt() ** power
    weights = (sims * torch.exp(-sigma * dist)).flatten()
    rows = torch.arange(n, device=features.device).repeat_interleave(index.shape[1])
    cols = index.flatten()
    return normalize_graph(torch.cat([rows, cols]), torch.cat([cols, rows]), torch.cat([weights, weights]), n)


def conjugate_gradient(matvec, b: torch.Tensor, tol: float, maxiter: int) -> torch.Tensor:
    """Per row of b (K, N), the conjugate-gradient solution of A x = b from x = 0 (cupyx's cg, row by row).

    A row stops after the iteration whose residual norm is at most tol * |b_row| (a zero row is
    returned as is), or after maxiter iterations. matvec maps (K, N) rows x to the rows A x.
    """
    x = torch.zeros_like(b)
    norm = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    atol = tol * norm
    active = norm != 0
    r = b.clone()
    p = rho = None
    for iteration in range(maxiter):
        if not bool(active.any()):
            break
        rho_new = (r * r).sum(1, keepdim=True)
        p = r.clone() if iteration == 0 else r + (rho_new / rho) * p
        rho = rho_new
        q = matvec(p)
        step = rho / (p * q).sum(1, keepdim=True)
        x = torch.where(active, x + step * p, x)
        r = torch.where(active, r - step * q, r)
        active = active & ~(torch.linalg.vector_norm(r, dim=1, keepdim=True) <= atol)
    return x


def window_average(
    scores: Sequence[torch.Tensor], boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int]
) -> torch.Tensor:
    """Mean (K, H, W) of each window's (K, gh, gw) scores upsampled bilinearly to its box, over the covering windows."""
    total = scores[0].new_zeros(scores[0].shape[0], *size)
    count = scores[0].new_zeros(1, *size)
    for part, (y, x, h, w) in zip(scores, boxes):
        total[:, y : y + h, x : x + w] += F.interpolate(part[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        count[:, y : y + h, x : x + w] += 1
    if bool((count == 0).any()):
        raise ValueError(f"the windows leave pixels of the {size[0]}x{size[1]} image uncovered")
    return total / count


def pixel_offsets(r: int) -> list[tuple[int, int]]:
    """The (dy, dx) of a pixel's neighbours in the (2 (r // 2) + 1)^2 window, itself excluded, row-major."""
    half = r // 2
    return [(dy, dx) for dy in range(-half, half + 1) for dx in range(-half, half + 1) if (dy, dx) != (0, 0)]


def _shifted(h: int, w: int, dy: int, dx: int) -> tuple[slice, slice, slice, slice]:
    """Rows and columns of the pixels whose (dy, dx) neighbour is inside, and of those neighbours."""
    return (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)),
            slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx)))


def pixel_stencil(image: torch.Tensor, r: int, tau: float) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The pixel stage's normalised weights as a stencil (O, H, W) float32 and its O offsets.

    stencil[o, i, j] is Wn between pixel (i, j) and (i + dy_o, j + dx_o) (0 where that lies
    outside). image: (3, H, W) RGB in [0, 1].
    """
    lab = rgb_to_lab(image.float()) / torch.tensor(LAB_SCALE, device=image.device)[:, None, None]
    _, h, w = lab.shape
    offsets = pixel_offsets(r)
    weights = lab.new_zeros(len(offsets), h, w)
    for o, (dy, dx) in enumerate(offsets):
        ys, xs, ny, nx = _shifted(h, w, dy, dx)
        diff = (lab[:, ys, xs] - lab[:, ny, nx]).pow(2).sum(0)
        weights[o, ys, xs] = torch.exp(-diff.sqrt() / tau)
    degree = weights.sum(0)
    degree[degree == 0] = 1
    d = 1.0 / degree.sqrt()
    for o, (dy, dx) in enumerate(offsets):
        ys, xs, ny, nx = _shifted(h, w, dy, dx)
        weights[o, ys, xs] = d[ys, xs] * weights[o, ys, xs] * d[ny, nx]
    return weights, offsets


def stencil_system(weights: torch.Tensor, offsets: Sequence[tuple[int, int]], alpha: float):
    """matvec of (I - alpha Wn) on (K, H * W) rows (maps, float64), Wn given as a stencil (pixel_stencil).

    kernels/lposs_stencil.py computes it: a numba loop on the CPU, shifted views elsewhere.
    """
    from ..kernels.lposs_stencil import stencil_matvec

    _, h, w = weights.shape
    return lambda rows: stencil_matvec(weights, offsets, alpha, rows.view(-1, h, w)).view(rows.shape)


class LPOSS:
    """LPOSS (stages "patch"), LPOSS+ ("patch_pixel") or LPOSS+'s pixel stage alone ("pixel"), module doc.

    alpha: propagation weight. k, gamma, sigma, pix_dist_pow: the patch graph. tau, r: the pixel
    graph. tol, maxiter: the conjugate-gradient stop (relative residual, iterations).
    """

    def __init__(
        self,
        alpha: float = 0.95,
        k: int = 400,
        gamma: float = 3.0,
        sigma: float = 0.01,
        pix_dist_pow: float = 1.0,
        tau: float = 0.01,
        r: int = 13,
        tol: float = 1e-6,
        maxiter: int = 10,
        stages: str = "patch",
    ) -> None:
        if stages not in STAGES:
            raise ValueError(f"LPOSS stages must be one of {STAGES}, got {stages!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"refine.lposs.alpha must be in (0, 1), got {alpha!r}")
        for key, value in (("k", k), ("r", r), ("maxiter", maxiter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"refine.lposs.{key} must be a positive integer, got {value!r}")
        for key, value in (("gamma", gamma), ("sigma", sigma), ("pix_dist_pow", pix_dist_pow), ("tol", tol)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"refine.lposs.{key} must be a number >= 0, got {value!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"refine.lposs.tau must be positive, got {tau!r}")
        self.alpha, self.k, self.gamma, self.sigma, self.power = float(alpha), k, float(gamma), float(sigma), float(pix_dist_pow)
        self.tau, self.r, self.tol, self.maxiter, self.stages = float(tau), r, float(tol), maxiter, stages
        self.name = {"patch": "lposs", "patch_pixel": "lposs_plus", "pixel": "lposs_pixel"}[stages]

    def solve(self, matvec, seeds: torch.Tensor) -> torch.Tensor:
        """Z (K, N) float64 with (I - alpha Wn) z = y for each row y of seeds (K, N) (conjugate_gradient)."""
        return conjugate_gradient(matvec, seeds.double(), self.tol, self.maxiter)

    def patch_stage(self, windows: WindowScores, index: int) -> torch.Tensor:
        """Image `index`'s window-averaged patch-stage scores (M, H', W'), float32."""
        values = windows.values[index].float()  # (n, C, gv, gwv)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("the VFM value features contain NaN or inf; check the VFM weights (model.vfm.pretrained)")
        n, c, gv, gwv = values.shape
        features = windows.features[index].float()
        if tuple(features.shape[-2:]) != (gv, gwv):
            features = F.interpolate(features, size=(gv, gwv), mode="bilinear", align_corners=False)
        clip = F.normalize(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]), dim=-1)
        seeds = clip @ windows.text.to(clip.device, clip.dtype).T  # (N, M)
        dino = F.normalize(values.permute(0, 2, 3, 1).reshape(-1, c), dim=-1)
        centres = patch_centres([b[:2] for b in windows.boxes], [(gv, gwv)] * n, windows.vfm_patch).to(dino.device)
        wn = patch_graph(dino, centres, self.k, self.gamma, self.sigma, self.power).to(torch.float64)
        z = self.solve(lambda x: x - self.alpha * (wn @ x.T).T, seeds.T)
        parts = z.float().T.reshape(n, gv, gwv, -1).permute(0, 3, 1, 2)
        return window_average(list(parts), windows.boxes, tuple(windows.image.shape[-2:]))

    def pixel_stage(self, scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(K, H, W) scores propagated on the pixel graph of image (3, H, W), float32."""
        weights, offsets = pixel_stencil(image, self.r, self.tau)
        matvec = stencil_system(weights, offsets, self.alpha)
        k, h, w = scores.shape
        chunk = max(1, CHUNK_ELEMENTS // (h * w))
        out = [self.solve(matvec, scores[i : i + chunk].reshape(-1, h * w)) for i in range(0, k, chunk)]
        return torch.cat(out).float().view(k, h, w)

    def __call__(self, probs: torch.Tensor, guidance: Guidance) -> torch.Tensor:
        if self.stages == "pixel":
            image = guidance.image
            if tuple(probs.shape[-2:]) != tuple(image.shape[-2:]):
                probs = F.interpolate(probs.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
            out = torch.stack([self.pixel_stage(p, im) for p, im in zip(probs.float(), image)]).clamp(min=0)
            return out / out.sum(1, keepdim=True).clamp(min=torch.finfo(out.dtype).tiny)
        windows = getattr(guidance, "windows", None)
        if windows is None:
            raise ValueError(NO_WINDOWS.format(step=self.name))
        if windows.values is None:
            raise ValueError(NO_VALUES.format(step=self.name))
        out = []
        for i in range(windows.features.shape[0]):
            scores = self.patch_stage(windows, i)
            if self.stages == "patch_pixel":
                scores = self.pixel_stage(scores, windows.image[i])
            out.append(scores)
        scale = windows.logit_scale * (1 - self.alpha) ** (2 if self.stages == "patch_pixel" else 1)
        return torch.softmax(scale * torch.stack(out), dim=1)
