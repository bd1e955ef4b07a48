"""The SCLIP-family test harness as a generator (SCLIP, ClearCLIP, NACLIP, ProxyCLIP protocols).

Per image (their `*_segmentor.py`; slide.py has the geometry):

1. Resize keeping the aspect ratio to mmseg's Resize(scale=(2048, short_side), keep_ratio=True)
   (bilinear, no antialiasing), normalise with CLIP's mean / std.
2. Windows of `window` pixels every `stride` pixels (None: one window, the whole image), each
   zero-padded (centred) to a multiple of `pad_to` when set (ClearCLIP: the patch size, "patch";
   ProxyCLIP: 56). The dense backbone runs on each window with the last block of its mode; a
   side that is not a multiple of the patch size loses its remainder, as CLIP's patch
   convolution does.
3. Per window: the cosine between each patch feature and each text query (every name of every
   class line, 80 CLIP templates), upsampled bilinearly to the padded window, the padding cut off.
4. The window maps averaged per pixel over the windows covering it, resized bilinearly to the
   input image: `pixel_cos` (B, M, H, W), M queries. The Segmenter turns it into labels
   (postprocess.py: softmax over the queries at `logit_scale`, max per class, `area_thd`,
   `prob_thd`), after the refiners.

On a patch grid, for the refiners that need one and for `Segmenter.generate`: the (gh, gw) grid of
cells of about one patch that tile the resized image (gh = round(H' / p), p the CLIP patch size),
and the features, keys and query cosines of every window sampled bilinearly at the centres of
the cells that lie in the window (the same per-window maps the pixel average reads, at those
points), averaged over the windows containing each centre. `logits` are logit_scale times the
max over each class's queries of those cosines; `features` are not normalised.

Per window, for refiners that work window by window (LPOSS), when a `vfm` is given: `windows`
holds each window's features on its own grid (B, n, D, gh, gw), the text query embeddings, the
window boxes and the VFM's last-block value features of each window's RGB crop (its remainder
past whole VFM patches dropped, as the CLIP grid drops it).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import rescale_size
from .maskclip import WINDOW_BATCH, GeneratorOutput, check_images
from .slide import centred_padding, harness_resize, slide_boxes, to_original
from .text import TextClassifier
from .vit import crop_to_multiple

HARNESS_LONG_SIDE = 2048  # every method's Resize(scale=(2048, S), keep_ratio=True)


def check_harness_settings(
    short_side, window, stride, pad_to, logit_scale, prob_thd, area_thd
) -> None:
    """ValueError naming the generator key whose value the harness cannot use."""
    def positive_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if not positive_int(short_side):
        raise ValueError(f"generator.short_side must be a positive integer under the harness, got {short_side!r}")
    if window is not None and not (positive_int(window) and positive_int(stride)):
        raise ValueError(
            f"generator.window and stride must be positive integers (window null: the whole image), "
            f"got window={window!r}, stride={stride!r}"
        )
    if window is not None and stride > window:
        raise ValueError(f"generator.stride ({stride}) must not exceed window ({window}): windows would leave gaps")
    if pad_to is not None and pad_to != "patch" and not positive_int(pad_to):
        raise ValueError(f"generator.pad_to must be null, 'patch' or a positive integer, got {pad_to!r}")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not logit_scale > 0:
        raise ValueError(f"generator.logit_scale must be positive, got {logit_scale!r}")
    if isinstance(prob_thd, bool) or not isinstance(prob_thd, (int, float)) or not 0 <= prob_thd <= 1:
        raise ValueError(f"generator.prob_thd must be a number in [0, 1], got {prob_thd!r}")
    if area_thd is not None and (isinstance(area_thd, bool) or not isinstance(area_thd, (int, float))
                                 or not 0 <= area_thd <= 1):
        raise ValueError(f"generator.area_thd must be null or a number in [0, 1], got {area_thd!r}")


def cell_centres(size: int, cells: int) -> torch.Tensor:
    """Centres (float64, pixels) of `cells` equal cells tiling [0, size)."""
    return (torch.arange(cells, dtype=torch.float64) + 0.5) * (size / cells)


def sample_at(maps: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear values (B, C, len(ys), len(xs)) of maps (B, C, h, w) stretched over height x width pixels.

    ys, xs are continuous pixel positions (a pixel's centre is its index + 0.5): the values the
    bilinear upsampling of `maps` to height x width (align_corners=False) takes at those points,
    its border clamping included.
    """
    gy = (2.0 * ys / height - 1.0).to(maps.dtype)
    gx = (2.0 * xs / width - 1.0).to(maps.dtype)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).to(maps.device)
    grid = grid.expand(maps.shape[0], *grid.shape)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)


class HarnessGenerator(nn.Module):
    """Images (B, 3, H, W) float RGB in [0, 1] -> GeneratorOutput with `pixel_cos` (module doc).

    backbone: a dense backbone (vit.ViTDense with remainder="drop", or resnet.ResNetDense)
    mapping a normalised crop to (features, keys) on its grid. classifier: the text queries
    (one row per name of each class line) and the class each belongs to. class_names: the
    display name of each class (the dataset's). prob_thd, area_thd: the postprocess's thresholds.
    """

    def __init__(
        self,
        backbone: nn.Module,
        classifier: TextClassifier,
        class_names: Sequence[str],
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        model: Optional[nn.Module] = None,
        name: str = "MaskCLIP",
        logit_scale: float = 40.0,
        short_side: int = 336,
        window: Optional[int] = 224,
        stride: Optional[int] = 112,
        pad_to: Union[None, str, int] = None,
        prob_thd: float = 0.0,
        area_thd: Optional[float] = None,
        vfm: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        check_harness_settings(short_side, window, stride, pad_to, logit_scale, prob_thd, area_thd)
        if classifier.threshold is not None:
            raise ValueError(
                "the harness scores background with the class file's names and prob_thd: set background=null"
            )
        if len(class_names) != classifier.num_classes:
            raise ValueError(f"{len(class_names)} class names for a classifier of {classifier.num_classes} classes")
        self.backbone = backbone
        self.classifier = classifier
        self.model = model
        self.name = name
        self.class_names = list(class_names)
        self.num_classes = classifier.num_classes
        self.patch_size = int(backbone.patch_size)
        self.logit_scale = float(logit_scale)
        self.short_side, self.window, self.stride = short_side, window, (None if window is None else stride)
        self.pad_to = self.patch_size if pad_to == "patch" else pad_to
        self.prob_thd = float(prob_thd)
        self.area_thd = None if area_thd is None else float(area_thd)
        self.mode = "harness"
        self.vfm = vfm  # vfm.VFMBackbone whose last-block values of every window go to the refiners (LPOSS)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def owner(self) -> torch.Tensor:
        """(M,) the class of each text query."""
        return self.classifier.owner

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') of Resize(scale=(2048, short_side), keep_ratio=True)."""
        return rescale_size(height, width, (HARNESS_LONG_SIDE, self.short_side))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The (gh, gw) cells of about one patch tiling a resized image of height x width."""
        p = self.patch_size
        return max(1, round(height / p)), max(1, round(width / p))

    def crop_maps(self, crops: torch.Tensor) -> torch.Tensor:
        """Query cosines, features and keys of normalised crops, stacked along channels on the backbone's grid."""
        feats, keys = self.backbone(crops)
        feats = feats.float()
        cos = torch.einsum("bdhw,md->bmhw", F.normalize(feats, dim=1), self.classifier.embeddings.to(feats.dtype))
        return torch.cat([cos, feats, keys.float()], dim=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> GeneratorOutput:
        check_images(images)
        size = tuple(images.shape[-2:])
        image = harness_resize(images.to(self.device, torch.float32), (HARNESS_LONG_SIDE, self.short_side))
        height, width = image.shape[-2:]
        if min(height, width) < self.patch_size:
            raise ValueError(
                f"image of size {size[0]}x{size[1]} (resized to {height}x{width}) is smaller than one patch "
                f"({self.patch_size}x{self.patch_size} pixels)"
            )
        normed = (image - self.mean) / self.std
        b = normed.shape[0]
        m = self.classifier.embeddings.shape[0]
        boxes = slide_boxes(height, width, self.window, self.stride)
        h, w = boxes[0][2], boxes[0][3]  # every window has the same size
        left, right, top, bottom = centred_padding(h, w, self.pad_to) if self.pad_to else (0, 0, 0, 0)
        padded = (h + top + bottom, w + left + right)
        grid = self.grid(height, width)
        ys, xs = cell_centres(height, grid[0]), cell_centres(width, grid[1])

        pixel = count = cells = cell_count = None
        window_features, window_values = [], []
        for start in range(0, len(boxes), WINDOW_BATCH):
            chunk = boxes[start : start + WINDOW_BATCH]
            crops = torch.cat([normed[:, :, y : y + h, x : x + w] for y, x, _, _ in chunk])
            if self.pad_to:
                crops = F.pad(crops, (left, right, top, bottom))
            maps = self.crop_maps(crops)
            if self.vfm is not None:
                feats = maps[:, m : m + self.classifier.embeddings.shape[1]].contiguous()  # not a view: maps can go
                window_features.append(feats.unflatten(0, (-1, b)))
                rgb = torch.cat([image[:, :, y : y + h, x : x + w] for y, x, _, _ in chunk])
                values = self.vfm.values(crop_to_multiple(rgb, self.vfm.patch_size)).float()
                window_values.append(values.unflatten(0, (-1, b)))
            cos = F.interpolate(maps[:, :m], size=padded, mode="bilinear", align_corners=False)
            cos = cos[..., top : top + h, left : left + w]
            if pixel is None:
                pixel = cos.new_zeros(b, m, height, width)
                count = cos.new_zeros(1, 1, height, width)
                cells = maps.new_zeros(b, maps.shape[1], *grid)
                cell_count = maps.new_zeros(1, 1, *grid)
            for i, (y, x, _, _) in enumerate(chunk):
                pixel[:, :, y : y + h, x : x + w] += cos[i * b : (i + 1) * b]
                count[:, :, y : y + h, x : x + w] += 1
                rows = ((ys >= y) & (ys < y + h)).nonzero()[:, 0]
                cols = ((xs >= x) & (xs < x + w)).nonzero()[:, 0]
                if len(rows) and len(cols):
                    part = sample_at(maps[i * b : (i + 1) * b], ys[rows] - y + top, xs[cols] - x + left, *padded)
                    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
                    cells[:, :, r0:r1, c0:c1] += part
                    cell_count[:, :, r0:r1, c0:c1] += 1
        pixel_cos = to_original(pixel / count, size)
        cells = cells / cell_count
        d = self.classifier.embeddings.shape[1]
        grid_cos, features, keys = cells[:, :m], cells[:, m : m + d], cells[:, m + d :]
        logits = grid_cos.new_full((b, self.num_classes, *grid), float("-inf"))
        index = self.owner.view(1, -1, 1, 1).expand_as(grid_cos)
        logits.scatter_reduce_(1, index, self.logit_scale * grid_cos, reduce="amax", include_self=True)
        windows = None
        if self.vfm is not None:
            windows = dict(
                features=torch.cat(window_features).transpose(0, 1), text=self.classifier.embeddings, boxes=boxes,
                values=torch.cat(window_values).transpose(0, 1), vfm_patch=self.vfm.patch_size,
            )
        return GeneratorOutput(
            logits=logits, keys=keys, features=features, image=image, pixel_cos=pixel_cos, windows=windows
        )
