"""Official YOLOv5n v7.0 on real data (../shared/real; skipped without it): val.py gives official YOLOv5's metrics on
COCO128 at 640 (shared/real/README.md: P 0.623, R 0.494, mAP50 0.558, mAP50-95 0.363 with --batch 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

import val

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (REAL / "coco128").is_dir(), reason="needs ../shared/real")]


def test_val_on_coco128_equals_official_yolov5(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAML's path is relative to the project root, as YOLOv5's
    (p, r, map50, map5095, *_), _, _ = val.run(
        data=str(REAL / "coco128.yaml"), weights=str(REAL / "weights/yolov5n.pt"), imgsz=640, batch_size=8,
        device="cpu", workers=0, project=str(tmp_path), plots=False,
    )  # fmt: skip
    assert [round(x, 3) for x in (p, r, map50, map5095)] == [0.623, 0.494, 0.558, 0.363]
