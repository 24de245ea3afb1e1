"""Augmentations keep boxes on the pixels they label: letterbox, random_perspective, mosaic (+ flips), mixup."""

import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.augmentations import augment_hsv, box_candidates, letterbox, mixup, random_perspective
from utils.dataloaders import LoadImagesAndLabels

BG = (40, 40, 40)


def colour_of(k: int) -> tuple[int, int, int]:
    """A distinct, saturated BGR colour per rectangle id, far from BG and from letterbox grey 114."""
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0),
               (128, 0, 255), (0, 128, 255), (255, 255, 255), (128, 255, 0), (0, 255, 128)]  # fmt: skip
    return palette[k]


def draw(w: int, h: int, rects: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """Uniform BG image with filled rectangles (k, x1, y1, x2, y2), pixels x1..x2-1 / y1..y2-1."""
    im = np.full((h, w, 3), BG, np.uint8)
    for k, x1, y1, x2, y2 in rects:
        im[y1:y2, x1:x2] = colour_of(k)
    return im


def assert_boxes_on_colour(im: np.ndarray, boxes: np.ndarray, margin: int = 2) -> None:
    """Every box (class k, x1, y1, x2, y2 in pixels of BGR im): its inside (shrunk by margin) is colour k, and a
    band just outside it (grown by margin + 1) contains no pixel of colour k."""
    h, w = im.shape[:2]
    for k, x1, y1, x2, y2 in boxes:
        colour = np.array(colour_of(int(k)))
        x1, y1, x2, y2 = round(x1), round(y1), round(x2), round(y2)
        inner = im[y1 + margin : y2 - margin, x1 + margin : x2 - margin].reshape(-1, 3).astype(int)
        if inner.size:
            match = (np.abs(inner - colour).max(1) < 40).mean()
            assert match > 0.97, f"box {k} {(x1, y1, x2, y2)}: only {match:.2f} of its inside has its colour"
        outer = np.zeros((h, w), bool)
        outer[max(y1 - margin - 2, 0) : y2 + margin + 2, max(x1 - margin - 2, 0) : x2 + margin + 2] = True
        outer[max(y1 - margin, 0) : y2 + margin, max(x1 - margin, 0) : x2 + margin] = False
        band = im[outer].astype(int)
        assert not (np.abs(band - colour).max(1) < 40).any(), f"box {k}: its colour continues outside the box"


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (80, 80)])
def test_letterbox_maps_boxes(shape):
    w, h = shape
    rects = [(0, 5, 7, 30, 25), (1, w - 30, h - 20, w - 4, h - 3)]
    im = draw(w, h, rects)
    out, ratio, (dw, dh) = letterbox(im, 128, auto=False)
    assert out.shape == (128, 128, 3)
    assert min(out.shape[0] - 2 * dh, out.shape[1] - 2 * dw) >= 0
    boxes = np.array([[k, x1 * ratio[0] + dw, y1 * ratio[1] + dh, x2 * ratio[0] + dw, y2 * ratio[1] + dh]
                      for k, x1, y1, x2, y2 in rects])  # fmt: skip
    assert_boxes_on_colour(out, boxes)
    # the padding is letterbox grey, on both sides of the short dimension
    if w > h:
        assert (out[0] == 114).all() and (out[-1] == 114).all()
    elif h > w:
        assert (out[:, 0] == 114).all() and (out[:, -1] == 114).all()


def test_letterbox_modes():
    im = np.zeros((50, 100, 3), np.uint8)
    assert letterbox(im, 64, auto=True, stride=32)[0].shape == (32, 64, 3)  # minimum stride-multiple rectangle
    assert letterbox(im, 640, auto=False, scaleup=False)[0].shape == (640, 640, 3)
    out, ratio, pad = letterbox(im, 640, auto=False, scaleup=False)
    assert ratio == (1.0, 1.0) and pad == (270.0, 295.0)  # not enlarged, centred
    out, ratio, pad = letterbox(im, (64, 32), auto=False, scaleFill=True)
    assert out.shape == (64, 32, 3) and ratio == (0.32, 1.28) and pad == (0.0, 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_random_perspective_translate_scale(seed):
    random.seed(seed)
    rects = [(0, 10, 10, 40, 30), (1, 60, 15, 110, 50), (2, 20, 60, 50, 110), (3, 100, 100, 127, 127)]
    im = draw(128, 128, rects)
    targets = np.array(rects, dtype=float)
    out, kept = random_perspective(im, targets.copy(), degrees=0, translate=0.2, scale=0.5, shear=0, perspective=0)
    assert out.shape == im.shape
    assert kept.ndim == 2 and kept.shape[1] == 5
    assert (kept[:, 1:] >= 0).all() and (kept[:, [1, 3]] <= 128).all() and (kept[:, [2, 4]] <= 128).all()
    assert_boxes_on_colour(out, kept)


def test_random_perspective_border_and_empty():
    random.seed(0)
    im = draw(128, 128, [])
    out, kept = random_perspective(
        im, np.zeros((0, 5)), degrees=5, translate=0.1, scale=0.2, shear=2, border=(-32, -32)
    )
    assert out.shape == (64, 64, 3) and len(kept) == 0


def test_box_candidates():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 100, 2]], float).T
    after = np.array([[0, 0, 9, 9], [0, 0, 1.5, 10], [0, 0, 3, 3], [0, 0, 100, 2.5]], float).T
    # kept; too narrow (< 2 px); 9% of its area left (< 10%); kept (aspect 40 < 100)
    assert box_candidates(before, after).tolist() == [True, False, False, True]


def test_mixup_combines_images_and_labels():
    np.random.seed(0)
    a, b = np.full((8, 8, 3), 200, np.uint8), np.full((8, 8, 3), 0, np.uint8)
    la, lb = np.array([[0, 1, 1, 4, 4]], float), np.array([[1, 2, 2, 6, 6], [2, 0, 0, 3, 3]], float)
    im, labels = mixup(a, la, b, lb)
    assert labels.tolist() == la.tolist() + lb.tolist()
    assert 60 < im[0, 0, 0] < 140  # Beta(32, 32) ratios stay near 0.5
    assert (im == im[0, 0, 0]).all()


def test_augment_hsv_value_gain_scales_grey():
    np.random.seed(1)
    im = np.zeros((4, 8, 3), np.uint8)
    im[:, :4], im[:, 4:] = 60, 120
    before = im.copy()
    augment_hsv(im, hgain=0, sgain=0, vgain=0.5)
    assert (im[..., 0] == im[..., 1]).all() and (im[..., 1] == im[..., 2]).all()  # still grey
    r1, r2 = im[0, 0, 0] / 60, im[0, 4, 0] / 120
    assert abs(r1 - r2) < 0.03 and 0.5 <= r1 <= 1.5  # one gain for all pixels
    im2 = before.copy()
    augment_hsv(im2, 0, 0, 0)
    assert (im2 == before).all()


def _tile_dataset(tmp_path: Path, n: int = 4) -> Path:
    """n PNG images (sizes vary, one non-square), each with up to 3 uniquely coloured rectangles."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    k = 0
    for i in range(n):
        w, h = [(96, 64), (64, 96), (80, 80), (128, 96)][i % 4]
        rects = []
        for _ in range(3):
            if k >= 12:
                break
            bw, bh = rng.integers(12, 30, 2)
            x1, y1 = rng.integers(0, w - bw), rng.integers(0, h - bh)
            if all(x1 + bw <= a or b <= x1 or y1 + bh <= c or d <= y1 for _, a, c, b, d in rects):
                rects.append((k, int(x1), int(y1), int(x1 + bw), int(y1 + bh)))
                k += 1
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), draw(w, h, rects))
        rows = [
            f"{c} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n"
            for c, x1, y1, x2, y2 in rects
        ]
        (tmp_path / "labels" / f"{i}.txt").write_text("".join(rows))
    return tmp_path / "images"


HYP = dict(mosaic=1.0, mixup=0.0, copy_paste=0.0, degrees=0.0, translate=0.1, scale=0.5, shear=0.0, perspective=0.0,
           hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, flipud=0.5, fliplr=0.5)  # fmt: skip


@pytest.mark.parametrize("mosaic", [1.0, 0.0])
def test_mosaic_and_flips_keep_boxes_on_pixels(tmp_path, mosaic):
    ds = LoadImagesAndLabels(_tile_dataset(tmp_path), img_size=128, augment=True, hyp={**HYP, "mosaic": mosaic})
    random.seed(0)
    np.random.seed(0)
    n_boxes = 0
    for i in range(12):
        img, labels, _, shapes = ds[i % ds.n]
        assert img.shape == (3, 128, 128) and labels.shape[1] == 6
        assert (shapes is None) == (mosaic == 1.0)
        im = np.ascontiguousarray(img.numpy().transpose(1, 2, 0)[..., ::-1])  # back to HWC BGR
        xywh = labels[:, 2:].numpy() * 128
        boxes = np.concatenate(
            (labels[:, 1:2].numpy(), xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1
        )
        assert_boxes_on_colour(im, boxes)
        if not mosaic:  # (a mosaic may draw the same image twice)
            assert len(np.unique(boxes[:, 0])) == len(boxes)  # each rectangle labelled once
        n_boxes += len(boxes)
    assert n_boxes > 12
