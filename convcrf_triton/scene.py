"""The demo's sample: a procedurally generated outdoor scene with its exact label map (no image files).

:func:`make_scene` paints several overlapping objects of distinct colours and textures (a car, a person,
a dog, a bicycle with thin wheels and frame, a potted plant, a bird) over a textured background (sky,
clouds, grass: all class 0), with anti-aliased soft edges, a slight optical blur and sensor noise. The
label of a pixel is the top-most object covering more than half of it, so the truth is exact by
construction. Labels use the PASCAL VOC classes (:data:`PASCAL_CLASSES`), so the usual 21-class
palette and a 21-class CRF apply.
"""

from __future__ import annotations

import numpy as np

PASCAL_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
BACKGROUND, BICYCLE, BIRD, CAR, DOG, PERSON, PLANT = 0, 2, 3, 7, 12, 15, 16


def class_name(c: int) -> str:
    """The PASCAL name of class ``c`` (``"void"`` for 255, ``"class c"`` past the 21 PASCAL classes)."""
    if c == 255:
        return "void"
    return PASCAL_CLASSES[c] if 0 <= c < len(PASCAL_CLASSES) else f"class {c}"


# ---- signed distance functions (negative inside; pixel units) ------------------------------------------


def _circle(y: np.ndarray, x: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    return np.hypot(y - cy, x - cx) - r


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return (np.hypot((y - cy) / ry, (x - cx) / rx) - 1.0) * min(ry, rx)


def _box(y: np.ndarray, x: np.ndarray, y0: float, x0: float, y1: float, x1: float, r: float = 0.0) -> np.ndarray:
    """A box ``[y0, y1] × [x0, x1]`` with corners rounded by ``r``."""
    qy = np.abs(y - (y0 + y1) / 2) - (y1 - y0) / 2 + r
    qx = np.abs(x - (x0 + x1) / 2) - (x1 - x0) / 2 + r
    outside = np.hypot(np.maximum(qy, 0), np.maximum(qx, 0))
    return outside + np.minimum(np.maximum(qy, qx), 0) - r


def _segment(y: np.ndarray, x: np.ndarray, p: tuple[float, float], q: tuple[float, float], width: float
             ) -> np.ndarray:
    """A capsule of ``width`` pixels from ``p = (y, x)`` to ``q``."""
    (py, px), (qy, qx) = p, q
    dy, dx = qy - py, qx - px
    t = np.clip(((y - py) * dy + (x - px) * dx) / (dy * dy + dx * dx), 0.0, 1.0)
    return np.hypot(y - py - t * dy, x - px - t * dx) - width / 2


def _ring(y: np.ndarray, x: np.ndarray, cy: float, cx: float, r: float, width: float) -> np.ndarray:
    return np.abs(np.hypot(y - cy, x - cx) - r) - width / 2


def _union(*sdfs: np.ndarray) -> np.ndarray:
    return np.minimum.reduce(sdfs)


# ---- textures -------------------------------------------------------------------------------------------


def _value_noise(rng: np.random.Generator, H: int, W: int, cell: int) -> np.ndarray:
    """Smooth noise in [0, 1]: random values on a ``cell``-pixel lattice, bilinearly interpolated."""
    gh, gw = H // cell + 2, W // cell + 2
    grid = rng.random((gh, gw))
    fy = np.arange(H)[:, None] / cell
    fx = np.arange(W)[None, :] / cell
    iy, ix = fy.astype(int), fx.astype(int)
    ty, tx = fy - iy, fx - ix
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)  # smoothstep
    top = grid[iy, ix] * (1 - tx) + grid[iy, ix + 1] * tx
    bottom = grid[iy + 1, ix] * (1 - tx) + grid[iy + 1, ix + 1] * tx
    return top * (1 - ty) + bottom * ty


def _rgb(*c: float) -> np.ndarray:
    return np.array(c, dtype=np.float64).reshape(1, 1, 3)


def _blur3(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[H, W, 3]`` (edge-replicated borders)."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = np.pad(img, pad, mode="edge")
        n = img.shape[axis]
        img = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return img


def make_scene(height: int = 240, width: int = 320, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The demo scene: ``(image [H, W, 3] uint8 RGB, labels [H, W] int64 PASCAL classes)``.

    Deterministic for a given ``seed``; shapes are laid out on a 240 × 320 canvas and scaled to
    ``height × width``.
    """
    if height < 8 or width < 8:
        raise ValueError(f"the scene needs at least 8 × 8 pixels, got {height} × {width}")
    rng = np.random.default_rng(seed)
    H, W = height, width
    s = min(H / 240, W / 320)  # shapes are designed on 240 × 320
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    y, x = yy / s, xx / s  # design coordinates
    soft = 0.9 / s  # edge softness in design units (~0.9 output pixels)

    # Background: sky gradient with clouds above a hazy horizon, textured grass below (all class 0).
    horizon = 112 + 6 * np.sin(x / 45.0)
    t = np.clip(y / 112, 0, 1)[..., None]
    sky = _rgb(92, 146, 214) * (1 - t) + _rgb(178, 206, 232) * t
    clouds = np.clip(_value_noise(rng, H, W, max(2, int(28 * s))) * 1.8 - 0.95, 0, 1)[..., None]
    sky = sky * (1 - clouds) + _rgb(240, 242, 246) * clouds
    fine, coarse = _value_noise(rng, H, W, max(1, int(3 * s))), _value_noise(rng, H, W, max(2, int(16 * s)))
    grass_tex = fine - 0.5 + 0.5 * (coarse - 0.5)
    grass = _rgb(86, 142, 58) + grass_tex[..., None] * _rgb(60, 70, 30)
    ground = np.clip((y - horizon) / 2 + 0.5, 0, 1)[..., None]
    image = sky * (1 - ground) + grass * ground
    labels = np.zeros((H, W), dtype=np.int64)

    def paint(cls: int, sdf: np.ndarray, colour: np.ndarray) -> None:
        nonlocal image
        alpha = np.clip(0.5 - sdf / (2 * soft), 0.0, 1.0)
        image = image * (1 - alpha[..., None]) + colour * alpha[..., None]
        labels[alpha > 0.5] = cls

    # Bird in the sky: an ellipse with thin swept wings.
    bird = _union(_ellipse(y, x, 42, 250, 7, 15), _circle(y, x, 37, 265, 6),
                  _segment(y, x, (40, 248), (24, 228), 2.5), _segment(y, x, (40, 252), (26, 274), 2.5))
    paint(BIRD, bird, _rgb(40, 36, 44))

    # Car (behind the person): red body with a vertical-stripe sheen, grey windows, dark wheels.
    body = _union(_box(y, x, 128, 24, 168, 176, r=10), _box(y, x, 104, 52, 136, 138, r=12))
    sheen = 0.5 + 0.5 * np.sin(x / 3.0)
    paint(CAR, body, _rgb(196, 30, 36) + sheen[..., None] * _rgb(40, 18, 14))
    windows = _union(_box(y, x, 110, 60, 130, 92, r=4), _box(y, x, 110, 98, 130, 130, r=4))
    paint(CAR, windows, _rgb(150, 176, 190) + 20 * (_value_noise(rng, H, W, max(1, int(6 * s)))[..., None] - 0.5))
    for cx in (54, 146):
        paint(CAR, _circle(y, x, 168, cx, 15), _rgb(28, 28, 30))
        paint(CAR, _circle(y, x, 168, cx, 6), _rgb(170, 170, 176))

    # Bicycle (right): narrow wheels, frame and handlebar through which the background shows.
    wheels = _union(_ring(y, x, 172, 230, 20, 4.5), _ring(y, x, 172, 294, 20, 4.5))
    frame = _union(
        _segment(y, x, (172, 230), (150, 258), 4.0), _segment(y, x, (150, 258), (172, 294), 4.0),
        _segment(y, x, (150, 258), (148, 284), 4.0), _segment(y, x, (148, 284), (172, 294), 4.0),
        _segment(y, x, (172, 230), (172, 262), 4.0), _segment(y, x, (172, 262), (150, 258), 4.0),
        _segment(y, x, (148, 284), (136, 288), 4.0), _segment(y, x, (136, 282), (136, 296), 4.0),
        _segment(y, x, (150, 258), (140, 254), 4.0), _box(y, x, 136, 246, 140, 262, r=2),
    )
    paint(BICYCLE, _union(wheels, frame), _rgb(236, 200, 40))

    # Potted plant (far left): a terracotta pot and leafy foliage.
    pot = np.maximum(_box(y, x, 182, 6, 218, 42), np.abs(x - 24) - (14 + (y - 182) * -0.18))
    paint(PLANT, pot, _rgb(186, 96, 52) + 25 * (_value_noise(rng, H, W, max(1, int(4 * s)))[..., None] - 0.5))
    leaves = _union(_ellipse(y, x, 166, 24, 18, 13), _ellipse(y, x, 160, 12, 12, 7), _ellipse(y, x, 158, 36, 13, 7),
                    _segment(y, x, (150, 24), (126, 20), 2.0), _segment(y, x, (156, 30), (132, 40), 2.0))
    leaf_tex = _value_noise(rng, H, W, max(1, int(2 * s)))
    paint(PLANT, leaves, _rgb(24, 96, 40) + leaf_tex[..., None] * _rgb(30, 60, 20))

    # Person (in front of the car): head, striped shirt, arms, dark trousers.
    shirt_stripes = (np.sin(y / 2.2) > 0)[..., None]
    shirt = np.where(shirt_stripes, _rgb(40, 70, 170), _rgb(230, 232, 236))
    paint(PERSON, _box(y, x, 110, 108, 160, 140, r=8), shirt)
    paint(PERSON, _union(_segment(y, x, (116, 110), (150, 98), 7), _segment(y, x, (116, 138), (148, 152), 7)),
          _rgb(40, 70, 170))
    legs = _union(_box(y, x, 156, 110, 214, 123, r=3), _box(y, x, 156, 125, 214, 138, r=3))
    paint(PERSON, legs, _rgb(52, 48, 60) + 12 * (_value_noise(rng, H, W, max(1, int(3 * s)))[..., None] - 0.5))
    paint(PERSON, _union(_ellipse(y, x, 96, 124, 13, 11), _box(y, x, 104, 119, 112, 129)), _rgb(224, 176, 140))
    paint(PERSON, _ellipse(y, x, 87, 124, 6, 11.5), _rgb(70, 44, 30))  # hair

    # Dog (in front of the person's legs): brown body with fur texture, head, ear, legs, thin tail.
    fur = (_value_noise(rng, H, W, max(1, int(2 * s))) - 0.5)[..., None] * _rgb(50, 36, 20)
    dog = _union(_ellipse(y, x, 196, 168, 12, 26), _circle(y, x, 184, 196, 10), _ellipse(y, x, 188, 206, 5, 8),
                 _box(y, x, 198, 148, 222, 155, r=2), _box(y, x, 198, 180, 222, 187, r=2),
                 _segment(y, x, (190, 143), (174, 132), 3.0))
    paint(DOG, dog, _rgb(150, 98, 50) + fur)
    paint(DOG, _ellipse(y, x, 182, 190, 9, 4), _rgb(84, 52, 28))  # ear

    # Camera: slight optical blur, then sensor noise (photon-like plus read noise), 8-bit quantisation.
    image = _blur3(image, 0.6)
    image = image + rng.normal(0.0, 1.0, image.shape) * (4.0 + 0.03 * image)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels
