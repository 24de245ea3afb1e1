"""Image augmentations for detection training, as in YOLOv5 v7.0 (no Albumentations).

Images are OpenCV HWC uint8 BGR arrays. Labels passed between these functions are ``[n, 5]`` arrays
``(class, x1, y1, x2, y2)`` in pixels of the image they come with; segments are lists of ``[m, 2]`` pixel polygons.
"""

from __future__ import annotations

import math
import random

import cv2
import numpy as np


def augment_hsv(im: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5) -> None:
    """Scale hue, saturation and value of a BGR image in place by random gains in [1 - gain, 1 + gain].

    Lookup tables keep it cheap: one 256-entry table per channel. Hue wraps around OpenCV's 0-179 range.
    """
    if not (hgain or sgain or vgain):
        return
    gains = np.random.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=gains.dtype)
    lut_hue = ((x * gains[0]) % 180).astype(im.dtype)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(im.dtype)
    lut_val = np.clip(x * gains[2], 0, 255).astype(im.dtype)
    im_hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    cv2.cvtColor(im_hsv, cv2.COLOR_HSV2BGR, dst=im)


def hist_equalize(im: np.ndarray, clahe: bool = True, bgr: bool = False) -> np.ndarray:
    """Equalize the luma histogram of a 3-channel uint8 image (CLAHE or global); returns a new image."""
    yuv = cv2.cvtColor(im, cv2.COLOR_BGR2YUV if bgr else cv2.COLOR_RGB2YUV)
    if clahe:
        yuv[:, :, 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(yuv[:, :, 0])
    else:
        yuv[:, :, 0] = cv2.equalizeHist(yuv[:, :, 0])
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR if bgr else cv2.COLOR_YUV2RGB)


def letterbox(
    im: np.ndarray,
    new_shape: int | tuple[int, int] = (640, 640),
    color: tuple[int, int, int] = (114, 114, 114),
    auto: bool = True,
    scaleFill: bool = False,  # noqa: N803 (YOLOv5's keyword)
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping the aspect ratio, then pad to new_shape (h, w).

    auto: pad only up to the next multiple of stride (minimum rectangle) instead of the full new_shape.
    scaleFill: stretch to new_shape without padding. scaleup=False never enlarges (better val mAP).
    Returns (image, (width ratio, height ratio), (dw, dh) padding added on each of left/right and top/bottom, px).
    A pixel (x, y) of the input lands at (x * ratio[0] + dw, y * ratio[1] + dh).
    """
    shape = im.shape[:2]  # h, w
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    ratio = r, r
    new_unpad = round(shape[1] * r), round(shape[0] * r)  # w, h
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    elif scaleFill:
        dw, dh = 0.0, 0.0
        new_unpad = (new_shape[1], new_shape[0])
        ratio = new_shape[1] / shape[1], new_shape[0] / shape[0]
    dw /= 2
    dh /= 2
    if shape[::-1] != new_unpad:
        im = cv2.resize(im, new_unpad, interpolation=cv2.INTER_LINEAR)
    # an odd padding puts the extra pixel at the bottom/right; -0.1/+0.1 rounds the two halves apart
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (dw, dh)


def resample_segments(segments: list[np.ndarray], n: int = 1000) -> list[np.ndarray]:
    """Linearly resample each closed polygon [m, 2] to n points, so warps bound it tightly."""
    out = []
    for s in segments:
        s = np.concatenate((s, s[0:1, :]), axis=0)
        x = np.linspace(0, len(s) - 1, n)
        xp = np.arange(len(s))
        out.append(np.stack([np.interp(x, xp, s[:, i]) for i in range(2)], 1).astype(np.float32))
    return out


def segment2box(segment: np.ndarray, width: int = 640, height: int = 640) -> np.ndarray:
    """xyxy box [4] of the polygon's points that lie inside the image (zeros if none do)."""
    x, y = segment.T
    inside = (x >= 0) & (y >= 0) & (x <= width) & (y <= height)
    x, y = x[inside], y[inside]
    return np.array([x.min(), y.min(), x.max(), y.max()]) if any(x) else np.zeros(4)


def box_candidates(
    box1: np.ndarray,
    box2: np.ndarray,
    wh_thr: float = 2,
    ar_thr: float = 100,
    area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """Which boxes survive an augmentation: box1 [4, n] xyxy before (scaled by the warp's gain), box2 [4, n] after.

    A box is kept when it is wider and taller than wh_thr pixels, keeps more than area_thr of its area and has an
    aspect ratio below ar_thr. Returns a bool [n] mask.
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def random_perspective(
    im: np.ndarray,
    targets: np.ndarray = (),
    segments: list[np.ndarray] = (),
    degrees: float = 10,
    translate: float = 0.1,
    scale: float = 0.1,
    shear: float = 10,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation (degrees), translation (fraction), scale (gain +/-), shear (degrees) and perspective.

    targets: [n, 5] (class, x1, y1, x2, y2) in pixels of im. border (negative, as the mosaic's -s/2) crops the
    output to im's size + 2 * border on each axis. Boxes are warped by their 4 corners (or by their polygon when
    segments are given, one per target), clipped to the output and filtered by box_candidates.
    Returns (warped image, kept targets in output pixels).
    """
    height = im.shape[0] + border[0] * 2
    width = im.shape[1] + border[1] * 2

    center = np.eye(3)  # move the image centre to the origin so rotation/scale/shear act about it
    center[0, 2] = -im.shape[1] / 2
    center[1, 2] = -im.shape[0] / 2

    persp = np.eye(3)
    persp[2, 0] = random.uniform(-perspective, perspective)
    persp[2, 1] = random.uniform(-perspective, perspective)

    rot = np.eye(3)
    angle = random.uniform(-degrees, degrees)
    gain = random.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=gain)

    sh = np.eye(3)
    sh[0, 1] = math.tan(random.uniform(-shear, shear) * math.pi / 180)
    sh[1, 0] = math.tan(random.uniform(-shear, shear) * math.pi / 180)

    tr = np.eye(3)
    tr[0, 2] = random.uniform(0.5 - translate, 0.5 + translate) * width
    tr[1, 2] = random.uniform(0.5 - translate, 0.5 + translate) * height

    M = tr @ sh @ rot @ persp @ center  # applied right to left
    if border[0] != 0 or border[1] != 0 or (M != np.eye(3)).any():
        if perspective:
            im = cv2.warpPerspective(im, M, dsize=(width, height), borderValue=(114, 114, 114))
        else:
            im = cv2.warpAffine(im, M[:2], dsize=(width, height), borderValue=(114, 114, 114))

    n = len(targets)
    if not n:
        return im, targets
    use_segments = len(segments) == n and any(x.any() for x in segments)
    new = np.zeros((n, 4))
    if use_segments:
        for i, segment in enumerate(resample_segments(segments)):
            xy = np.ones((len(segment), 3))
            xy[:, :2] = segment
            xy = xy @ M.T
            xy = xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]
            new[i] = segment2box(xy, width, height)
    else:
        xy = np.ones((n * 4, 3))
        xy[:, :2] = targets[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # the 4 corners of each box
        xy = xy @ M.T
        xy = (xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]).reshape(n, 8)
        x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
        new = np.stack((x.min(1), y.min(1), x.max(1), y.max(1)), 1)
        new[:, [0, 2]] = new[:, [0, 2]].clip(0, width)
        new[:, [1, 3]] = new[:, [1, 3]].clip(0, height)

    keep = box_candidates(box1=targets[:, 1:5].T * gain, box2=new.T, area_thr=0.01 if use_segments else 0.10)
    targets = targets[keep]
    targets[:, 1:5] = new[keep]
    return im, targets


def _ioa(box: np.ndarray, boxes: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Intersection of one xyxy box [4] with each of boxes [n, 4], over the area of each of boxes."""
    iw = (np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])).clip(0)
    ih = (np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])).clip(0)
    return iw * ih / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + eps)


def copy_paste(
    im: np.ndarray, labels: np.ndarray, segments: list[np.ndarray], p: float = 0.5
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Copy-paste (https://arxiv.org/abs/2012.07177): paste a left-right mirrored copy of a fraction p of the
    segmented objects, where the copy hides at most 30% of any existing box. Needs polygon labels; a no-op without.
    """
    n = len(segments)
    if not (p and n):
        return im, labels, segments
    w = im.shape[1]
    pasted = np.zeros(im.shape, np.uint8)
    for j in random.sample(range(n), k=round(p * n)):
        lb, seg = labels[j], segments[j]
        box = np.array([w - lb[3], lb[2], w - lb[1], lb[4]])
        if (_ioa(box, labels[:, 1:5]) < 0.30).all():
            labels = np.concatenate((labels, [[lb[0], *box]]), 0)
            segments.append(np.concatenate((w - seg[:, 0:1], seg[:, 1:2]), 1))
            cv2.drawContours(pasted, [segments[j].astype(np.int32)], -1, (1, 1, 1), cv2.FILLED)
    flipped = cv2.flip(im, 1)
    mask = cv2.flip(pasted, 1).astype(bool)
    im[mask] = flipped[mask]
    return im, labels, segments


def mixup(im: np.ndarray, labels: np.ndarray, im2: np.ndarray, labels2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MixUp (https://arxiv.org/abs/1710.09412) of two same-size images with ratio ~ Beta(32, 32); labels of both kept."""
    r = np.random.beta(32.0, 32.0)
    im = (im * r + im2 * (1 - r)).astype(np.uint8)
    return im, np.concatenate((labels, labels2), 0)
