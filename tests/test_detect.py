"""detect.py: outputs for image / directory / glob / .txt / video sources, label files, crops, filters, errors.

Most tests wrap a fake model whose raw predictions are fixed, so the expected boxes in every label file are known
exactly; one test runs a real tiny checkpoint end to end.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
from utils.general import UserError

ROOT = Path(__file__).resolve().parents[1]
H, W = 96, 128  # test images: letterboxed at imgsz=128 they need neither resizing nor padding
NAMES = {0: "circle", 1: "square"}

# raw predictions in input pixels: (x, y, w, h, objectness, p(circle), p(square))
RAW = torch.tensor(
    [
        [64.0, 48.0, 40.0, 30.0, 0.9, 0.10, 0.95],  # square, conf 0.855, xyxy (44, 33, 84, 63)
        [20.0, 20.0, 16.0, 16.0, 0.8, 0.90, 0.05],  # circle, conf 0.72, xyxy (12, 12, 28, 28)
        [100.0, 70.0, 20.0, 20.0, 0.1, 0.50, 0.20],  # circle, conf 0.05: only kept below the default threshold
    ]
)
# expected label lines: class, x, y, w, h normalized to the W x H original, conf
EXPECTED = {
    (1, 64 / W, 48 / H, 40 / W, 30 / H, 0.9 * 0.95),
    (0, 20 / W, 20 / H, 16 / W, 16 / H, 0.8 * 0.90),
}
LOW_CONF = (0, 100 / W, 70 / H, 20 / W, 20 / H, 0.1 * 0.5)


class FakeModel(torch.nn.Module):
    """Stands in for an eval DetectionModel: returns RAW for every image and records what it was given."""

    def __init__(self):
        super().__init__()
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.names = NAMES
        self.calls = []

    def forward(self, im, augment=False, visualize=False):
        self.calls.append({"shape": tuple(im.shape), "dtype": im.dtype, "im": im.clone(), "augment": augment})
        return RAW[None].expand(im.shape[0], -1, -1).to(im), []


@pytest.fixture
def fake_model(monkeypatch):
    model = FakeModel()
    monkeypatch.setattr(detect, "_load_model", lambda weights, device, data: (model, NAMES))
    return model


def make_images(folder: Path, n: int = 3, ext: str = "jpg") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        f = folder / f"im{i}.{ext}"
        cv2.imwrite(str(f), rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        files.append(f)
    return files


def read_labels(file: Path) -> list[tuple[float, ...]]:
    return [tuple(float(v) for v in line.split()) for line in file.read_text().splitlines()]


def assert_same_rows(rows, expected, tol=1e-4):
    """rows and expected hold the same label tuples, in any order."""
    assert len(rows) == len(expected)
    remaining = list(expected)
    for r in rows:
        match = [e for e in remaining if len(e[: len(r)]) == len(r) and np.allclose(r, e[: len(r)], atol=tol)]
        assert match, f"unexpected label row {r}, expected one of {remaining}"
        remaining.remove(match[0])


def run(source, tmp_path, **kwargs) -> Path:
    kwargs = {"imgsz": 128, "device": "cpu", "project": tmp_path / "runs", **kwargs}
    return detect.run(weights="unused.pt", source=source, **kwargs)


def test_directory_images_and_labels(tmp_path, fake_model, log_lines):
    files = make_images(tmp_path / "images")
    save_dir = run(tmp_path / "images", tmp_path, save_txt=True, save_conf=True)

    assert save_dir == tmp_path / "runs" / "exp"
    assert sorted(p.name for p in save_dir.glob("*.jpg")) == [f.name for f in files]
    for f in files:
        original, annotated = cv2.imread(str(f)), cv2.imread(str(save_dir / f.name))
        assert annotated.shape == original.shape
        # the square's box border (x = 44 .. 84 at y = 63) is drawn, the far corner is untouched (up to jpg noise)
        assert np.abs(annotated[63, 50:80].astype(int) - original[63, 50:80]).mean() > 30
        assert np.abs(annotated[90, 120].astype(int) - original[90, 120]).mean() < 30
        assert_same_rows(read_labels(save_dir / "labels" / f"{f.stem}.txt"), EXPECTED)

    # the model saw the letterboxed image as a float 0-1 batch
    assert [c["shape"] for c in fake_model.calls] == [(1, 3, H, W)] * 3
    assert all(c["dtype"] == torch.float32 and c["im"].max() <= 1 for c in fake_model.calls)
    lines = "\n".join(log_lines)
    assert f"image 1/3 {files[0].resolve()}: {H}x{W} 1 circle, 1 square, " in lines
    assert "Speed:" in lines and "per image at shape (1, 3, 128, 128)" in lines
    assert "Results saved to" in lines and "3 labels saved to" in lines


def test_model_sees_rgb(tmp_path, fake_model):
    folder = tmp_path / "blue"
    folder.mkdir()
    cv2.imwrite(str(folder / "blue.png"), np.full((H, W, 3), (255, 0, 0), np.uint8))  # BGR blue
    run(folder, tmp_path, nosave=True)
    im = fake_model.calls[0]["im"][0]
    assert im[2].min() == 1 and im[0].max() == 0  # channel order R, G, B


def test_labels_without_conf_and_low_threshold(tmp_path, fake_model):
    files = make_images(tmp_path / "images", n=1)
    save_dir = run(files[0], tmp_path, save_txt=True, conf_thres=0.01)
    rows = read_labels(save_dir / "labels" / "im0.txt")
    assert all(len(r) == 5 for r in rows)
    assert_same_rows(rows, EXPECTED | {LOW_CONF})


def test_classes_filter(tmp_path, fake_model):
    files = make_images(tmp_path / "images", n=1)
    save_dir = run(files[0], tmp_path, save_txt=True, save_conf=True, classes=[1])
    assert_same_rows(read_labels(save_dir / "labels" / "im0.txt"), {e for e in EXPECTED if e[0] == 1})


def test_max_det(tmp_path, fake_model):
    files = make_images(tmp_path / "images", n=1)
    save_dir = run(files[0], tmp_path, save_txt=True, save_conf=True, max_det=1)
    assert_same_rows(read_labels(save_dir / "labels" / "im0.txt"), {max(EXPECTED, key=lambda e: e[-1])})


def test_nosave_writes_no_images(tmp_path, fake_model):
    make_images(tmp_path / "images")
    save_dir = run(tmp_path / "images", tmp_path, nosave=True, save_txt=True)
    assert not list(save_dir.rglob("*.jpg"))
    assert len(list((save_dir / "labels").glob("*.txt"))) == 3


def test_txt_list_and_glob_sources(tmp_path, fake_model):
    files = make_images(tmp_path / "images", n=3, ext="png")
    make_images(tmp_path / "images" / "other", n=1, ext="jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{files[0]}\nimages/{files[2].name}\n")  # absolute and relative-to-the-list paths
    save_dir = run(listing, tmp_path)
    assert sorted(p.name for p in save_dir.iterdir() if p.is_file()) == ["im0.png", "im2.png"]

    save_dir = run(str(tmp_path / "images" / "*[01].png"), tmp_path)
    assert save_dir.name == "exp2"
    assert sorted(p.name for p in save_dir.iterdir() if p.is_file()) == ["im0.png", "im1.png"]


def test_unreadable_image_is_skipped(tmp_path, fake_model, log_lines):
    files = make_images(tmp_path / "images", n=2)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"this is not a jpeg")
    save_dir = run(tmp_path / "images", tmp_path)
    assert sorted(p.name for p in save_dir.glob("*.jpg")) == [f.name for f in files]
    assert any("broken.jpg" in line and "WARNING" in line for line in log_lines)


def test_video(tmp_path, fake_model):
    video, n_frames = tmp_path / "clip.avi", 5
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 10, (W, H))
    rng = np.random.default_rng(1)
    for _ in range(n_frames):
        writer.write(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    writer.release()
    if count_frames(video) != n_frames:
        pytest.skip("this OpenCV build cannot write and read back MJPG video")

    save_dir = run(video, tmp_path, save_txt=True)
    out = save_dir / "clip.mp4"
    assert out.is_file() and not (save_dir / "clip.avi").exists()
    assert count_frames(out) == n_frames
    cap = cv2.VideoCapture(str(out))
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (W, H)
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10)
    cap.release()
    assert sorted(p.name for p in (save_dir / "labels").iterdir()) == sorted(
        f"clip_{i}.txt" for i in range(1, n_frames + 1)
    )
    assert_same_rows(read_labels(save_dir / "labels" / "clip_3.txt"), EXPECTED)


def count_frames(file: Path) -> int:
    cap, n = cv2.VideoCapture(str(file)), 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_save_crop(tmp_path, fake_model):
    files = make_images(tmp_path / "images", n=1)
    save_dir = run(files[0], tmp_path, save_crop=True, nosave=True)
    square = cv2.imread(str(save_dir / "crops" / "square" / "im0.jpg"))
    circle = cv2.imread(str(save_dir / "crops" / "circle" / "im0.jpg"))

    # box side * 1.02 + 10 pixels, centred on the box, edges truncated to whole pixels
    def side(centre, size):
        half = (size * 1.02 + 10) / 2
        return int(centre + half) - int(centre - half)

    assert square.shape[:2] == (side(48, 30), side(64, 40))
    assert circle.shape[:2] == (side(20, 16), side(20, 16))
    assert not list(save_dir.glob("*.jpg"))  # --nosave still writes crops


def test_augment_flag_and_half_on_cpu(tmp_path, fake_model):
    files = make_images(tmp_path / "images", n=1)
    run(files[0], tmp_path, augment=True, half=True, nosave=True)
    assert fake_model.calls[0]["augment"] is True
    assert fake_model.calls[0]["dtype"] == torch.float32  # --half is CUDA-only


def test_missing_source_is_a_user_error(tmp_path, fake_model):
    with pytest.raises(UserError, match="source"):
        run(tmp_path / "nothing_here", tmp_path)
    with pytest.raises(UserError, match="stream"):
        run("rtsp://example.com/cam", tmp_path)


def test_bad_sizes_and_strides_are_one_line_user_errors(tmp_path, fake_model):
    files = make_images(tmp_path / "images", n=1)
    for kwargs, message in (
        (dict(imgsz=0), "--imgsz 0: must be >= 1 pixel"),
        (dict(imgsz=(320, 0)), "--imgsz 320 0: must be >= 1 pixel"),
        (dict(vid_stride=0), "--vid-stride 0: must be >= 1"),
    ):
        with pytest.raises(UserError) as e:
            run(files[0], tmp_path, **kwargs)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not fake_model.calls  # refused before any inference


def test_parse_opt_defaults():
    opt = detect.parse_opt(["--img", "320", "--classes", "0", "2"])
    assert opt.imgsz == [320, 320] and opt.classes == [0, 2]
    assert (opt.conf_thres, opt.iou_thres, opt.max_det, opt.line_thickness, opt.vid_stride) == (0.25, 0.45, 1000, 3, 1)
    assert Path(opt.project) == ROOT / "runs" / "detect" and opt.name == "exp"
    assert detect.parse_opt(["--imgsz", "320", "256"]).imgsz == [320, 256]


def test_cli_missing_weights_prints_one_line(tmp_path):
    make_images(tmp_path / "images", n=1)
    result = subprocess.run(
        [sys.executable, str(ROOT / "detect.py"), "--weights", str(tmp_path / "missing.pt"), "--source",
         str(tmp_path / "images"), "--project", str(tmp_path / "runs"), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0 and "missing.pt" in result.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_half_on_cuda(tmp_path, fake_model):
    files = make_images(tmp_path / "images", n=1)
    save_dir = run(files[0], tmp_path, device="0", half=True, save_txt=True)
    assert fake_model.calls[0]["dtype"] == torch.float16 and fake_model.calls[0]["im"].is_cuda
    assert_same_rows(read_labels(save_dir / "labels" / "im0.txt"), {e[:5] for e in EXPECTED}, tol=1e-3)


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    """A randomly initialised 2-class model saved as a YOLOv5-layout checkpoint (fp16 model, like train.py)."""
    yolo = pytest.importorskip("models.yolo")
    checkpoint = pytest.importorskip("utils.checkpoint")
    cfg = {
        "nc": 2,
        "depth_multiple": 0.33,
        "width_multiple": 0.125,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
        "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 1, "C3", [128]],
                     [-1, 1, "Conv", [256, 3, 2]], [-1, 1, "Conv", [512, 3, 2]], [-1, 1, "SPPF", [512, 5]]],
        "head": [[-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
                 [[-1, 3], 1, "Concat", [1]], [-1, 1, "C3", [256, False]], [-1, 1, "Conv", [128, 1, 1]],
                 [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 2], 1, "Concat", [1]],
                 [-1, 1, "C3", [128, False]], [[13, 10, 6], 1, "Detect", ["nc", "anchors"]]],
    }  # fmt: skip
    torch.manual_seed(0)
    model = yolo.DetectionModel(cfg, ch=3, nc=2)
    model.names = NAMES
    weights = tmp_path / "tiny.pt"
    ckpt = {"epoch": -1, "best_fitness": None, "model": model.half(), "ema": None, "updates": None,
            "optimizer": None, "opt": {}, "git": None, "date": None}  # fmt: skip
    checkpoint.save_checkpoint(ckpt, weights)
    return weights


@pytest.mark.parametrize(
    "device, half",
    [("cpu", False), pytest.param("0", True, marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])],
)  # fmt: skip
def test_real_tiny_checkpoint(tmp_path, tiny_weights, device, half):
    """A real checkpoint runs end to end through attempt_load, LoadImages, NMS and the writers."""
    files = make_images(tmp_path / "images", n=2)
    save_dir = detect.run(weights=[str(tiny_weights)], source=tmp_path / "images", imgsz=[128], device=device,
                          half=half, conf_thres=0.001, save_txt=True, save_conf=True, save_crop=True,
                          project=tmp_path / "runs")  # fmt: skip
    assert sorted(p.name for p in save_dir.glob("*.jpg")) == [f.name for f in files]
    label_files = list((save_dir / "labels").glob("*.txt"))
    assert label_files  # Detect's bias init puts objectness above 0.001 at some cells
    n_boxes = 0
    for txt in label_files:
        rows = np.array(read_labels(txt))
        n_boxes += len(rows)
        assert rows.shape[1] == 6
        assert set(rows[:, 0]) <= {0.0, 1.0}
        assert (rows[:, 1:5] >= 0).all() and (rows[:, 1:5] <= 1).all() and (rows[:, 5] >= 0.001).all()
    assert len(list((save_dir / "crops").rglob("*.jpg"))) == n_boxes  # one crop per detection
