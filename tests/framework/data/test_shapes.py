"""Procedural shapes: determinism, one picture at every resolution, exact signed distances, balance, the data module."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit.data import shapes
from lowbit.data.shapes import (
    KINDS,
    NUM_CLASSES,
    RenderedImages,
    Shapes,
    _polygon_sdf,
    draw_params,
    render_shapes,
    shapes_split,
)
from lowbit.errors import LowbitError


def test_same_seed_same_bytes_other_seed_other_pictures():
    a = render_shapes(draw_params(24, seed=5), 32)
    b = render_shapes(draw_params(24, seed=5), 32)
    assert a.dtype == torch.uint8 and a.shape == (24, 3, 32, 32)
    assert torch.equal(a, b)  # rendered twice, no cache: identical bytes
    c = render_shapes(draw_params(24, seed=6), 32)
    assert (a != c).float().mean() > 0.5  # another seed: other pictures nearly everywhere
    val = render_shapes(draw_params(24, seed=5, split="val"), 32)
    assert (a != val).float().mean() > 0.5  # and train and val come from different streams


def test_golden_labels_parameters_and_pixels():
    """Guards the generator and the renderer against unintended change (regenerate on purpose only)."""
    p = draw_params(10, 1337, "train")
    assert p.label.tolist() == [7, 6, 3, 5, 2, 8, 4, 9, 0, 1]
    assert p.center[0] == pytest.approx([0.229604, 0.241214], abs=1e-6)
    assert p.radius[:3] == pytest.approx([0.138519, 0.150997, 0.174678], abs=1e-6)
    images = render_shapes(p, 32)
    pixels = images[:1, :, ::11, ::11].flatten().tolist()  # image 0, channels × 3 × 3 pixels
    golden = [74, 34, 67, 42, 59, 58, 54, 56, 50, 28, 0, 28, 2, 17, 22, 9, 20, 13, 96, 80, 98, 83, 88, 100, 80, 98, 88]
    # float32 transcendental functions may differ in the last bit between CPUs: a byte may round the other way
    assert np.abs(np.array(pixels) - np.array(golden)).max() <= 1
    assert abs(int(images.long().sum()) - 1757394) <= 60  # all 30,720 bytes


@pytest.mark.parametrize("factor", [2, 3])
def test_a_larger_render_averaged_down_is_the_same_picture(factor):
    """Rendering is anti-aliased box filtering of one continuous picture: avg-pooling the 2× (3×) render
    to 32 px gives the 32 px render up to the ramp's approximation at edges (k² sub-samples per pixel)."""
    p = draw_params(64, seed=3, split="val")
    small = render_shapes(p, 32).float() / 255
    large = render_shapes(p, 32 * factor).float() / 255
    diff = (F.avg_pool2d(large, factor) - small).abs()
    # measured: mean 0.0011, 99th percentile 0.007, max 0.10 (a corner pixel); a shifted or scaled
    # picture would differ by ~0.1 on average
    assert diff.mean() < 0.003
    assert diff.flatten().quantile(0.99) < 0.03
    assert diff.max() < 0.2
    # and the larger render has real detail: more variation between neighbouring pixels than a blow-up
    blown_up = F.interpolate(small, scale_factor=factor, mode="bilinear", align_corners=False)
    assert (large - blown_up).abs().mean() > 0.01


def test_signed_distances_of_the_polygons_and_star():
    """Quílez's folded star SDF at points whose distance is known: circumradius 1, a corner on +x."""

    def sdf(kind, x, y):
        _, vertices, inner = next(k for k in KINDS if k[0] == kind)
        t = lambda v: torch.tensor([v], dtype=torch.float32)[:, None, None]  # noqa: E731
        return _polygon_sdf(t(x), t(y), t(vertices), t(inner)).item()

    apothem = math.cos(math.pi / 4)
    assert sdf("square", 0.0, 0.0) == pytest.approx(-apothem, abs=1e-6)  # centre: the apothem inside
    assert sdf("square", 1.0, 0.0) == pytest.approx(0.0, abs=1e-6)  # a corner
    assert sdf("square", 0.5, 0.5) == pytest.approx(0.0, abs=1e-6)  # mid-edge between (1, 0) and (0, 1)
    assert sdf("square", 2.0, 0.0) == pytest.approx(1.0, abs=1e-6)  # beyond the corner, distance to it
    assert sdf("triangle", -0.5, 0.0) == pytest.approx(0.0, abs=1e-6)  # the edge opposite the corner on +x
    assert sdf("triangle", -1.0, 0.0) == pytest.approx(0.5, abs=1e-6)
    assert sdf("hexagon", 0.0, 0.0) == pytest.approx(-math.cos(math.pi / 6), abs=1e-6)
    c, s = math.cos(math.pi / 5), math.sin(math.pi / 5)
    assert sdf("star", 0.45 * c, 0.45 * s) == pytest.approx(0.0, abs=1e-6)  # an inner corner
    assert sdf("star", 0.3 * c, 0.3 * s) < 0 < sdf("star", 0.6 * c, 0.6 * s)  # inside, then in the notch


def test_labels_are_balanced_and_say_kind_and_marker_side():
    p = draw_params(1000, seed=0)
    assert np.bincount(p.label, minlength=NUM_CLASSES).tolist() == [100] * NUM_CLASSES
    assert np.ptp(np.bincount(draw_params(1003, seed=0).label, minlength=NUM_CLASSES)) <= 1
    assert (p.label == 2 * p.kind + p.below).all()
    below = p.marker[:, 1] > p.center[:, 1]  # y points down
    assert (below == (p.below == 1)).all()
    distance = np.linalg.norm(p.marker - p.center, axis=1)
    assert (distance > p.radius + p.marker_radius).all()  # the marker never touches the shape's circumcircle
    for center, radius in ((p.center, p.radius), (p.marker, p.marker_radius)):  # both inside the picture
        assert (center - radius[:, None] > 0).all() and (center + radius[:, None] < 1).all()


def test_data_module_sizes_dtypes_and_other_resolutions():
    data = Shapes(image_size=16, val_image_size=24, n_train=40, n_val=20, seed=2)
    assert (data.num_classes, data.image_size, data.in_chans) == (10, 16, 3)
    image, label = data.train_set[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and isinstance(label, int)
    assert image.min() >= -1 and image.max() <= 1
    val_images, val_labels = data.val_set.as_tensors()
    assert val_images.shape == (20, 3, 24, 24) and val_labels.dtype == torch.int64
    at_48, labels_48 = data.val_at(48).as_tensors()
    assert at_48.shape == (20, 3, 48, 48) and torch.equal(labels_48, val_labels)  # the same pictures
    grey = Shapes(image_size=16, in_chans=1, n_train=40, n_val=20, seed=2)
    assert torch.allclose(grey.train_set[0][0], image.mean(0, keepdim=True))
    batch = next(iter(data.train_dataloader()))
    assert batch[0].shape == (64, 3, 16, 16) and batch[1].shape == (64,)


def test_renders_are_cached_per_seed_split_and_size():
    shapes._CACHE.clear()
    first = shapes_split(4, "val", 12, 16)
    assert shapes_split(4, "val", 12, 16)[0] is first[0]
    assert shapes_split(4, "val", 12, 32)[0] is not first[0]
    assert len(shapes._CACHE) == 2


def test_bad_options_are_clear_errors():
    with pytest.raises(LowbitError, match="data.num_classes must be 10, got 5"):
        Shapes(num_classes=5)
    with pytest.raises(LowbitError, match="data.in_chans must be 3 \\(or 1 for grey\\), got 2"):
        Shapes(in_chans=2)
    with pytest.raises(LowbitError, match="data.clutter must be an integer of at least 0, got -1"):
        Shapes(clutter=-1)
    with pytest.raises(LowbitError, match="data.val_image_size must be an integer of at least 1, got 0"):
        Shapes(val_image_size=0)
    with pytest.raises(LowbitError, match="unknown shapes split 'test'; valid: train, val"):
        draw_params(4, 0, "test")
    assert len(RenderedImages(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.zeros(3))) == 3
