"""The built-in dataset: 8 classes of flat shapes on cluttered backgrounds, in YOLO format.

Classes differ by shape only (colours are random), sizes span ~4-40% of the image side, backgrounds carry
gradients, noise, lines, scribbles and soft blobs that are not labelled, and later objects occlude earlier ones
(an object more than 60% hidden loses its label). Images are 256x256, 320x224, 224x320 or 288x256.
Everything is drawn from one seeded numpy Generator, so the same seed gives byte-identical label files.

    python data/synthetic.py --root datasets/synthetic --n-train 1000 --n-val 200
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

NAMES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond")
IMAGE_SIZES = ((256, 256), (320, 224), (224, 320), (288, 256))  # (width, height)
MIN_SIZE, MAX_SIZE = 0.045, 0.40  # object extent as a fraction of the image's short side
MAX_OCCLUDED = 0.6  # drop the label of an object hidden more than this
_OWN_FILE = re.compile(r"^\d{6}\.(jpg|txt)$")


def _polygon(name: str, rng: np.random.Generator) -> np.ndarray:
    """Outline of a shape of unit extent centred on 0, randomly rotated, as [k, 2] (x, y)."""
    if name == "square":
        pts, angle = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.5, rng.uniform(-12, 12)
    elif name == "diamond":  # a tall rhombus, kept upright so it never looks like a rotated square
        pts, angle = np.array([[0, -0.5], [0.3, 0], [0, 0.5], [-0.3, 0]]), rng.uniform(-12, 12)
    elif name == "triangle":
        t = np.deg2rad([90, 210, 330])
        pts, angle = 0.55 * np.stack((np.cos(t), -np.sin(t)), 1), rng.uniform(0, 360)
    elif name == "hexagon":
        t = np.deg2rad(np.arange(6) * 60)
        pts, angle = 0.5 * np.stack((np.cos(t), np.sin(t)), 1), rng.uniform(0, 60)
    elif name == "star":
        t = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.5 * rng.uniform(0.38, 0.48))
        pts, angle = np.stack((r * np.cos(t), r * np.sin(t)), 1), rng.uniform(0, 72)
    elif name == "cross":
        a, b = 0.5, rng.uniform(0.14, 0.2)  # arm half-length, arm half-width
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b]])
        pts, angle = np.concatenate((pts, [[-a, -b], [-b, -b]])), rng.uniform(0, 90)
    else:
        raise ValueError(name)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return pts @ np.array([[c, s], [-s, c]])


def _shape_mask(name: str, cx: float, cy: float, size: float, rng) -> np.ndarray:
    """uint8 mask of one object of extent `size` pixels centred at (cx, cy), drawn in a window whose top-left
    corner is (int(cx) - pad, int(cy) - pad) with pad = int(0.6 * size) + 2 (every shape fits inside)."""
    pad = int(0.6 * size) + 2
    mask = np.zeros((2 * pad + 2, 2 * pad + 2), np.uint8)
    cx, cy = cx - int(cx) + pad, cy - int(cy) + pad  # window coordinates
    center, r = (round(cx), round(cy)), max(round(size / 2), 2)
    if name == "circle":
        cv2.circle(mask, center, r, 1, -1)
    elif name == "ring":
        cv2.circle(mask, center, r, 1, -1)
        cv2.circle(mask, center, max(round(r * rng.uniform(0.45, 0.62)), 1), 0, -1)
    else:
        pts = _polygon(name, rng) * size + (cx, cy)
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask


# The second set ("glyphs"): other classes (6), smaller and more objects, other image sizes; measured beside the
# built-in one so that a distillation recipe is not tuned to one dataset
GLYPH_NAMES = ("ellipse", "semicircle", "pentagon", "arrow", "bar", "chevron")
GLYPH_SIZES = ((224, 224), (256, 192), (192, 256))


def _glyph_mask(name: str, cx: float, cy: float, size: float, rng) -> np.ndarray:
    """_shape_mask's counterpart for the glyph classes: uint8 mask of extent `size` in the same window."""
    pad = int(0.6 * size) + 2
    mask = np.zeros((2 * pad + 2, 2 * pad + 2), np.uint8)
    cx, cy = cx - int(cx) + pad, cy - int(cy) + pad
    center, r, angle = (round(cx), round(cy)), max(round(size / 2), 2), float(rng.uniform(0, 180))
    if name == "ellipse":  # elongated: its short axis 35-55% of the long one
        cv2.ellipse(mask, center, (r, max(round(r * rng.uniform(0.35, 0.55)), 1)), angle, 0, 360, 1, -1)
    elif name == "semicircle":
        cv2.ellipse(mask, center, (r, r), angle, 0, 180, 1, -1)
    else:
        if name == "pentagon":
            t = np.deg2rad(np.arange(5) * 72 - 90)
            pts = 0.5 * np.stack((np.cos(t), np.sin(t)), 1)
        elif name == "arrow":  # shaft and head, pointing along +x before the rotation
            w, hw = rng.uniform(0.08, 0.12), rng.uniform(0.22, 0.3)
            pts = np.array([[-0.5, -w], [0.1, -w], [0.1, -hw], [0.5, 0], [0.1, hw], [0.1, w], [-0.5, w]])
        elif name == "bar":  # a thin rectangle
            w = rng.uniform(0.07, 0.12)
            pts = np.array([[-0.5, -w], [0.5, -w], [0.5, w], [-0.5, w]])
        elif name == "chevron":
            t = rng.uniform(0.12, 0.18)  # arm thickness
            pts = np.array([[-0.5, -0.35], [-0.5 + 2 * t, -0.35], [0.1, 0], [-0.5 + 2 * t, 0.35], [-0.5, 0.35],
                            [0.1 - 2 * t, 0]])  # fmt: skip
            pts = pts + (0.2 - t, 0)
        else:
            raise ValueError(name)
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        pts = pts @ np.array([[c, s], [-s, c]]) * size + (cx, cy)
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask


@dataclass(frozen=True)
class Style:
    """What a generated set's objects look like: class names, image sizes (width, height), object extent as a
    fraction of the short side, at most this many objects per image, and the mask drawer of a class name."""

    names: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]
    min_size: float
    max_size: float
    max_objects: int
    draw: Callable


STYLES = {
    "shapes": Style(NAMES, IMAGE_SIZES, MIN_SIZE, MAX_SIZE, 8, _shape_mask),  # the built-in set
    "glyphs": Style(GLYPH_NAMES, GLYPH_SIZES, 0.03, 0.22, 14, _glyph_mask),
}


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Gradient + low-frequency noise + unlabelled lines, scribbles and soft blobs; float32 (h, w, 3) BGR."""
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    t = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (xx * math.cos(t) + yy * math.sin(t)) / (abs(w * math.cos(t)) + abs(h * math.sin(t)))
    ramp -= ramp.min()
    im = ramp[..., None] * (c1 - c0) + c0
    low = cv2.resize(rng.normal(0, 25, (max(h // 32, 2), max(w // 32, 2), 3)).astype(np.float32), (w, h))
    im = np.ascontiguousarray(im + low, dtype=np.float32)

    blobs = np.zeros_like(im)
    blob_mask = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(1, 6)):
        axes = tuple(int(x) for x in rng.uniform(8, 0.3 * min(w, h), 2))
        center = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        colour = tuple(float(x) for x in rng.uniform(0, 255, 3))
        cv2.ellipse(blobs, center, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        cv2.ellipse(blob_mask, center, axes, 0, 0, 360, 1.0, -1)
    k = int(rng.integers(3, 8)) * 2 + 1
    blob_mask = cv2.GaussianBlur(blob_mask, (k, k), 0)[..., None] * rng.uniform(0.3, 0.8)
    im = im * (1 - blob_mask) + cv2.GaussianBlur(blobs, (k, k), 0) * blob_mask
    _clutter(im, rng, n_lines=int(rng.integers(3, 12)), n_scribbles=int(rng.integers(0, 4)))
    return im


def _clutter(im: np.ndarray, rng: np.random.Generator, n_lines: int, n_scribbles: int) -> None:
    """Draw straight lines and random-walk scribbles in random colours onto im, in place."""
    h, w = im.shape[:2]
    for _ in range(n_lines):
        p1 = (int(rng.uniform(-w / 4, 1.25 * w)), int(rng.uniform(-h / 4, 1.25 * h)))
        p2 = (int(rng.uniform(-w / 4, 1.25 * w)), int(rng.uniform(-h / 4, 1.25 * h)))
        cv2.line(im, p1, p2, tuple(float(x) for x in rng.uniform(0, 255, 3)), int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(n_scribbles):
        steps = rng.normal(0, 6, (int(rng.integers(8, 30)), 2)).cumsum(0)
        pts = (steps + rng.uniform((0, 0), (w, h))).astype(np.int32)
        colour = tuple(float(x) for x in rng.uniform(0, 255, 3))
        cv2.polylines(im, [pts], False, colour, int(rng.integers(1, 3)), cv2.LINE_AA)


def _object_colour(region_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour that stands out from the background under the object (distance >= 80 of 441)."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - region_mean) >= 80:
            return colour
    return 255 - region_mean  # the complement always contrasts


def make_image(rng: np.random.Generator, style: str = "shapes") -> tuple[np.ndarray, np.ndarray]:
    """One image of STYLES[style] -> (BGR uint8 (h, w, 3), labels [n, 5] (class, x, y, w, h) normalized)."""
    st = STYLES[style]
    w, h = st.image_sizes[rng.integers(len(st.image_sizes))]
    im = _background(w, h, rng)
    owner = np.full((h, w), -1, np.int32)  # which object each pixel shows, for occlusion
    objects = []  # (class, full box xyxy, area)
    side = min(w, h)
    for k in range(int(rng.integers(1, st.max_objects + 1))):
        cls = int(rng.integers(len(st.names)))
        size = side * math.exp(rng.uniform(math.log(st.min_size), math.log(st.max_size)))
        cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
        window = st.draw(st.names[cls], cx, cy, size, rng)
        x0, y0 = int(cx) - (len(window) - 2) // 2, int(cy) - (len(window) - 2) // 2
        # the window may stick out of the image: keep the part inside
        wx0, wy0 = max(-x0, 0), max(-y0, 0)
        wx1, wy1 = min(len(window), w - x0), min(len(window), h - y0)
        mask = window[wy0:wy1, wx0:wx1].astype(bool)
        area = int(mask.sum())
        if area < 12:
            continue
        x0, y0 = x0 + wx0, y0 + wy0
        sl = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
        region = im[sl]
        colour = _object_colour(region[mask].mean(0), rng)
        region[mask] = rng.normal(0, rng.uniform(0, 10), (area, 1)) + colour  # slightly textured fill
        owner[sl][mask] = k
        x, y, bw, bh = cv2.boundingRect(mask.astype(np.uint8))
        objects.append((k, cls, (x0 + x, y0 + y, x0 + x + bw, y0 + y + bh), area))
    _clutter(im, rng, n_lines=int(rng.integers(0, 3)), n_scribbles=0)  # a few lines over the objects too
    im += rng.standard_normal(im.shape, dtype=np.float32) * np.float32(rng.uniform(2, 10))
    im = cv2.GaussianBlur(np.clip(im, 0, 255).astype(np.uint8), (3, 3), rng.uniform(0.3, 0.9))

    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(objects) + 9)
    labels = [
        (cls, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)
        for k, cls, (x1, y1, x2, y2), area in objects
        if visible[k] >= (1 - MAX_OCCLUDED) * area
    ]
    return im, np.array(labels, dtype=np.float64).reshape(-1, 5)


def generate_dataset(
    root: str | Path, n_train: int = 1000, n_val: int = 200, seed: int = 0, quality: int = 90, style: str = "shapes"
) -> Path:
    """Write root/images/{train,val}/NNNNNN.jpg and root/labels/{train,val}/NNNNNN.txt of STYLES[style]; returns root.

    Files this generator wrote before (same naming) and stale label caches are removed first; other files are
    left alone. Train and val use different random streams of the same seed.
    """
    root = Path(root)
    for split, n, stream in (("train", n_train, 0), ("val", n_val, 1)):
        im_dir, lb_dir = root / "images" / split, root / "labels" / split
        for d in (im_dir, lb_dir):
            d.mkdir(parents=True, exist_ok=True)
            for f in d.iterdir():
                if _OWN_FILE.match(f.name):
                    f.unlink()
        (root / "labels" / f"{split}.cache").unlink(missing_ok=True)
        rng = np.random.default_rng([seed, stream])
        for i in range(n):
            im, labels = make_image(rng, style)
            cv2.imwrite(str(im_dir / f"{i:06d}.jpg"), im, [cv2.IMWRITE_JPEG_QUALITY, quality])
            lines = [f"{int(c)} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for c, x, y, bw, bh in labels]
            (lb_dir / f"{i:06d}.txt").write_text("".join(lines))
    return root


def dataset_fingerprint(root: str | Path, seed: int = 0, quality: int = 90, style: str = "shapes") -> dict:
    """What a model trained on the dataset at root depends on: the generator's settings and a sha256 over the
    generated label files (split, file name and content, in name order). Equal fingerprints mean the same labels
    from the same generator, so a shipped teacher cannot silently go stale when the generator changes."""
    root = Path(root)
    digest, counts = hashlib.sha256(), {}
    for split in ("train", "val"):
        files = sorted(f for f in (root / "labels" / split).glob("*.txt") if _OWN_FILE.match(f.name))
        counts[split] = len(files)
        for f in files:
            digest.update(f"{split}/{f.name}\n".encode() + f.read_bytes())
    st = STYLES[style]
    settings = dict(
        n_train=counts["train"], n_val=counts["val"], seed=seed, quality=quality, names=list(st.names),
        image_sizes=[list(s) for s in st.image_sizes], min_size=st.min_size, max_size=st.max_size,
        max_occluded=MAX_OCCLUDED,
    )  # fmt: skip
    if style != "shapes":  # the built-in set's fingerprint stays what the shipped teacher's card records
        settings.update(style=style, max_objects=st.max_objects)
    return {"generator": settings, "labels_sha256": digest.hexdigest()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the built-in synthetic shapes dataset (YOLO format)")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "datasets" / "synthetic"))
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=list(STYLES), default="shapes", help="shapes: the built-in set")
    opt = parser.parse_args(argv)
    if opt.n_train < 0 or opt.n_val < 0:
        sys.exit("--n-train and --n-val must be >= 0")
    root = generate_dataset(opt.root, n_train=opt.n_train, n_val=opt.n_val, seed=opt.seed, style=opt.style)
    print(f"Synthetic dataset written to {root} ({opt.n_train} train, {opt.n_val} val images)")


if __name__ == "__main__":
    main()
