"""Official YOLOv5n v7.0 on real data (../shared/real; skipped without it): val.py gives official YOLOv5's metrics on
COCO128 at 640 (shared/real/README.md: P 0.623, R 0.494, mAP50 0.558, mAP50-95 0.363 with --batch 8), detect.py its
detections on bus.jpg and zidane.jpg, and the ONNX and TorchScript exports detect.py's detections of the .pt.
Training from the real checkpoint: tests/test_real_train.py."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
import export
import val
from utils.augmentations import letterbox

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (REAL / "coco128").is_dir(), reason="needs ../shared/real")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine OpenMP threads spin waiting for each other (measured at load 8: the
    val test took 41 s with two threads, 18 s with one); an idle machine loses at most its second core's share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_val_on_coco128_equals_official_yolov5(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAML's path is relative to the project root, as YOLOv5's
    (p, r, map50, map5095, *_), _, _ = val.run(
        data=str(REAL / "coco128.yaml"), weights=str(REAL / "weights/yolov5n.pt"), imgsz=640, batch_size=8,
        device="cpu", workers=0, project=str(tmp_path), plots=False,
    )  # fmt: skip
    assert [round(x, 3) for x in (p, r, map50, map5095)] == [0.623, 0.494, 0.558, 0.363]


# official YOLOv5 detect.py at 640, conf 0.25 (shared/real/README.md): class id -> count per image
OFFICIAL_DETECTIONS = {"bus": {0: 4, 5: 1}, "zidane": {0: 2, 27: 1}}  # person, bus; person, tie


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """yolov5n.pt exported at 640 to TorchScript and ONNX, fixed-shape (export.py's default) and --dynamic; the
    files land beside their input, so each export reads its own copy of the checkpoint (~3 s each)."""
    files = {"pt": REAL / "weights/yolov5n.pt"}
    for kind, kwargs in (("fixed", {}), ("dynamic", {"dynamic": True})):
        pt = tmp_path_factory.mktemp(kind) / "yolov5n.pt"
        shutil.copyfile(REAL / "weights/yolov5n.pt", pt)
        for f in export.run(weights=str(pt), imgsz=(640, 640), include=["torchscript", "onnx"], **kwargs):
            files[f"{kind}-{Path(f).suffix.lstrip('.')}"] = Path(f)
    return files


def _detect(weights: Path, source: Path, project: Path) -> dict[str, np.ndarray]:
    """detect.py at 640 (conf 0.25) -> {image stem: label rows (class, x, y, w, h, conf) sorted by class, x, y}."""
    save_dir = detect.run(weights=[str(weights)], source=source, imgsz=[640], device="cpu", save_txt=True,
                          save_conf=True, nosave=True, project=project)  # fmt: skip
    out = {}
    for f in sorted((save_dir / "labels").glob("*.txt")):
        rows = np.loadtxt(f, ndmin=2)
        out[f.stem] = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
    return out


def _assert_same_detections(got: dict, expected: dict, sizes: dict[str, tuple[int, int]]) -> None:
    """Same classes; box sides within 1 px of the image (sizes: stem -> (w, h)); confidences within 1e-4.

    detect.py rounds each box to whole pixels before writing it, so the ~1e-4 px by which FP32 backends differ can
    move a rounded edge by one pixel, never more; their scores differ by float summation order, ~1e-6 (measured:
    boxes identical, confidences within 1e-6 on these two images)."""
    assert got.keys() == expected.keys()
    for stem, rows in expected.items():
        w, h = sizes[stem]
        assert got[stem][:, 0].tolist() == rows[:, 0].tolist(), stem
        px = np.abs(got[stem][:, 1:5] - rows[:, 1:5]) * [w, h, w, h]
        assert px.max() <= 1.0 + 1e-3, stem  # + the 6 digits of the label file
        assert np.abs(got[stem][:, 5] - rows[:, 5]).max() < 1e-4, stem


def test_exports_detect_as_the_pt_on_real_images(exports, tmp_path):
    images = REAL / "images"
    sizes = {f.stem: cv2.imread(str(f)).shape[1::-1] for f in images.glob("*.jpg")}
    expected = _detect(exports["pt"], images, tmp_path)
    counts = {stem: Counter(rows[:, 0].astype(int).tolist()) for stem, rows in expected.items()}
    assert counts == OFFICIAL_DETECTIONS
    for fmt in ("dynamic-onnx", "dynamic-torchscript"):  # letterboxed as the .pt: 640x480 bus, 384x640 zidane
        _assert_same_detections(_detect(exports[fmt], images, tmp_path), expected, sizes)

    # A fixed-shape export letterboxes every image to its 640x640 (as YOLOv5 does for non-PyTorch backends), which
    # pads bus.jpg more and changes its detections (3 persons, not 4): it equals the .pt on images already 640x640.
    square = tmp_path / "square"
    square.mkdir()
    for f in images.glob("*.jpg"):
        cv2.imwrite(str(square / f"{f.stem}.png"), letterbox(cv2.imread(str(f)), 640, auto=False)[0])
    expected = _detect(exports["pt"], square, tmp_path)
    assert {stem: len(rows) for stem, rows in expected.items()} == {"bus": 4, "zidane": 3}
    for fmt in ("fixed-onnx", "fixed-torchscript"):
        _assert_same_detections(_detect(exports[fmt], square, tmp_path), expected, dict.fromkeys(sizes, (640, 640)))
