"""val.py end to end on a tiny generated dataset, with a stand-in model whose detections are known exactly.

The stand-in "detector" finds the solid rectangles drawn in the images (red = class 0, yellow = class 1) with
connected components, so its boxes equal the labels to the pixel and the expected metrics follow by hand.
"""

from __future__ import annotations

import inspect
import json
import logging
import runpy
import shutil
import sys
from copy import deepcopy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn

import val
from utils.dataloaders import create_dataloader
from utils.general import UserError

ROOT = Path(__file__).resolve().parents[1]
PERFECT = 1 - 0.01 / 2  # YOLOv5's 101-point AP of a perfect detector (see test_metrics)
# images: name -> ((h, w), [(class, x1, y1, x2, y2) in pixels]); width-13 rectangles are "hard" (see FakeDetector)
IMAGES = {
    "17": ((48, 64), [(0, 4, 4, 20, 20), (1, 30, 10, 50, 40)]),
    "img_a": ((64, 48), [(0, 5, 5, 25, 25), (0, 30, 30, 43, 60)]),
    "img_b": ((48, 64), [(1, 2, 25, 22, 45), (0, 40, 2, 60, 22)]),
    "empty": ((40, 40), []),
}
COLORS_BGR = {0: (0, 0, 255), 1: (0, 255, 255)}  # red, yellow: R is always 255, G tells the class


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Write the images (PNG: lossless), YOLO labels, one corrupt image and a data YAML; return the YAML path."""
    root = tmp_path_factory.mktemp("rects")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for name, ((h, w), boxes) in IMAGES.items():
        im = np.zeros((h, w, 3), np.uint8)
        rows = []
        for c, x1, y1, x2, y2 in boxes:
            im[y1:y2, x1:x2] = COLORS_BGR[c]
            rows.append(f"{c} {(x1 + x2) / 2 / w:.8f} {(y1 + y2) / 2 / h:.8f} {(x2 - x1) / w:.8f} {(y2 - y1) / h:.8f}")
        cv2.imwrite(str(root / "images" / f"{name}.png"), im)
        (root / "labels" / f"{name}.txt").write_text("\n".join(rows))
    (root / "images" / "bad.jpg").write_bytes(b"this is not a JPEG")
    (root / "labels" / "bad.txt").write_text("0 0.5 0.5 0.2 0.2")
    data = {"path": str(root), "train": "images", "val": "images", "names": {0: "red", 1: "yellow"}}
    (root / "rects.yaml").write_text(yaml.safe_dump(data))
    return root / "rects.yaml"


class FakeDetector(nn.Module):
    """Eval-mode YOLOv5 interface: forward(im [B, 3, H, W] RGB 0-1) -> (pred [B, N, 5 + nc] xywh pixels, [])."""

    def __init__(self, nc: int = 2, min_width: int = 0, conf: float = 0.9):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # val reads the device and dtype from the parameters
        self.register_buffer("stride", torch.tensor([8.0, 16.0, 32.0]))
        self.names = {0: "red", 1: "yellow", **{i: f"c{i}" for i in range(2, nc)}}
        self.nc, self.min_width, self.conf = nc, min_width, conf

    def forward(self, im, augment=False):
        out = torch.zeros(im.shape[0], 8, 5 + self.nc)
        for b, x in enumerate(im.float().cpu().numpy()):
            mask = (x[0] > 0.9).astype(np.uint8)  # rectangles have R = 1; the 114-grey letterbox padding does not
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
            rows = [s for s in stats[1:n] if s[2] >= self.min_width]
            for k, (left, top, w, h, _) in enumerate(rows):
                cls = int(x[1, top, left] > 0.5)
                out[b, k, :5] = torch.tensor([left + w / 2, top + h / 2, w, h, self.conf])
                out[b, k, 5 + cls] = 1.0
        return out.to(im.device, im.dtype), []


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def row(self, first: str) -> list[str]:
        """The results row whose first column is `first` ('all' or a class name), split into columns."""
        return next(line.split() for line in self.lines if line.split()[:1] == [first])


@pytest.fixture
def log():
    handler = LogLines()
    logger = logging.getLogger("yolov5")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def run_fake(monkeypatch, dataset, tmp_path, model, **kwargs):
    monkeypatch.setattr(val, "attempt_load", lambda weights, device=None, **k: model.to(device))
    kw = {"weights": "fake.pt", "batch_size": 2, "imgsz": 64, "workers": 0, "project": tmp_path, "half": False}
    return val.run(data=dataset if isinstance(dataset, dict) else str(dataset), **(kw | kwargs))


def test_perfect_detector(monkeypatch, dataset, tmp_path, log):
    (mp, mr, map50, map_), maps, times = run_fake(
        monkeypatch, dataset, tmp_path, FakeDetector(), save_txt=True, save_conf=True, save_json=True
    )
    assert mp == pytest.approx(1) and mr == pytest.approx(1)
    assert map50 == pytest.approx(PERFECT) and map_ == pytest.approx(PERFECT)
    assert maps.shape == (2,) and np.allclose(maps, PERFECT)
    assert len(times) == 3 and all(t >= 0 for t in times)
    # the corrupt image is left out: 4 images seen, 6 labels
    assert log.row("all")[1:3] == ["4", "6"]
    assert log.row("yellow")[1:3] == ["4", "2"]  # per-class rows: nc < 50 and not training
    save_dir = tmp_path / "exp"

    # --save-txt --save-conf: normalized xywh in the original image equal to the label files we wrote
    for name, (_, boxes) in IMAGES.items():
        f = save_dir / "labels" / f"{name}.txt"
        if not boxes:
            assert not f.exists()  # no detections, no file
            continue
        got = np.loadtxt(f, ndmin=2)
        expected = np.loadtxt(dataset.parent / "labels" / f"{name}.txt", ndmin=2)
        got = got[np.lexsort(got[:, :2].T[::-1])]
        expected = expected[np.lexsort(expected[:, :2].T[::-1])]
        assert np.allclose(got[:, :5], expected, atol=1e-4)
        assert np.allclose(got[:, 5], 0.9)

    # --save-json: COCO [x_min, y_min, w, h] in original pixels; numeric file stems become int ids
    results = json.loads((save_dir / "fake_predictions.json").read_text())
    assert len(results) == 6
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append((r["category_id"], *r["bbox"], r["score"]))
    assert set(by_image) == {17, "img_a", "img_b"}
    for name, (_, boxes) in IMAGES.items():
        if boxes:
            expected = sorted((c, x1, y1, x2 - x1, y2 - y1, 0.9) for c, x1, y1, x2, y2 in boxes)
            key = int(name) if name.isnumeric() else name
            assert np.allclose(sorted(by_image[key]), expected, atol=1e-3)

    for f in ("confusion_matrix.png", "PR_curve.png", "F1_curve.png", "val_batch0_labels.jpg", "val_batch0_pred.jpg"):
        assert (save_dir / f).stat().st_size > 0


def test_missed_object_by_hand(monkeypatch, dataset, tmp_path, log):
    """The detector misses the width-13 rectangle: 3 of 4 red found, with precision 1."""
    (mp, mr, map50, map_), maps, _ = run_fake(monkeypatch, dataset, tmp_path, FakeDetector(min_width=14), plots=False)
    red_ap = 0.75 + 0.25 / 2  # envelope 1 up to recall 0.75, then a straight line to the (1, 0) sentinel
    assert maps == pytest.approx([red_ap, PERFECT])
    assert map50 == pytest.approx((red_ap + PERFECT) / 2) and map_ == pytest.approx((red_ap + PERFECT) / 2)
    assert mp == pytest.approx(1) and mr == pytest.approx((0.75 + 1) / 2)
    assert not (tmp_path / "exp" / "confusion_matrix.png").exists()  # plots=False
    assert log.row("red")[3:5] == ["1", "0.75"]


def test_pycocotools_evaluation(monkeypatch, dataset, tmp_path):
    """With an annotations JSON beside the data, mAP comes from COCOeval: its step-wise 101-point AP gives a
    perfect class 1.0 and the class with recall 0.75 (precision 1) 76/101 recall points."""
    root = tmp_path / "coco_style"  # the same images renamed to numeric ids, as COCO's
    for d in ("annotations", "images", "labels"):
        (root / d).mkdir(parents=True)
    images, annotations = [], []
    for image_id, (name, ((h, w), boxes)) in enumerate(IMAGES.items(), 100):
        for d, suffix in (("images", ".png"), ("labels", ".txt")):
            shutil.copy(dataset.parent / d / f"{name}{suffix}", root / d / f"{image_id}{suffix}")
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id}.png"})
        for c, x1, y1, x2, y2 in boxes:
            box = [x1, y1, x2 - x1, y2 - y1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
    categories = [{"id": 0, "name": "red"}, {"id": 1, "name": "yellow"}]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    data = {"path": str(root), "train": "images", "val": "images", "names": {0: "red", 1: "yellow"}}
    (mp, mr, map50, map_), maps, _ = run_fake(
        monkeypatch, data, tmp_path, FakeDetector(min_width=14), save_json=True, plots=False
    )
    assert map_ == pytest.approx((76 / 101 + 1) / 2) and map50 == pytest.approx((76 / 101 + 1) / 2)
    assert maps == pytest.approx([0.875, PERFECT])  # per-class maps stay YOLOv5's own


def test_training_path_averages_loss_items(dataset, tmp_path):
    """train.py passes its model, loader and ComputeLoss: losses come back in compute_loss.names order."""
    data = val.check_dataset(str(dataset))
    loader = create_dataloader(data["val"], 64, 2, 32, pad=0.5, rect=True, workers=0)[0]

    class FakeLoss:
        names = ("box", "obj", "cls", "imitation")

        def __call__(self, p, targets):
            items = {"cls": torch.tensor(0.3), "box": torch.tensor(0.1), "imitation": torch.tensor(0.0)}
            items["obj"] = torch.tensor(0.2 + 0.1 * len(targets))  # varies by batch: checks the average
            return sum(items.values()), items

    calls = []

    class LossyDetector(FakeDetector):
        def forward(self, im, augment=False):
            calls.append(im.shape[0])
            return super().forward(im)

    results, maps, _ = val.run(data, model=LossyDetector(), dataloader=loader, save_dir=tmp_path, plots=False,
                               compute_loss=FakeLoss(), half=True)  # fmt: skip
    labels_per_batch = [len(t) for _, t, _, _ in loader]
    assert len(results) == 8 and len(calls) == len(labels_per_batch) == len(loader)
    assert results[4] == pytest.approx(0.1) and results[6] == pytest.approx(0.3) and results[7] == 0
    assert results[5] == pytest.approx(0.2 + 0.1 * np.mean(labels_per_batch))
    assert results[2] == pytest.approx(PERFECT)
    assert not list(tmp_path.iterdir())  # nothing saved without plots / txt / json


def test_wrong_number_of_classes(monkeypatch, dataset, tmp_path):
    with pytest.raises(UserError, match="classes"):
        run_fake(monkeypatch, dataset, tmp_path, FakeDetector(nc=5), plots=False)
    # --single-cls skips the check and scores every box as class 0
    (_, _, map50, _), maps, _ = run_fake(monkeypatch, dataset, tmp_path, FakeDetector(nc=5), single_cls=True,
                                         plots=False)  # fmt: skip
    assert maps.shape == (1,) and map50 == pytest.approx(PERFECT)


def test_real_model_checkpoint(dataset, tmp_path):
    """A fresh (narrowed) yolov5n checkpoint goes through attempt_load and NMS: metrics are valid numbers in [0, 1]."""
    from models.yolo import DetectionModel
    from utils.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text()) | {"width_multiple": 0.125}  # 2 CPU cores
    model = DetectionModel(cfg, nc=2)
    model.names = {0: "red", 1: "yellow"}
    weights = tmp_path / "tiny.pt"
    save_checkpoint({"epoch": -1, "model": deepcopy(model).half(), "ema": None}, weights)
    # an untrained model's confidences are ~1e-3 (YOLOv5's objectness bias init): a tiny threshold keeps boxes
    results, maps, times = val.run(str(dataset), weights=str(weights), batch_size=4, imgsz=64, workers=0,
                                   project=tmp_path, plots=False, conf_thres=1e-5, save_txt=True)  # fmt: skip
    assert len(results) == 4 and all(0 <= x <= 1 for x in results)
    assert maps.shape == (2,) and np.isfinite(maps).all()
    saved = list((tmp_path / "exp" / "labels").glob("*.txt"))
    assert len(saved) == 4  # every readable image got detections, in valid normalized coordinates
    rows = np.concatenate([np.loadtxt(f, ndmin=2) for f in saved])
    assert rows.shape[1] == 5 and (rows[:, 1:] >= 0).all() and (rows[:, 1:] <= 1 + 1e-6).all()
    assert max(len(np.loadtxt(f, ndmin=2)) for f in saved) <= 300  # max_det

    # train.py's path with the real ComputeLoss: its loss items come back after the metrics, finite
    from utils.loss import ComputeLoss

    hyp = yaml.safe_load((ROOT / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    loader = create_dataloader(val.check_dataset(str(dataset))["val"], 64, 4, 32, pad=0.5, rect=True, workers=0)[0]
    data = {"nc": 2, "val": "unused"}
    results, _, _ = val.run(data, model=model.eval(), dataloader=loader, compute_loss=ComputeLoss(model, hyp),
                            conf_thres=1e-5, plots=False)  # fmt: skip
    assert len(results) == 4 + 3 and all(np.isfinite(results)) and results[5] > 0  # box, obj, cls; obj > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_half_precision_on_cuda(monkeypatch, dataset, tmp_path):
    (_, _, map50, map_), _, _ = run_fake(monkeypatch, dataset, tmp_path, FakeDetector(), device="0", half=True)
    assert map50 == pytest.approx(PERFECT) and map_ == pytest.approx(PERFECT)
    assert (tmp_path / "exp" / "confusion_matrix.png").is_file()

    # train.py's path in FP16: afterwards the model is FP32 again and still trainable (no inference tensors)
    from models.yolo import DetectionModel

    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text()) | {"width_multiple": 0.125}
    model = DetectionModel(cfg, nc=2).cuda()
    loader = create_dataloader(val.check_dataset(str(dataset))["val"], 64, 4, 32, pad=0.5, rect=True, workers=0)[0]
    val.run({"nc": 2}, model=model.eval(), dataloader=loader, half=True, plots=False)
    assert all(p.dtype == torch.float32 and not p.is_inference() for p in model.parameters())
    model.train()
    sum(x.sum() for x in model(torch.rand(2, 3, 64, 64, device="cuda"))).backward()


def test_parse_opt_flags(dataset):
    opt = val.parse_opt(["--data", str(dataset), "--img", "96", "--save-hybrid", "--max-det", "7", "--weights", "a.pt"])
    assert opt.imgsz == 96 and opt.save_txt and opt.max_det == 7 and opt.weights == ["a.pt"]
    assert opt.task == "val" and opt.conf_thres == 0.001 and opt.iou_thres == 0.6 and not opt.half
    assert not opt.save_json  # only forced on for coco.yaml
    assert set(vars(opt)) <= set(inspect.signature(val.run).parameters)  # main passes every flag to run()


def test_speed_task(monkeypatch, dataset, tmp_path, log):
    monkeypatch.setattr(val, "attempt_load", lambda *a, **k: FakeDetector())
    opt = val.parse_opt(["--data", str(dataset), "--img", "64", "--task", "speed", "--project", str(tmp_path),
                         "--workers", "0", "--save-json"])  # fmt: skip
    val.main(opt)
    assert opt.conf_thres == 0.25 and opt.iou_thres == 0.45 and not opt.save_json
    assert any(line.startswith("Speed:") for line in log.lines)
    assert not list((tmp_path / "exp").iterdir())  # no plots, no json


def test_half_on_cpu_says_it_runs_fp32(monkeypatch, dataset, tmp_path, log):
    monkeypatch.setattr(val, "attempt_load", lambda *a, **k: FakeDetector())
    opt = val.parse_opt(["--data", str(dataset), "--img", "64", "--device", "cpu", "--half", "--project",
                         str(tmp_path), "--workers", "0"])  # fmt: skip
    val.main(opt)
    assert any("--half ignored: FP16 inference runs on CUDA only" in line for line in log.lines)


def test_cli_user_error_has_no_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", ["val.py", "--data", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "val.py"), run_name="__main__")
    assert "missing.yaml" in str(e.value.code) and str(e.value.code).startswith("ERROR:")


def test_coco80_to_coco91():
    ids = val.coco80_to_coco91_class()
    assert len(ids) == 80 and ids[:3] == [1, 2, 3] and ids[-1] == 90 and 12 not in ids and len(set(ids)) == 80


def test_study_task(monkeypatch, dataset, tmp_path):
    monkeypatch.setattr(val, "attempt_load", lambda *a, **k: FakeDetector())
    monkeypatch.chdir(tmp_path)  # YOLOv5 writes study_*.txt and the plot to the current directory
    opt = val.parse_opt(["--data", str(dataset), "--task", "study", "--project", str(tmp_path / "runs"),
                         "--workers", "0", "--weights", "w.pt", "--batch-size", "4"])  # fmt: skip
    val.main(opt)
    rows = np.loadtxt(tmp_path / "study_rects_w.txt", ndmin=2)
    assert rows.shape == (len(range(256, 1536 + 128, 128)), 4 + 3)  # P, R, mAP50, mAP50-95, 3 timings
    assert (rows[:, 2] > 0.9).all()  # the rectangles are still found after upscaling
    assert (tmp_path / "study.png").stat().st_size > 0
