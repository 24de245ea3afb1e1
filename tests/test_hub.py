"""torch.hub + AutoShape on real images with the official YOLOv5n v7.0 checkpoint (../shared/real; skipped without
it): the same detections as detect.py, mixed inputs batched equal to one at a time, settable NMS, results' views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detect

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real"
pytestmark = pytest.mark.skipif(not (REAL / "weights/yolov5n.pt").is_file(), reason="needs ../shared/real")
BUS, ZIDANE = REAL / "images/bus.jpg", REAL / "images/zidane.jpg"


@pytest.fixture(scope="module")
def hub_model():
    return torch.hub.load(str(ROOT), "custom", path=str(REAL / "weights/yolov5n.pt"), source="local")


def detect_labels(tmp_path, source) -> dict[str, np.ndarray]:
    """detect.py's saved labels per image: [n, 6] (class, x, y, w, h normalized, conf)."""
    save_dir = detect.run(weights=str(REAL / "weights/yolov5n.pt"), source=str(source), device="cpu", save_txt=True,
                          save_conf=True, nosave=True, project=str(tmp_path), name="d")  # fmt: skip
    return {f.stem: np.loadtxt(f, ndmin=2) for f in (save_dir / "labels").glob("*.txt")}


def test_hub_equals_detect_on_real_images(hub_model, tmp_path):
    (tmp_path / "images").mkdir()
    for f in (BUS, ZIDANE):
        (tmp_path / "images" / f.name).write_bytes(f.read_bytes())
    want = detect_labels(tmp_path, tmp_path / "images")
    for f in (BUS, ZIDANE):
        got = hub_model(str(f)).pandas().xywhn[0]
        rows = want[f.stem][np.argsort(-want[f.stem][:, 5])]
        got = got.sort_values("confidence", ascending=False)
        assert len(got) == len(rows)
        assert list(got["class"]) == rows[:, 0].astype(int).tolist()
        np.testing.assert_allclose(got[["xcenter", "ycenter", "width", "height"]].to_numpy(), rows[:, 1:5], atol=2e-3)
        np.testing.assert_allclose(got["confidence"].to_numpy(), rows[:, 5], atol=1e-4)
    # official YOLOv5's detections (shared/real/README.md): bus 4 persons + 1 bus, zidane 2 persons + 1 tie
    names = [sorted(hub_model(str(f)).pandas().xyxy[0]["name"]) for f in (BUS, ZIDANE)]
    assert names == [["bus", "person", "person", "person", "person"], ["person", "person", "tie"]]


def test_mixed_inputs_batched_equal_one_at_a_time(hub_model):
    rgb = np.ascontiguousarray(np.asarray(Image.open(BUS).convert("RGB")))
    import cv2

    cv_rgb = cv2.imread(str(BUS))[..., ::-1]
    inputs = [str(BUS), Path(BUS), cv_rgb, rgb, Image.open(BUS)]
    batched = hub_model(inputs)
    assert len(batched) == 5 and batched.n == 5
    for i, im in enumerate(inputs):
        alone = hub_model(im)
        torch.testing.assert_close(batched.pred[i], alone.pred[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(batched.pred[0], batched.pred[2])  # a file is read as cv2 reads it (RGB)
    assert [d.n for d in batched.tolist()] == [1] * 5


def test_nms_settings_and_result_views(hub_model, tmp_path):
    results = hub_model(str(ZIDANE))
    df = results.pandas().xyxy[0]
    assert list(df.columns) == ["xmin", "ymin", "xmax", "ymax", "confidence", "class", "name"]
    h, w = results.ims[0].shape[:2]
    np.testing.assert_allclose(
        results.xyxyn[0][:, :4].numpy(), results.xyxy[0][:, :4].numpy() / [w, h, w, h], rtol=1e-6
    )
    assert "2 persons, 1 tie" in str(results)
    try:
        hub_model.classes, hub_model.conf = [0], 0.5
        only = hub_model(str(ZIDANE)).pandas().xyxy[0]
        assert set(only["name"]) == {"person"} and (only["confidence"] > 0.5).all()
        hub_model.classes, hub_model.max_det = None, 1
        assert len(hub_model(str(ZIDANE))) == 1 and hub_model(str(ZIDANE)).pred[0].shape[0] == 1
    finally:
        hub_model.classes, hub_model.conf, hub_model.max_det = None, 0.25, 1000
    save_dir = results.save(save_dir=tmp_path / "exp")
    assert (save_dir / "zidane.jpg").is_file()
    crops = results.crop(save_dir=tmp_path / "exp", exist_ok=True)
    assert len(crops) == 3 and all(c["im"].ndim == 3 for c in crops)
    assert len(list((tmp_path / "exp" / "crops").rglob("*.jpg"))) == 3
    rendered = results.render()
    assert rendered[0].shape == (h, w, 3)


def test_hub_by_name_and_bad_input(tmp_path, monkeypatch):
    from utils.general import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="yolov5n.pt not found"):
        torch.hub.load(str(ROOT), "yolov5n", source="local")
    (tmp_path / "yolov5n.pt").write_bytes((REAL / "weights/yolov5n.pt").read_bytes())
    model = torch.hub.load(str(ROOT), "yolov5n", source="local")
    assert len(model(str(BUS))) == 1 and model(str(BUS)).pred[0].shape[0] == 5
    fresh = torch.hub.load(str(ROOT), "yolov5n", source="local", pretrained=False, classes=3)
    assert fresh.model.model[-1].nc == 3
    with pytest.raises(UserError, match="not an image"):
        model(str(tmp_path / "missing.jpg"))
    with pytest.raises(UserError, match="HWC with 3 channels"):
        model(np.zeros((3, 4, 5, 6), np.uint8))


@pytest.mark.parametrize("channels, classes", [(3, 10), (1, 80), (1, 10)])
def test_pretrained_with_other_classes_or_channels_transfers_the_rest(tmp_path, monkeypatch, channels, classes):
    """yolov5n(classes=10) / channels=1 with pretrained=True built the 80-class, 3-channel model (the arguments were
    ignored); now the requested head and input, with every other tensor the checkpoint's."""
    from utils.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "yolov5n.pt").write_bytes((REAL / "weights/yolov5n.pt").read_bytes())
    model = torch.hub.load(str(ROOT), "yolov5n", source="local", channels=channels, classes=classes, autoshape=False)
    assert model.model[-1].nc == classes and model.model[0].conv.in_channels == channels
    source = load_checkpoint(REAL / "weights/yolov5n.pt")
    source = (source.get("ema") or source["model"]).float().state_dict()
    own = model.state_dict()
    same = [k for k in own if k in source and own[k].shape == source[k].shape]
    assert all(torch.equal(own[k].float(), source[k]) for k in same)
    differ = {k for k in own if k not in same}
    assert differ == ({"model.0.conv.weight"} if channels != 3 else set()) | (
        {f"model.24.m.{i}.{p}" for i in range(3) for p in ("weight", "bias")} if classes != 80 else set()
    )
    out = model.eval()(torch.zeros(1, channels, 64, 64))[0]
    assert out.shape[-1] == 5 + classes


def test_single_image_letterbox_and_batch_shape_match_detect(hub_model, tmp_path):
    """A 705 x 1280 image ran at 640 x 384 (unrounded size) while detect.py runs it at 640 x 352: the shapes and the
    boxes of one image are now detect.py's."""
    import cv2

    im = cv2.resize(cv2.imread(str(BUS)), (1280, 705))
    file = tmp_path / "wide" / "wide.jpg"
    file.parent.mkdir()
    cv2.imwrite(str(file), im)
    results = hub_model(str(file))
    assert results.s == (1, 3, 352, 640)
    want = detect_labels(tmp_path, file.parent)["wide"]
    got = results.pandas().xywhn[0]
    rows = want[np.argsort(-want[:, 5])]
    assert len(got) == len(rows)
    np.testing.assert_allclose(got[["confidence"]].to_numpy()[:, 0], rows[:, 5], atol=1e-4)


def test_autoshape_bad_inputs_are_one_line(hub_model, tmp_path):
    from utils.general import UserError

    for bad, message in (
        ([], "no images given"),
        (np.zeros((0, 5), np.uint8), "HWC with 3 channels"),
        (np.zeros((64, 64, 3), np.uint16), "numpy dtype uint16; pass uint8"),
        (np.zeros((64, 64, 3), np.float32), "numpy dtype float32; pass uint8"),
        (torch.zeros(3, 64, 64), r"must be \[B, 3, H, W\]"),
    ):
        with pytest.raises(UserError, match=message):
            hub_model(bad)
    for size in (0, -5, (1, 2, 3)):
        with pytest.raises(UserError, match="size="):
            hub_model(str(BUS), size=size)


def test_results_save_checks_writes_and_keeps_equal_names_apart(hub_model, tmp_path):
    from utils.general import UserError

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes(BUS.read_bytes())
    results = hub_model([str(tmp_path / "a/x.jpg"), str(tmp_path / "b/x.jpg")])
    assert results.files == ["x.jpg", "x_2.jpg"]
    out = results.save(save_dir=tmp_path / "out", exist_ok=True)
    assert sorted(p.name for p in out.iterdir()) == ["x.jpg", "x_2.jpg"]
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    with pytest.raises(UserError, match="cannot make"):
        results.save(save_dir=blocker / "out")
    taken = tmp_path / "taken"
    (taken / "x.jpg").mkdir(parents=True)  # the image's own name is a folder there: cv2.imwrite fails
    with pytest.raises(UserError, match="could not write .*x.jpg"):  # before: 'Saved 2 images', nothing written
        results.save(save_dir=taken, exist_ok=True)
