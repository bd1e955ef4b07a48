"""LPOSS / LPOSS+ (maskclip_apro/refiners/lposs.py) against transcriptions of the official code.

The oracles below transcribe vladan-stojnic/LPOSS at commit e489a7445528922ddfe4e39631ef2fe34827c873,
`segmentation/evaluation/lposs_eval.py` (and `models/lposs/lposs.py`), with cupyx.scipy.sparse
replaced by scipy.sparse (the same API) and faiss.knn_gpu by a brute-force inner-product search
(a stable sort, so ties go to the lower index); cupyx's `cg` (cupy, cupyx/scipy/sparse/linalg/
_iterative.py) and kornia 0.7.4's `rgb_to_lab` (kornia/color/lab.py, rgb.py, xyz.py) are transcribed too.
"""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse import csr_matrix, diags, eye

from maskclip_apro.generator.slide import slide_boxes
from maskclip_apro.refiners import Chain, Guidance
from maskclip_apro.refiners.lposs import (
    LPOSS, WindowScores, conjugate_gradient, knn, patch_centres, patch_graph, pixel_stencil, rgb_to_lab,
    stencil_system, window_average,
)

# ---- transcriptions (official code, see the module doc) -------------------------------------------


def kornia_rgb_to_lab(image):
    """kornia 0.7.4 rgb_to_lab (with rgb_to_linear_rgb and rgb_to_xyz inlined)."""
    lin_rgb = torch.where(image > 0.04045, torch.pow(((image + 0.055) / 1.055), 2.4), image / 12.92)
    r, g, b = lin_rgb[..., 0, :, :], lin_rgb[..., 1, :, :], lin_rgb[..., 2, :, :]
    x = 0.412453 * r + 0.357580 * g + 0.180423 * b
    y = 0.212671 * r + 0.715160 * g + 0.072169 * b
    z = 0.019334 * r + 0.119193 * g + 0.950227 * b
    xyz_im = torch.stack([x, y, z], -3)
    xyz_ref_white = torch.tensor([0.95047, 1.0, 1.08883], device=xyz_im.device, dtype=xyz_im.dtype)[..., :, None, None]
    xyz_normalized = torch.div(xyz_im, xyz_ref_white)
    threshold = 0.008856
    power = torch.pow(xyz_normalized.clamp(min=threshold), 1 / 3.0)
    scale = 7.787 * xyz_normalized + 4.0 / 29.0
    xyz_int = torch.where(xyz_normalized > threshold, power, scale)
    x, y, z = xyz_int[..., 0, :, :], xyz_int[..., 1, :, :], xyz_int[..., 2, :, :]
    return torch.stack([(116.0 * y) - 16.0, 500.0 * (x - y), 200.0 * (y - z)], dim=-3)


def faiss_knn(feats, k):
    """Stand-in for faiss.knn_gpu(..., METRIC_INNER_PRODUCT): exact scores, best first, ties to the lower index."""
    sims = (feats @ feats.T).numpy()
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return torch.from_numpy(np.take_along_axis(sims, order, 1)), torch.from_numpy(order)


def reshape_windows(x):
    height_width = [(y.shape[0], y.shape[1]) for y in x]
    dim = x[0].shape[-1]
    x = [torch.reshape(y, (-1, dim)) for y in x]
    return torch.cat(x, dim=0), height_width


def normalize_connection_graph(G):
    W = csr_matrix(G)
    W = W - diags(W.diagonal(), 0)
    S = np.asarray(W.sum(axis=1))
    S[S == 0] = 1
    D = np.array(1.0 / np.sqrt(S))
    D[np.isnan(D)] = 0
    D[np.isinf(D)] = 0
    D_mh = diags(D.reshape(-1), 0)
    Wn = D_mh * W * D_mh
    return Wn


def get_lposs_laplacian(feats, locations, height_width, sigma=0.0, pix_dist_pow=2, k=100, gamma=1.0, alpha=0.95,
                        patch_size=16, return_wn=False):
    idx_window = torch.cat([window * torch.ones((h * w,), dtype=torch.int64) for window, (h, w) in enumerate(height_width)])
    idx_h = torch.cat([torch.arange(h).view(-1, 1).repeat(1, w).flatten() for h, w in height_width])
    idx_w = torch.cat([torch.arange(w).view(1, -1).repeat(h, 1).flatten() for h, w in height_width])
    loc_h = locations[idx_window, 0] + (patch_size // 2) + idx_h * patch_size
    loc_w = locations[idx_window, 2] + (patch_size // 2) + idx_w * patch_size
    locs = torch.stack((loc_h, loc_w), 1)
    locs = torch.unsqueeze(locs, 0)
    dist = torch.cdist(locs, locs, p=2)
    dist = dist[0, ...]
    dist = dist ** pix_dist_pow
    geometry_affinity = torch.exp(-sigma * dist)
    N = feats.shape[0]
    sims, ks = faiss_knn(feats, k)
    sims[sims < 0] = 0
    sims = sims ** gamma
    geometry_affinity = geometry_affinity.gather(1, ks).flatten()
    sims = sims.flatten()
    sims = sims * geometry_affinity
    ks = ks.flatten()
    rows = torch.arange(N).repeat_interleave(k)
    W = csr_matrix((sims.numpy(), (rows.numpy(), ks.numpy())), shape=(N, N))
    W = W + W.T
    Wn = normalize_connection_graph(W)
    if return_wn:
        return Wn
    return eye(Wn.shape[0]) - alpha * Wn


def cupyx_cg(A, b, tol=1e-5, maxiter=None):
    """cupyx.scipy.sparse.linalg.cg without preconditioner, x0 = None."""
    b = b.astype(A.dtype).ravel()
    x = np.zeros((A.shape[0],), dtype=A.dtype)
    b_norm = np.linalg.norm(b)
    if b_norm == 0:
        return b, 0
    atol = tol * float(b_norm)
    r = b - A @ x
    iters = 0
    rho = 0
    while iters < maxiter:
        z = r
        rho1 = rho
        rho = np.dot(r, z)
        if iters == 0:
            p = z
        else:
            beta = rho / rho1
            p = z + beta * p
        q = A @ p
        alpha = rho / np.dot(p, q)
        x = x + alpha * p
        r = r - alpha * q
        iters += 1
        resid = np.linalg.norm(r)
        if resid <= atol:
            break
    return x, 0


def perform_lp(L, preds, tol=1e-6, maxiter=10):
    lp_preds = np.zeros(preds.shape)
    for cls_idx, y_cls in enumerate(np.asarray(preds).T):
        lp_preds[:, cls_idx] = cupyx_cg(L, y_cls, tol=tol, maxiter=maxiter)[0]
    return torch.as_tensor(lp_preds)


def get_pixel_connections(img, neigh=1):
    img = img[0, ...]
    img_lab = kornia_rgb_to_lab(img)
    img_lab = img_lab.permute((1, 2, 0))
    img_lab /= torch.tensor([100, 128, 128])
    img_h, img_w, _ = img_lab.shape
    img_lab = img_lab.reshape((img_h * img_w, -1))
    idx = torch.arange(img_h * img_w)
    loc_h = idx // img_w
    loc_w = idx % img_w
    locs = torch.stack((loc_h, loc_w), 1)
    rows, cols = [], []
    for mov in product(range(-neigh, neigh + 1), range(-neigh, neigh + 1)):
        if mov[0] == 0 and mov[1] == 0:
            continue
        new_locs = locs + torch.tensor(mov)
        mask = torch.logical_and(torch.logical_and(torch.logical_and(new_locs[:, 0] >= 0, new_locs[:, 1] >= 0),
                                                   new_locs[:, 0] < img_h), new_locs[:, 1] < img_w)
        rows.append(torch.where(mask)[0])
        col = new_locs[mask, :]
        col = col[:, 0] * img_w + col[:, 1]
        cols.append(col)
    rows = torch.cat(rows)
    cols = torch.cat(cols)
    pixel_pixel_data = ((img_lab[rows, :] - img_lab[cols, :]) ** 2).sum(dim=-1)
    return rows, cols, pixel_pixel_data, locs


def get_lposs_plus_laplacian(img, preds, tau=0.1, neigh=6, alpha=0.95, return_wn=False):
    rows, cols, pixel_pixel_data, locs = get_pixel_connections(img, neigh=neigh)
    pixel_pixel_data = torch.sqrt(pixel_pixel_data)
    pixel_pixel_data = torch.exp(-pixel_pixel_data / tau)
    N = preds.shape[0]
    W = csr_matrix((pixel_pixel_data.numpy(), (rows.numpy(), cols.numpy())), shape=(N, N))
    Wn = normalize_connection_graph(W)
    if return_wn:
        return Wn
    return eye(Wn.shape[0]) - alpha * Wn


def official_slide(dino_feats, clip_feats, clf, h_img, w_img, h_crop, w_crop, h_stride, w_stride, cfg, img=None):
    """LPOSS_Infrencer.slide_inference from the features on (the model's forward replaced by its outputs)."""
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    locations = torch.zeros((h_grids * w_grids, 4))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            locations[h_idx * w_grids + w_idx] = torch.tensor([y1, y2, x1, x2], dtype=torch.float32)
    if clip_feats.shape[1] != dino_feats.shape[1] or clip_feats.shape[2] != dino_feats.shape[2]:
        clip_feats = F.interpolate(clip_feats.permute(0, 3, 1, 2), size=(dino_feats.shape[1], dino_feats.shape[2]),
                                   mode='bilinear', align_corners=False).permute(0, 2, 3, 1)
    num_classes = clf.shape[0]
    dino_feats, height_width = reshape_windows(dino_feats)
    clip_feats, _ = reshape_windows(clip_feats)
    dino_feats = F.normalize(dino_feats, p=2, dim=-1)
    clip_feats = F.normalize(clip_feats, p=2, dim=-1)
    clip_preds = clip_feats @ clf.T
    L = get_lposs_laplacian(dino_feats, locations, height_width, sigma=cfg["sigma"], pix_dist_pow=cfg["pix_dist_pow"],
                            k=cfg["k"], gamma=cfg["gamma"], alpha=cfg["alpha"], patch_size=cfg["patch"])
    lp_preds = perform_lp(L, clip_preds)
    preds = torch.zeros((1, num_classes, h_img, w_img))
    count_mat = torch.zeros((1, 1, h_img, w_img))
    idx_window = torch.cat([window * torch.ones((h * w,), dtype=torch.int64) for window, (h, w) in enumerate(height_width)])
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            win_id = h_idx * w_grids + w_idx
            crop_seg_logit = lp_preds[torch.where(idx_window == win_id)[0], :]
            crop_seg_logit = torch.reshape(crop_seg_logit, height_width[win_id] + (num_classes,))
            crop_seg_logit = torch.unsqueeze(crop_seg_logit, 0)
            crop_seg_logit = torch.permute(crop_seg_logit, (0, 3, 1, 2))
            crop_seg_logit = F.interpolate(crop_seg_logit, size=(y2 - y1, x2 - x1), mode='bilinear', align_corners=False)
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    preds = preds / count_mat
    if img is not None:
        preds = preds[0, ...]
        preds = preds.permute((1, 2, 0))
        preds = preds.reshape((h_img * w_img, -1))
        L = get_lposs_plus_laplacian(img, preds, tau=cfg["tau"], neigh=cfg["r"] // 2, alpha=cfg["alpha"])
        preds = perform_lp(L, preds)
        preds = preds.reshape((h_img, w_img, num_classes)).permute((2, 0, 1)).unsqueeze(0)
    return preds, locations


# ---- tests --------------------------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_lab_equals_kornia_transcription():
    image = torch.rand(2, 3, 7, 9, generator=_gen(0))
    image[0, :, 0, :3] = torch.tensor([0.0, 0.04045, 1.0])[:, None]  # the sRGB knee and the ends
    torch.testing.assert_close(rgb_to_lab(image), kornia_rgb_to_lab(image), atol=1e-5, rtol=1e-6)


def test_patch_graph_edge_for_edge():
    """Two windows of 2 x 3 patches (12 nodes, k 5): the same nonzero entries with the same weights."""
    feats = F.normalize(torch.randn(12, 6, generator=_gen(1)), dim=-1)
    boxes = [(0, 0), (16, 8)]
    locations = torch.tensor([[0.0, 32, 0, 48], [16, 48, 8, 56]])
    official = get_lposs_laplacian(feats, locations, [(2, 3), (2, 3)], sigma=0.01, pix_dist_pow=1.0, k=5, gamma=3.0,
                                   patch_size=16, return_wn=True).toarray()
    ours = patch_graph(feats, patch_centres(boxes, [(2, 3)] * 2, 16), 5, 3.0, 0.01, 1.0).to_dense().numpy()
    assert np.array_equal(ours != 0, official != 0)
    np.testing.assert_allclose(ours, official, rtol=1e-5, atol=1e-7)
    assert np.allclose(ours, ours.T) and not np.diag(ours).any()


def test_knn_ties_go_to_the_lower_index():
    """Equal scores: the lower node index first (faiss's GPU selection leaves their order unspecified)."""
    base = F.normalize(torch.randn(3, 4, generator=_gen(2)), dim=-1)
    feats = base[torch.tensor([0, 1, 0, 2, 0, 1])]  # nodes 0, 2, 4 identical; 1, 5 identical
    scores, index = knn(feats, 4)
    assert index[0, :3].tolist() == [0, 2, 4] and index[4, :3].tolist() == [0, 2, 4]
    assert index[5, :2].tolist() == [1, 5]
    ref_scores, ref_index = faiss_knn(feats, 4)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(scores, ref_scores)


def test_conjugate_gradient_equals_cupyx_per_class():
    """Rows solved together stop as cupyx's cg does one by one: a zero row, an early stop, the cap."""
    feats = F.normalize(torch.randn(30, 5, generator=_gen(3)), dim=-1)
    centres = patch_centres([(0, 0)], [(5, 6)], 16)
    wn = patch_graph(feats, centres, 8, 3.0, 0.01, 1.0).to(torch.float64)
    seeds = torch.randn(4, 30, generator=_gen(4), dtype=torch.float64)
    seeds[1] = 0
    L = eye(30) - 0.95 * csr_matrix(wn.to_dense().numpy())
    for tol, maxiter in ((1e-6, 10), (0.3, 10), (1e-6, 3)):
        ours = conjugate_gradient(lambda x: x - 0.95 * (wn @ x.T).T, seeds, tol, maxiter)
        ref = perform_lp(L, seeds.T.numpy(), tol=tol, maxiter=maxiter).T
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_window_boxes_and_average_equal_the_official_slide():
    h_img, w_img = 40, 57
    maps = [torch.randn(3, 2, 2, generator=_gen(10 + i)) for i in range(6)]
    boxes = slide_boxes(h_img, w_img, 32, 16)
    official_boxes = []
    for h_idx in range((h_img - 32 + 15) // 16 + 1):
        for w_idx in range((w_img - 32 + 15) // 16 + 1):
            y2, x2 = min(h_idx * 16 + 32, h_img), min(w_idx * 16 + 32, w_img)
            official_boxes.append((max(y2 - 32, 0), max(x2 - 32, 0), 32, 32))
    assert boxes == official_boxes and len(boxes) == 6
    preds = torch.zeros(1, 3, h_img, w_img)
    count = torch.zeros(1, 1, h_img, w_img)
    for part, (y, x, h, w) in zip(maps, boxes):
        up = F.interpolate(part[None], size=(h, w), mode="bilinear", align_corners=False)
        preds += F.pad(up, (x, w_img - x - w, y, h_img - y - h))
        count[:, :, y:y + h, x:x + w] += 1
    torch.testing.assert_close(window_average(maps, boxes, (h_img, w_img)), (preds / count)[0])


def _windows(h_img, w_img, crop, stride, patch, d=8, c=6, m=4, seed=5):
    boxes = slide_boxes(h_img, w_img, crop, stride)
    n, g = len(boxes), crop // patch
    clip = torch.randn(1, n, d, g, g, generator=_gen(seed))
    dino = torch.randn(1, n, c, g, g, generator=_gen(seed + 1))
    text = F.normalize(torch.randn(m, d, generator=_gen(seed + 2)), dim=-1)
    image = torch.rand(1, 3, h_img, w_img, generator=_gen(seed + 3))
    windows = WindowScores(features=clip, text=text, boxes=boxes, image=image, logit_scale=40.0, values=dino,
                           vfm_patch=patch)
    return windows, clip, dino, text, image


def test_patch_stage_equals_the_official_slide_inference():
    """Seeds, one graph over all windows, CG, window averaging: LPOSS_Infrencer.slide_inference's scores."""
    cfg = dict(sigma=0.01, pix_dist_pow=1.0, k=20, gamma=3.0, alpha=0.95, patch=8)
    windows, clip, dino, text, _ = _windows(40, 56, 32, 16, 8)
    official, _ = official_slide(dino[0].permute(0, 2, 3, 1), clip[0].permute(0, 2, 3, 1), text, 40, 56, 32, 32, 16, 16,
                                 cfg)
    lposs = LPOSS(k=20)
    torch.testing.assert_close(lposs.patch_stage(windows, 0), official[0], rtol=1e-4, atol=1e-5)
    probs = lposs(torch.zeros(1), Guidance(image=windows.image, windows=windows))
    expected = torch.softmax(40.0 * 0.05 * official, dim=1)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)


def test_pixel_stage_equals_the_official_lposs_plus():
    """The stencil, its normalisation and CG against the official sparse pixel graph (r 5 and r 13 > the image)."""
    image = torch.rand(1, 3, 9, 11, generator=_gen(7))
    scores = torch.randn(3, 9, 11, generator=_gen(8))
    for r, tau in ((5, 0.1), (13, 0.01)):
        official_wn = get_lposs_plus_laplacian(image, torch.zeros(99, 3), tau=tau, neigh=r // 2, return_wn=True)
        weights, offsets = pixel_stencil(image[0], r, tau)
        dense = torch.zeros(99, 99, dtype=torch.float64)
        for o, (dy, dx) in enumerate(offsets):
            for i, j in product(range(9), range(11)):
                if 0 <= i + dy < 9 and 0 <= j + dx < 11:
                    dense[i * 11 + j, (i + dy) * 11 + j + dx] = float(weights[o, i, j])
        torch.testing.assert_close(dense, torch.from_numpy(official_wn.toarray()).double(), rtol=1e-5, atol=1e-7)
        L = get_lposs_plus_laplacian(image, torch.zeros(99, 3), tau=tau, neigh=r // 2)
        ref = perform_lp(L, scores.reshape(3, -1).T.numpy()).T.reshape(3, 9, 11).float()
        ours = LPOSS(r=r, tau=tau).pixel_stage(scores, image[0])
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        x = torch.randn(2, 99, dtype=torch.float64, generator=_gen(9))
        torch.testing.assert_close(stencil_system(weights, offsets, 0.95)(x), torch.from_numpy(L @ x.numpy().T).T,
                                   rtol=1e-5, atol=1e-6)  # the official rounds alpha * Wn to float32


def test_lposs_plus_equals_the_official_pipeline():
    cfg = dict(sigma=0.01, pix_dist_pow=1.0, k=15, gamma=3.0, alpha=0.95, patch=8, tau=0.05, r=5)
    windows, clip, dino, text, image = _windows(24, 40, 16, 8, 8, seed=20)
    official, _ = official_slide(dino[0].permute(0, 2, 3, 1), clip[0].permute(0, 2, 3, 1), text, 24, 40, 16, 16, 8, 8,
                                 cfg, img=image)
    probs = LPOSS(k=15, tau=0.05, r=5, stages="patch_pixel")(torch.zeros(1), Guidance(image=image, windows=windows))
    torch.testing.assert_close(probs, torch.softmax(40.0 * 0.05 ** 2 * official.float(), dim=1), rtol=1e-4, atol=1e-5)


def test_vfm_values_equal_the_qkv_hook():
    """VFMBackbone.values: what LPOSS's forward hook on blocks[-1].attn.qkv extracts (extract_feats, "v")."""
    from maskclip_apro.constants import IMAGENET_MEAN, IMAGENET_STD
    from maskclip_apro.generator.vfm import load_vfm

    vfm = load_vfm("tiny_dino16", None)
    images = torch.rand(2, 3, 32, 32, generator=_gen(11))
    hooked = {}
    handle = vfm.model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: hooked.update(qkv=o))
    vfm.model.forward_features((images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
                               / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    handle.remove()
    nh = vfm.model.blocks[-1].attn.num_heads
    nb_im, nb_tokens, C_qkv = hooked["qkv"].shape
    qkv = hooked["qkv"].reshape(nb_im, nb_tokens, 3, nh, C_qkv // nh // 3).permute(2, 0, 3, 1, 4)
    v = qkv[2].transpose(1, 2)[:, 1:, :, :].flatten(-2, -1).permute(0, 2, 1)  # B C tokens
    torch.testing.assert_close(vfm.values(images).flatten(2), v, atol=1e-5, rtol=1e-5)


def test_bad_input_is_one_line():
    probs = torch.rand(1, 3, 8, 8)
    image = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="needs the per-window scores") as err:
        LPOSS()(probs, Guidance(image=image))
    assert "\n" not in str(err.value)
    windows, *_ = _windows(16, 16, 16, 8, 8)
    windows.values = torch.full_like(windows.values, float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        LPOSS()(probs, Guidance(image=image, windows=windows))
    windows.values = None
    with pytest.raises(ValueError, match="generator.vfm_values=true") as err:
        Chain.from_steps(["lposs_plus"])(probs, Guidance(image=image, windows=windows))
    assert "\n" not in str(err.value)
    for kwargs, key in ((dict(alpha=1.0), "alpha"), (dict(k=0), "k"), (dict(tau=0), "tau"), (dict(r=2.5), "r")):
        with pytest.raises(ValueError, match=f"refine.lposs.{key}"):
            LPOSS(**kwargs)
    with pytest.raises(ValueError, match="not a parameter of the lposs refiner"):
        Chain.from_steps(["lposs"], {"lposs": {"beta": 1}})


def test_pixel_step_alone_renormalises_probabilities():
    probs = torch.softmax(torch.randn(1, 3, 4, 5, generator=_gen(12)), dim=1)
    image = torch.rand(1, 3, 8, 10, generator=_gen(13))
    out = Chain.from_steps(["lposs_pixel"], {"lposs": {"r": 3, "tau": 0.1}})(probs, Guidance(image=image))
    assert out.shape == (1, 3, 8, 10)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 8, 10))


def test_segmenter_runs_lposs_under_the_lposs_protocol():
    """Tiny random models: the harness hands window scores and DINO values to lposs and lposs_plus."""
    from maskclip_apro.segmenter import Segmenter

    seg = Segmenter.from_pretrained(
        model="tiny_vit", vocab=["cat", "dog", "sky"], refine="lposs",
        overrides=["protocol=lposs", "model.vfm.name=tiny_dino16", "model.vfm.pretrained=null"],
    )
    image = (np.random.RandomState(0).rand(40, 52, 3) * 255).astype(np.uint8)
    chains = {"lposs": seg.refiner, "plus": Chain.from_steps(["lposs_plus"], {"lposs": {"r": 3}})}
    out = seg.predict_many(image, chains)
    assert out["lposs"].labels.shape == (40, 52) and out["plus"].labels.shape == (40, 52)
    assert set(out["plus"].times) >= {"generator", "lposs_plus"}
    plain = Segmenter.from_pretrained(model="tiny_vit", vocab=["cat", "dog", "sky"], refine="lposs",
                                      overrides=["protocol=sclip"])
    with pytest.raises(ValueError, match="generator.vfm_values=true"):
        plain(image)


def test_stencil_kernel_cpu_equals_reference():
    """kernels/lposs_stencil.py: the numba loop against the torch reference (borders, r 5 and a 1-pixel image side)."""
    from maskclip_apro.kernels.lposs_stencil import stencil_matvec_cpu, stencil_matvec_reference

    for h, w in ((7, 9), (1, 6)):
        weights, offsets = pixel_stencil(torch.rand(3, h, w, generator=_gen(14)), 5, 0.1)
        x = torch.randn(3, h, w, dtype=torch.float64, generator=_gen(15))
        torch.testing.assert_close(stencil_matvec_cpu(weights, offsets, 0.95, x),
                                   stencil_matvec_reference(weights, offsets, 0.95, x), rtol=1e-12, atol=1e-13)


def test_refiners_preset_and_lposs_protocol_compose():
    """methods=refiners names known steps; protocol=lposs is LPOSS's harness with the VFM values on."""
    from maskclip_apro.config import compose, generator_kwargs
    from maskclip_apro.refiners import STEPS

    cfg = compose("compare", ["methods=refiners", "protocol=lposs", "model=vit_b16_laion"])
    rows = dict(cfg.methods)
    assert list(rows) == ["plain", "+PD", "+PAMR", "+LPOSS", "+LPOSS+", "+APro", "+APro+PAMR"]
    assert all(step in STEPS for steps in rows.values() for step in steps)
    kwargs = generator_kwargs(cfg)
    assert (kwargs["mode"], kwargs["short_side"], kwargs["window"], kwargs["stride"]) == ("harness", 448, 224, 112)
    assert kwargs["vfm_values"] is True and kwargs["vfm"]["name"] == "vit_base_patch16_224.dino"
    assert (cfg.model.name, cfg.model.pretrained) == ("ViT-B-16", "laion2b_s34b_b88k")
