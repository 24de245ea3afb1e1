"""export.py and the inference backend: TorchScript / ONNX (/ OpenVINO) files of a model trained here.

A narrow yolov5n is overfitted for a few seconds on 8 images of solid rectangles (2 classes) so that it finds them
(mAP50-95 ~0.4): then val.py and detect.py results on the exported files can be compared with the .pt's and mean
something. Every expected value comes from the PyTorch model itself, run independently of the exported file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import detect
import export
import val
from models.backend import DetectMultiBackend
from utils.checkpoint import attempt_load, load_checkpoint, save_checkpoint
from utils.general import UserError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
NAMES = {0: "red", 1: "blue"}
COLORS_BGR = {0: (0, 0, 255), 1: (255, 128, 0)}
IMGSZ = 96
ANCHORS_96 = 3 * (12 * 12 + 6 * 6 + 3 * 3)  # predictions of a 96x96 input: 3 anchors at strides 8, 16, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded machine OpenMP workers spin waiting for each
    other (measured here: the training fixture went from 7 s to >30 min at load 9 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rects(tmp_path_factory) -> Path:
    """8 PNG images (96x96 and 96x128) with 1-3 solid rectangles each, YOLO labels, a data YAML; returns the YAML."""
    root = tmp_path_factory.mktemp("export_rects")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = (96, 128) if i % 2 else (96, 96)
        im, rows = np.full((h, w, 3), 40, np.uint8), []
        for _ in range(rng.integers(1, 4)):
            c = int(rng.integers(0, 2))
            bw, bh = rng.integers(16, 40, 2)
            x1, y1 = rng.integers(0, w - bw), rng.integers(0, h - bh)
            im[y1 : y1 + bh, x1 : x1 + bw] = COLORS_BGR[c]
            rows.append(f"{c} {(x1 + bw / 2) / w:.6f} {(y1 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
        cv2.imwrite(str(root / "images" / f"im{i}.png"), im)
        (root / "labels" / f"im{i}.txt").write_text("\n".join(rows))
    data = {"path": str(root), "train": "images", "val": "images", "names": NAMES}
    (root / "rects.yaml").write_text(yaml.safe_dump(data))
    return root / "rects.yaml"


@pytest.fixture(scope="module")
def trained(rects, tmp_path_factory) -> dict:
    """A narrow yolov5n overfitted on the 8 images (100 AdamW steps, ~4 s), saved as a plain YOLOv5 checkpoint and
    as a distillation checkpoint (adapters and imitation settings under 'distill', train.py's layout)."""
    from models.yolo import DetectionModel
    from utils.dataloaders import create_dataloader
    from utils.loss import ComputeLoss

    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text()) | {"width_multiple": 0.125}
    model = DetectionModel(cfg, nc=2)
    model.names = NAMES
    hyp = yaml.safe_load((ROOT / "data" / "hyps" / "hyp.short.yaml").read_text())
    loader = create_dataloader(str(rects.parent / "images"), IMGSZ, 8, 32, workers=0)[0]
    im, targets, _, _ = next(iter(loader))
    im = im.float() / 255
    compute_loss = ComputeLoss(model, hyp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model.train()
    for _ in range(100):
        loss, _ = compute_loss(model(im), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    from distill.loss import FeatureAdapters

    folder = tmp_path_factory.mktemp("weights")
    plain, distilled = folder / "plain" / "best.pt", folder / "distilled" / "best.pt"
    ckpt = {"epoch": -1, "best_fitness": None, "model": model.half(), "ema": None, "updates": None,
            "optimizer": None, "opt": {}, "git": None, "date": None}  # fmt: skip
    save_checkpoint(ckpt, plain)
    adapters = FeatureAdapters([16], [32])  # a student point of 16 channels imitating 32 teacher channels
    distill = {"adapters": {k: v.detach().clone() for k, v in adapters.state_dict().items()}, "teacher": "teacher.pt",
               "imitation_layers": [16], "iou_factor": 0.5, "imitation_weight": 0.01, "adapter_kernel": 3}  # fmt: skip
    save_checkpoint(ckpt | {"distill": distill}, distilled)
    return {"plain": plain, "distilled": distilled, "adapter_weight": adapters.m[0].conv.weight.detach().clone()}


def _export(trained, tmp_path_factory, name: str, **kwargs) -> dict[str, Path]:
    """Export a copy of the plain checkpoint (files land beside it); returns {format: path, 'pt': the copy}."""
    folder = tmp_path_factory.mktemp(name)
    pt = folder / "best.pt"
    pt.write_bytes(trained["plain"].read_bytes())
    files = export.run(weights=str(pt), imgsz=(IMGSZ, IMGSZ), **kwargs)
    return {"pt": pt, **{Path(f).suffix.lstrip(".") or "openvino": Path(f) for f in files}}


@pytest.fixture(scope="module")
def fixed(trained, tmp_path_factory) -> dict[str, Path]:
    return _export(trained, tmp_path_factory, "fixed", include=["torchscript", "onnx"])


@pytest.fixture(scope="module")
def dynamic(trained, tmp_path_factory) -> dict[str, Path]:
    return _export(trained, tmp_path_factory, "dynamic", include=["torchscript", "onnx"], dynamic=True, simplify=True)


@pytest.fixture(scope="module")
def reference(trained):
    """The checkpoint as PyTorch runs it (fused, FP32, eval): images [B, 3, H, W] -> [B, N, 7]."""
    model = attempt_load(trained["plain"])

    @torch.no_grad()
    def run(im: torch.Tensor) -> torch.Tensor:
        return model(im)[0]

    return run


def assert_same_output(y: torch.Tensor, expected: torch.Tensor) -> None:
    """Scores within 1e-4; xywh (pixels) within 1e-4 plus 1e-5 of their size (0.005 px at 500 px).

    Large boxes amplify FP32 rounding: wh = (2 sigmoid)^2 * anchor moves by 8 * sigmoid * anchor ~ 2000 px per unit
    of sigmoid at the 373 px anchor, so one ulp (6e-8) of the sigmoid is 1.2e-4 px of a background cell's 500 px
    box (measured: up to 6e-4 px there, below 1e-4 for boxes under ~100 px)."""
    assert y.shape == expected.shape and y.dtype == expected.dtype
    assert (y[..., 4:] - expected[..., 4:]).abs().max() < 1e-4
    assert ((y[..., :4] - expected[..., :4]).abs() - 1e-5 * expected[..., :4].abs()).max() < 1e-4


@pytest.fixture(scope="module")
def images(rects):
    """images(batch, h, w, seed): dataset images resized to h x w, RGB 0..1 [batch, 3, h, w], in a seeded order.

    Real images, not noise: on noise the model predicts boxes of up to ~1500 px, whose FP32 rounding alone
    (6e-5 at 512) would blur a 1e-4 comparison."""
    files = sorted((rects.parent / "images").glob("*.png"))

    def make(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
        order = np.random.default_rng(seed).permutation(len(files))[:batch]
        ims = [cv2.resize(cv2.imread(str(files[i])), (w, h), interpolation=cv2.INTER_LINEAR)[..., ::-1] for i in order]
        return torch.from_numpy(np.stack(ims).transpose(0, 3, 1, 2).copy()).float() / 255

    return make


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_fixed_shape_export_equals_pytorch(fixed, reference, images, fmt):
    backend = DetectMultiBackend(fixed[fmt])
    im = images(1, IMGSZ, IMGSZ)
    y = backend(im)
    assert y.shape == (1, ANCHORS_96, 5 + 2) and y.dtype == torch.float32
    assert_same_output(y, reference(im))
    assert not backend.dynamic and backend.batch_size == 1 and backend.imgsz == (IMGSZ, IMGSZ)
    # a batch of 3 through the batch-1 graph: run one image at a time, same numbers
    im3 = images(3, IMGSZ, IMGSZ, seed=1)
    assert_same_output(backend(im3), reference(im3))
    with pytest.raises(UserError, match=r"exported for 96x96 images, got 64x96"):
        backend(images(1, 64, 96))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_dynamic_export_two_batches_two_sizes(dynamic, reference, images, fmt):
    backend = DetectMultiBackend(dynamic[fmt])
    assert backend.dynamic
    for batch, (h, w) in [(1, (64, 96)), (3, (128, 96)), (2, (96, 96))]:
        im = images(batch, h, w, seed=batch)
        y = backend(im)
        n = 3 * sum((h // s) * (w // s) for s in (8, 16, 32))
        assert y.shape == (batch, n, 7)
        assert_same_output(y, reference(im))


def test_metadata_travels_in_the_files(fixed, dynamic):
    model = onnx.load(str(fixed["onnx"]))
    props = {p.key: p.value for p in model.metadata_props}
    assert props == {"stride": "32", "names": str(NAMES)}  # YOLOv5's format: str(int), str(dict)
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["output0"]
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, IMGSZ, IMGSZ]
    dims = [
        d.dim_value or d.dim_param for d in onnx.load(str(dynamic["onnx"])).graph.input[0].type.tensor_type.shape.dim
    ]
    assert dims == ["batch", 3, "height", "width"]

    extra = {"config.txt": ""}
    torch.jit.load(str(fixed["torchscript"]), _extra_files=extra)
    assert yaml.safe_load(extra["config.txt"]) == {
        "shape": [1, 3, IMGSZ, IMGSZ], "stride": 32, "names": {"0": "red", "1": "blue"}, "dynamic": False
    }  # fmt: skip
    for f in (*fixed.values(), *dynamic.values()):
        backend = DetectMultiBackend(f)
        assert backend.stride == 32 and backend.names == NAMES and backend.nc == 2


def _val(weights, rects, tmp_path, **kwargs):
    kw = {"batch_size": 4, "imgsz": IMGSZ, "workers": 0, "project": tmp_path, "plots": False, "half": False}
    (mp, mr, map50, map_), _, _ = val.run(str(rects), weights=str(weights), **(kw | kwargs))
    return map50, map_


def test_val_on_exported_files_gives_the_pt_map(dynamic, rects, tmp_path):
    map50_pt, map_pt = _val(dynamic["pt"], rects, tmp_path)
    assert map_pt > 0.2  # the model finds the rectangles: the comparison below means something
    for fmt in ("onnx", "torchscript"):
        map50, map_ = _val(dynamic[fmt], rects, tmp_path)
        assert abs(map_ - map_pt) < 0.002 and abs(map50 - map50_pt) < 0.002


def test_val_on_a_fixed_shape_export(fixed, trained, rects, tmp_path, log_lines):
    """Batch 1, square 96x96 letterbox: the same mAP as the PyTorch model on a loader built that way by hand."""
    from utils.dataloaders import create_dataloader

    _, map_onnx = _val(fixed["onnx"], rects, tmp_path, imgsz=128)
    assert any("Forcing --batch-size 1 square inference (1, 3, 96, 96)" in x and "not --imgsz 128" in x
               for x in log_lines)  # fmt: skip
    loader = create_dataloader(str(rects.parent / "images"), IMGSZ, 1, 32, pad=0.0, rect=False, workers=0)[0]
    data = {"nc": 2, "names": NAMES, "val": "unused"}
    (_, _, _, map_pt), _, _ = val.run(data, model=attempt_load(trained["plain"]), dataloader=loader, plots=False)
    assert map_pt > 0.2 and abs(map_onnx - map_pt) < 0.002


def _labels(save_dir: Path) -> dict[str, np.ndarray]:
    """label file name -> rows sorted by (class, x, y), as written by detect.py --save-txt --save-conf."""
    out = {}
    for f in sorted((save_dir / "labels").glob("*.txt")):
        rows = np.loadtxt(f, ndmin=2)
        out[f.name] = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
    return out


def _detect(weights, source, tmp_path, **kwargs) -> dict[str, np.ndarray]:
    save_dir = detect.run(weights=[str(weights)], source=source, imgsz=[IMGSZ], device="cpu", save_txt=True,
                          save_conf=True, nosave=True, project=tmp_path / "runs", **kwargs)  # fmt: skip
    return _labels(save_dir)


def _assert_same_labels(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert np.abs(a[k] - b[k]).max() < 1e-3, k


def test_detect_on_exported_files_writes_the_pt_labels(dynamic, fixed, rects, tmp_path):
    images = rects.parent / "images"
    expected = _detect(dynamic["pt"], images, tmp_path)
    assert len(expected) == 8 and sum(len(v) for v in expected.values()) >= 8  # every image has detections
    _assert_same_labels(_detect(dynamic["onnx"], images, tmp_path), expected)
    _assert_same_labels(_detect(dynamic["torchscript"], images, tmp_path), expected)
    # a fixed 96x96 export letterboxes every image to 96x96: the square images give the .pt's labels
    square = [str(p) for p in sorted(images.glob("*.png")) if cv2.imread(str(p)).shape[:2] == (IMGSZ, IMGSZ)]
    (tmp_path / "square.txt").write_text("\n".join(square))
    labels = _detect(fixed["onnx"], tmp_path / "square.txt", tmp_path)
    _assert_same_labels(labels, {k: v for k, v in expected.items() if k in labels})
    assert len(labels) == len(square) == 4


def test_distilled_checkpoint_exports_like_a_plain_one(trained, tmp_path):
    """No adapter or teacher weight in the graph: the same initializers as the plain checkpoint's export."""
    ckpt = load_checkpoint(trained["distilled"])
    assert set(ckpt["distill"]["adapters"]) == {"m.0.conv.weight", "m.0.conv.bias"}  # really a distillation file
    files = {}
    for kind in ("plain", "distilled"):
        pt = tmp_path / kind / "best.pt"
        pt.parent.mkdir()
        pt.write_bytes(trained[kind].read_bytes())
        files[kind] = export.run(weights=str(pt), imgsz=(IMGSZ, IMGSZ), include=["onnx", "torchscript"])
    inits = {
        k: {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(v[0]).graph.initializer} for k, v in files.items()
    }
    assert inits["plain"].keys() == inits["distilled"].keys()
    assert all(np.array_equal(inits["plain"][k], inits["distilled"][k]) for k in inits["plain"])
    adapter = trained["adapter_weight"].numpy()
    assert not any(a.shape == adapter.shape and np.allclose(a, adapter) for a in inits["distilled"].values())
    ts = {k: torch.jit.load(v[1]).state_dict() for k, v in files.items()}
    fused = attempt_load(trained["plain"])
    assert ts["distilled"].keys() == ts["plain"].keys() == fused.state_dict().keys()
    assert not any("adapter" in k or "teacher" in k for k in ts["distilled"])


def test_unsafe_checkpoint_is_refused(tmp_path, trained):
    """Refused by the loader val.py and detect.py use, before anything is unpickled; the CLI prints one line."""
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pt"
    torch.save({"model": attempt_load(trained["plain"], fuse=False).half(), "payload": RunsCode()}, evil)
    with pytest.raises(UserError, match=r"evil.pt needs (posix|nt)\.system, which is not an allowed YOLOv5 class"):
        export.run(weights=str(evil), imgsz=(IMGSZ, IMGSZ), include=["onnx"])
    assert not marker.exists() and not (tmp_path / "evil.onnx").exists()
    result = subprocess.run([sys.executable, str(ROOT / "export.py"), "--weights", str(evil), "--include", "onnx"],
                            capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1 and not marker.exists()
    assert result.stderr.startswith(f"ERROR: checkpoint {evil} needs") and result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"include": ["onnx", "pb2"]}, "--include pb2: unknown format, use one of torchscript, onnx, openvino"),
        ({"include": ["tflite"]}, "--include tflite: this format is not supported here, use one of torchscript"),
        ({"include": []}, "--include is empty"),
        ({"weights": "missing.pt"}, "checkpoint missing.pt not found"),
        ({"weights": "best.onnx"}, "--weights best.onnx: export.py reads PyTorch *.pt checkpoints"),
        ({"batch_size": 0}, "--batch-size 0 must be at least 1"),
        ({"imgsz": (0,)}, "--imgsz 0: must be >= 1 pixel"),
        ({"imgsz": (320, -64)}, "--imgsz 320 -64: must be >= 1 pixel"),
    ],
)
def test_bad_input_is_a_one_line_user_error(kwargs, message, trained):
    with pytest.raises(UserError) as e:
        export.run(**({"weights": str(trained["plain"]), "include": ["onnx"]} | kwargs))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not trained["plain"].with_suffix(".onnx").exists()


def test_missing_exported_weights_in_detect_and_val(tmp_path, rects):
    with pytest.raises(UserError, match="--weights .*missing.onnx not found"):
        detect.run(weights=[str(tmp_path / "missing.onnx")], source=rects.parent / "images", device="cpu")
    with pytest.raises(UserError, match="--weights .*missing.onnx not found"):
        _val(tmp_path / "missing.onnx", rects, tmp_path)
    with pytest.raises(UserError, match="unknown model format"):
        DetectMultiBackend(tmp_path / "model.tflite")


def test_image_size_rounded_to_the_stride(trained, tmp_path, log_lines):
    pt = tmp_path / "best.pt"
    pt.write_bytes(trained["plain"].read_bytes())
    (f,) = export.run(weights=str(pt), imgsz=(100, 90), include=["onnx"])
    assert any(
        "--img-size [100, 90] must be a multiple of max stride 32, updating to [128, 96]" in x for x in log_lines
    )
    backend = DetectMultiBackend(f)
    assert backend.imgsz == (128, 96) and backend.batch_size == 1


def test_onnx_without_metadata(fixed, reference, images, tmp_path, log_lines):
    model = onnx.load(str(fixed["onnx"]))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    backend = DetectMultiBackend(bare)
    assert backend.stride == 32 and backend.names == {0: "0", 1: "1"}
    assert sum("has no usable stride/names metadata" in x and "assuming stride 32" in x for x in log_lines) == 1
    im = images(1, IMGSZ, IMGSZ)
    assert_same_output(backend(im), reference(im))


def test_half_export(trained, reference, images, tmp_path):
    """FP16 ONNX and TorchScript (on CPU here): FP16 input and output, close to the FP32 model."""
    pt = tmp_path / "best.pt"
    pt.write_bytes(trained["plain"].read_bytes())
    files = export.run(weights=str(pt), imgsz=(IMGSZ, IMGSZ), include=["onnx", "torchscript"], half=True)
    im = images(2, IMGSZ, IMGSZ)
    expected = reference(im)
    for f in files:
        backend = DetectMultiBackend(f)
        assert backend.fp16
        y = backend(im)
        assert y.dtype == torch.float32 and y.shape == expected.shape
        # FP16 has 11 significant bits: 0.25 px spacing at 256..512 px, a few roundings deep
        assert ((y[..., :4] - expected[..., :4]).abs() - 4e-3 * expected[..., :4].abs()).max() < 0.05
        assert (y[..., 4:] - expected[..., 4:]).abs().max() < 0.01


def test_openvino_export(trained, reference, images, tmp_path):
    pytest.importorskip("openvino")
    pt = tmp_path / "best.pt"
    pt.write_bytes(trained["plain"].read_bytes())
    (folder,) = export.run(weights=str(pt), imgsz=(IMGSZ, IMGSZ), include=["openvino"])
    assert Path(folder) == tmp_path / "best_openvino_model"
    assert {p.name for p in Path(folder).iterdir()} == {"best.xml", "best.bin", "metadata.yaml"}
    backend = DetectMultiBackend(folder)
    assert backend.stride == 32 and backend.names == NAMES and backend.imgsz == (IMGSZ, IMGSZ)
    im = images(1, IMGSZ, IMGSZ)
    assert_same_output(backend(im), reference(im))  # FP32 inference (the CPU plugin's default may be bf16)
