"""Procedural shapes: an embedded, seeded image-classification set rendered analytically at any resolution.

Every sample is a list of numbers in continuous image coordinates [0, 1]² (x right, y down), drawn
from ``np.random.default_rng([seed, split])``; rendering turns them into pixels at any side S, so
the same sample at 32 and at 96 pixels shows the same picture, the larger with more detail. Each
picture holds, back to front:

- background: a dark base colour (each channel 0-0.35) plus three tinted sinusoidal gratings of
  1.5-5 cycles per image side (±0.05 each);
- clutter: ``clutter`` thin line segments (width 0.015-0.03, length 0.08-0.2) of random colour
  (0.3-1 per channel): distractors, never the label;
- the shape: a circle, triangle, square, hexagon or five-pointed star with circumradius 0.12-0.28,
  random centre and rotation, a bright colour (0.6-1 per channel), filled or drawn as an outline of
  width 0.035-0.06 (a coin flip);
- the marker: a small disk (radius 0.035-0.05) of the shape's colour, 0.03-0.10 past the shape's
  circumcircle, directly above or below it (horizontal offset within ±0.4 circumradius).

The label is kind × side: ``2·kind + (marker below)``, 10 classes, exactly balanced in each split
(counts differ by at most one). Telling the side needs where the marker is relative to the shape,
so a ViT without positions (which sees a bag of patches) can learn the kind but not the side.

Rendering: each pixel is the mean of ``supersample``² sub-pixel samples, each covered by a shape in
proportion to its signed distance (a linear ramp one sub-pixel wide: analytic anti-aliasing of the
exact signed distance functions of disks, segments and regular polygons and stars, Quílez's sector
folding). Images are stored as uint8 (N, 3, S, S), cached in memory per (seed, split, size, options),
and served as (x/255 − 0.5)/0.5 ∈ [−1, 1].
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lowbit.data.images import SeededImageStream, _ImageData
from lowbit.data.text import check_sizes
from lowbit.errors import LowbitError

__all__ = ["KINDS", "RenderedImages", "ShapeParams", "Shapes", "draw_params", "render_shapes", "shapes_split"]

# (name, vertices n, inner radius / circumradius ρ): a star polygon with 2n corners alternating R and ρR;
# a regular n-gon is the star whose inner corners lie on its edges, ρ = cos(π/n); n = 0 is the circle
KINDS = (
    ("circle", 0, 1.0),
    ("triangle", 3, math.cos(math.pi / 3)),
    ("square", 4, math.cos(math.pi / 4)),
    ("hexagon", 6, math.cos(math.pi / 6)),
    ("star", 5, 0.45),
)
NUM_CLASSES = 2 * len(KINDS)  # kind × marker above/below
SPLITS = {"train": 0, "val": 1}  # the second word of each split's rng seed
MEAN, STD = 0.5, 0.5  # pixels in [0, 1] → [−1, 1]
_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_CACHE_SIZE = 6  # rendered (images, labels) kept in memory: train and val at a few sizes


# ---- parameters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeParams:
    """Everything that defines N samples, as float64/int64 numpy arrays in image units ([0, 1]²)."""

    label: np.ndarray  # (N,) 2·kind + side
    kind: np.ndarray  # (N,) index into KINDS
    below: np.ndarray  # (N,) 1 if the marker is below the shape (larger y), else 0
    center: np.ndarray  # (N, 2) shape centre (x, y)
    radius: np.ndarray  # (N,) circumradius R
    angle: np.ndarray  # (N,) rotation in radians
    outline: np.ndarray  # (N,) 1: outline only, 0: filled
    stroke: np.ndarray  # (N,) outline width
    color: np.ndarray  # (N, 3) shape and marker RGB
    marker: np.ndarray  # (N, 2) marker centre
    marker_radius: np.ndarray  # (N,)
    background: np.ndarray  # (N, 3) base RGB
    grating_freq: np.ndarray  # (N, G, 2) cycles per image side along x and y
    grating_phase: np.ndarray  # (N, G)
    grating_tint: np.ndarray  # (N, G, 3) amplitude per channel
    clutter_ends: np.ndarray  # (N, K, 2, 2) segment end points
    clutter_width: np.ndarray  # (N, K)
    clutter_color: np.ndarray  # (N, K, 3)

    def __len__(self) -> int:
        return len(self.label)


def draw_params(n: int, seed: int, split: str = "train", clutter: int = 2, gratings: int = 3) -> ShapeParams:
    """N samples' parameters from ``np.random.default_rng([seed, SPLITS[split]])``; labels exactly balanced."""
    if split not in SPLITS:
        raise LowbitError(f"unknown shapes split '{split}'; valid: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed % 2**32, SPLITS[split]])
    label = rng.permutation(np.arange(n) % NUM_CLASSES)
    kind, below = label // 2, label % 2
    radius = rng.uniform(0.12, 0.28, n)
    gap = rng.uniform(0.03, 0.10, n)
    marker_radius = rng.uniform(0.035, 0.05, n)
    offset_x = rng.uniform(-0.4, 0.4, n) * radius
    reach = radius + gap + marker_radius  # marker centre from shape centre, vertically
    margin = 0.03
    half_width = np.maximum(radius, np.abs(offset_x) + marker_radius)
    cx = rng.uniform(margin + half_width, 1 - margin - half_width)
    # vertical span: the shape's circumcircle on one side of the centre, the marker on the other
    low = np.where(below == 1, margin + radius, margin + reach + marker_radius)  # smallest centre y
    high = np.where(below == 1, 1 - margin - reach - marker_radius, 1 - margin - radius)
    cy = rng.uniform(low, high)
    sign = np.where(below == 1, 1.0, -1.0)
    color, background = _colors(rng, n)
    return ShapeParams(
        label=label.astype(np.int64),
        kind=kind.astype(np.int64),
        below=below.astype(np.int64),
        center=np.stack([cx, cy], axis=1),
        radius=radius,
        angle=rng.uniform(0, 2 * math.pi, n),
        outline=(rng.random(n) < 0.5).astype(np.int64),
        stroke=rng.uniform(0.035, 0.06, n),
        color=color,
        marker=np.stack([cx + offset_x, cy + sign * reach], axis=1),
        marker_radius=marker_radius,
        background=background,
        grating_freq=_directions(rng, (n, gratings)) * rng.uniform(1.5, 5.0, (n, gratings, 1)),
        grating_phase=rng.uniform(0, 2 * math.pi, (n, gratings)),
        grating_tint=rng.uniform(-0.05, 0.05, (n, gratings, 3)),
        clutter_ends=_segments(rng, n, clutter),
        clutter_width=rng.uniform(0.015, 0.03, (n, clutter)),
        clutter_color=rng.uniform(0.3, 1.0, (n, clutter, 3)),
    )


def _directions(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit vectors (*shape, 2) at uniform angles."""
    theta = rng.uniform(0, 2 * math.pi, shape)
    return np.stack([np.cos(theta), np.sin(theta)], axis=-1)


def _segments(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """(n, k, 2, 2) segments of length 0.08-0.2 centred anywhere in the image."""
    mid = rng.uniform(0.05, 0.95, (n, k, 1, 2))
    half = _directions(rng, (n, k))[:, :, None] * rng.uniform(0.04, 0.1, (n, k, 1, 1))  # (n, k, 1, 2)
    return np.concatenate([mid - half, mid + half], axis=2)


def _colors(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(shape colour, background base colour), each (n, 3): bright shapes (each channel 0.6-1) on dark
    backgrounds (0-0.35), so the shape stands out in every channel whatever the hues."""
    return rng.uniform(0.6, 1.0, (n, 3)), rng.uniform(0.0, 0.35, (n, 3))


# ---- rendering -----------------------------------------------------------------------------------


def _coverage(sdf: torch.Tensor, samples_per_side: int) -> torch.Tensor:
    """Signed distance (image units) → coverage of a sub-pixel: a ramp one sub-pixel wide, centred on the edge."""
    return (0.5 - sdf * samples_per_side).clamp(0.0, 1.0)


def _polygon_sdf(x: torch.Tensor, y: torch.Tensor, vertices: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Signed distance, in units of the circumradius, to a star polygon with ``vertices`` outer corners at
    radius 1 (one on +x) and inner corners at radius ``inner`` between them; x, y (n, H, W), the others (n, 1, 1).

    Fold the angle into the wedge [0, π/n] (Quílez's star SDF): there the boundary is the one
    segment from A = (1, 0) to B = inner·(cos π/n, sin π/n), and inside is the origin's side of it.
    """
    sector = 2 * math.pi / vertices  # (n, 1, 1)
    a = torch.remainder(torch.atan2(y, x), sector)
    a = torch.minimum(a, sector - a)  # (n, H, W) in [0, π/n]
    r = torch.sqrt(x * x + y * y)
    qx, qy = r * torch.cos(a), r * torch.sin(a)
    bx, by = inner * torch.cos(sector / 2), inner * torch.sin(sector / 2)
    ex, ey = bx - 1.0, by  # B − A
    h = (((qx - 1.0) * ex + qy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
    dist = torch.sqrt((qx - 1.0 - h * ex) ** 2 + (qy - h * ey) ** 2)
    inside = ex * qy - ey * (qx - 1.0) > 0  # the origin's side: cross(B − A, O − A) = ey > 0
    return torch.where(inside, -dist, dist)


def _segment_sdf(x: torch.Tensor, y: torch.Tensor, ends: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Signed distance to a stroke of ``width`` along a segment; x, y (n, H, W), ends (n, 2, 2), width (n,)."""
    ax, ay = ends[:, 0, 0, None, None], ends[:, 0, 1, None, None]
    ex, ey = ends[:, 1, 0, None, None] - ax, ends[:, 1, 1, None, None] - ay
    h = (((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
    return torch.sqrt((x - ax - h * ex) ** 2 + (y - ay - h * ey) ** 2) - width[:, None, None] / 2


def _render_chunk(p: dict[str, torch.Tensor], size: int, supersample: int) -> torch.Tensor:
    """float32 (n, 3, size, size) in [0, 1] of the samples in ``p`` (each value a float32 tensor)."""
    side = size * supersample  # sub-pixel samples per image side
    u = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    x, y = u[None, None, :], u[None, :, None]  # (1, 1, side), (1, side, 1): x right, y down
    col = lambda t: t[:, :, None, None]  # (n, 3) → (n, 3, 1, 1)  # noqa: E731
    per = lambda t: t[:, None, None]  # (n,) → (n, 1, 1)  # noqa: E731

    # background: base colour + tinted gratings sin(2π f·(x, y) + φ)
    image = col(p["background"]).expand(-1, -1, side, side).clone()  # (n, 3, side, side)
    for g in range(p["grating_phase"].shape[1]):
        fx, fy = per(p["grating_freq"][:, g, 0]), per(p["grating_freq"][:, g, 1])
        wave = torch.sin(2 * math.pi * (fx * x + fy * y) + per(p["grating_phase"][:, g]))  # (n, side, side)
        image += col(p["grating_tint"][:, g]) * wave[:, None]
    for k in range(p["clutter_width"].shape[1]):
        alpha = _coverage(_segment_sdf(x, y, p["clutter_ends"][:, k], p["clutter_width"][:, k]), side)
        image = torch.lerp(image, col(p["clutter_color"][:, k]), alpha[:, None])

    # the shape, in its own frame: rotate by −angle about its centre, scale by 1/R
    dx, dy = x - per(p["center"][:, 0]), y - per(p["center"][:, 1])  # (n, side, side) by broadcasting
    cos, sin = per(torch.cos(p["angle"])), per(torch.sin(p["angle"]))
    radius = per(p["radius"])
    fx, fy = (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius
    vertices, inner = per(p["vertices"]).clamp(min=3), per(p["inner"])
    polygon = _polygon_sdf(fx, fy, vertices, inner) * radius
    circle = torch.sqrt(dx * dx + dy * dy) - radius
    sdf = torch.where(per(p["vertices"]) == 0, circle, polygon)
    sdf = torch.where(per(p["outline"]) > 0, sdf.abs() - per(p["stroke"]) / 2, sdf)
    alpha = _coverage(sdf, side)
    mx, my = per(p["marker"][:, 0]), per(p["marker"][:, 1])
    marker = torch.sqrt((x - mx) ** 2 + (y - my) ** 2) - per(p["marker_radius"])
    alpha = torch.maximum(alpha, _coverage(marker, side))
    image = torch.lerp(image, col(p["color"]), alpha[:, None])
    return F.avg_pool2d(image, supersample) if supersample > 1 else image  # (n, 3, size, size)


def render_shapes(params: ShapeParams, size: int, supersample: int = 2, chunk_pixels: int = 2**20) -> torch.Tensor:
    """The samples at ``size``² pixels: uint8 (N, 3, size, size), round(255 · clamp(value, 0, 1)).

    Vectorised over samples in chunks of about ``chunk_pixels`` sub-pixel samples (memory bound).
    """
    check_sizes(image_size=size, supersample=supersample)
    n = len(params)
    tensors = {f.name: torch.from_numpy(np.asarray(getattr(params, f.name))) for f in fields(params)}
    tensors["vertices"] = torch.from_numpy(np.array([v for _, v, _ in KINDS])[params.kind])
    tensors["inner"] = torch.from_numpy(np.array([r for _, _, r in KINDS])[params.kind])
    tensors = {k: v.to(torch.float32) for k, v in tensors.items()}
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    step = max(1, chunk_pixels // (size * supersample) ** 2)
    for start in range(0, n, step):
        chunk = {k: v[start : start + step] for k, v in tensors.items()}
        image = _render_chunk(chunk, size, supersample)
        out[start : start + step] = (image.clamp(0.0, 1.0) * 255).round().to(torch.uint8)
    return out


def shapes_split(
    seed: int, split: str, n: int, size: int, supersample: int = 2, clutter: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (n, 3, size, size), labels int64 (n,)) of one split, rendered once per process and cached."""
    key = (seed, split, n, size, supersample, clutter)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    params = draw_params(n, seed, split, clutter)
    value = (render_shapes(params, size, supersample), torch.from_numpy(params.label))
    _CACHE[key] = value
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


# ---- datasets ------------------------------------------------------------------------------------


class RenderedImages(Dataset):
    """uint8 images (N, 3, S, S) and labels (N,) → (float32 (C, S, S) in [−1, 1], label); C = 1 averages RGB."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, in_chans: int = 3) -> None:
        self.images, self.labels, self.in_chans = images, labels, in_chans

    def __len__(self) -> int:
        return len(self.labels)

    def _convert(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 - MEAN) / STD  # (..., 3, S, S)
        return x.mean(dim=-3, keepdim=True) if self.in_chans == 1 else x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._convert(self.images[i]), int(self.labels[i])

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image as float32 (N, C, S, S) and the labels (N,): for evaluation in a few large batches."""
        return self._convert(self.images), self.labels


# ---- data module ---------------------------------------------------------------------------------


class Shapes(_ImageData):
    """Procedurally rendered shapes (module docstring): 10 classes (5 kinds × marker above/below), any resolution.

    ``n_train`` and ``n_val`` samples, each split drawn from its own generator seeded by (seed, split),
    so the val set is the same pictures at every ``image_size``. ``val_image_size`` validates at another
    side than training (default the same); ``val_at(size)`` renders the val split at any side.
    ``in_chans: 1`` averages the RGB channels. ``clutter`` distractor segments per image; ``supersample``²
    sub-pixel samples per pixel. Augmentation: shifts by up to image_size/8 pixels.
    """

    lowbit_plugin_api = 1

    def __init__(
        self,
        *,
        image_size: int = 32,
        val_image_size: int | None = None,
        in_chans: int = 3,
        num_classes: int = NUM_CLASSES,
        n_train: int = 20000,
        n_val: int = 2000,
        clutter: int = 2,
        supersample: int = 2,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        augment: bool = False,
        seed: int = 1337,
        num_workers: int = 0,
    ) -> None:
        if num_classes != NUM_CLASSES:
            raise LowbitError(
                f"the shapes data has {NUM_CLASSES} classes ({len(KINDS)} kinds × marker above/below); data.num_classes must be {NUM_CLASSES}, got {num_classes}"
            )
        if in_chans not in (1, 3):
            raise LowbitError(f"shapes are RGB: data.in_chans must be 3 (or 1 for grey), got {in_chans}")
        check_sizes(n_train=n_train, n_val=n_val, supersample=supersample)
        if val_image_size is not None:
            check_sizes(val_image_size=val_image_size)
        if isinstance(clutter, bool) or not isinstance(clutter, int) or clutter < 0:
            raise LowbitError(f"data.clutter must be an integer of at least 0, got {clutter!r}")
        super().__init__(
            image_size=image_size,
            in_chans=in_chans,
            num_classes=num_classes,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            val_fraction=n_val / (n_train + n_val),
            augment=augment,
            seed=seed,
            num_workers=num_workers,
        )
        self.val_image_size = val_image_size or image_size
        self.n_train, self.n_val, self.clutter, self.supersample = n_train, n_val, clutter, supersample

    def split_at(self, split: str, size: int) -> RenderedImages:
        """One split rendered at ``size``² pixels (cached per process)."""
        images, labels = shapes_split(self.seed, split, self._count(split), size, self.supersample, self.clutter)
        return RenderedImages(images, labels, self.in_chans)

    def val_at(self, size: int) -> RenderedImages:
        """The validation pictures at ``size``² pixels: the same samples as ``val_set``, more or fewer pixels."""
        return self.split_at("val", size)

    def _count(self, split: str) -> int:
        return self.n_train if split == "train" else self.n_val

    def _build_splits(self) -> tuple[RenderedImages, RenderedImages]:
        return self.split_at("train", self.image_size), self.val_at(self.val_image_size)

    def _stream(self, train: Dataset) -> SeededImageStream:
        return SeededImageStream(train, self.seed, self.augment, max_shift=max(1, self.image_size // 8), fill=-1.0)
