"""utils/general.py: box conversions, scale_boxes, NMS against a greedy loop, increment_path, check_dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from utils.general import (
    UserError,
    check_dataset,
    clip_boxes,
    increment_path,
    non_max_suppression,
    scale_boxes,
    xyn2xy,
    xywh2xyxy,
    xywhn2xyxy,
    xyxy2xywh,
    xyxy2xywhn,
)

# ------------------------------------------------------------------ box conversions


def random_xyxy(rng, n=20, w=320, h=200):
    xy = rng.uniform(0, [w / 2, h / 2], (n, 2))
    return np.concatenate((xy, xy + rng.uniform(1, [w / 2, h / 2], (n, 2))), 1)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_xyxy_xywh_round_trip(as_tensor):
    boxes = random_xyxy(np.random.default_rng(0))
    x = torch.tensor(boxes) if as_tensor else boxes.copy()
    xywh = xyxy2xywh(x)
    assert type(xywh) is type(x)
    assert np.allclose(np.asarray(x), boxes)  # input untouched
    b = boxes[0]
    assert np.allclose(np.asarray(xywh)[0], [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]])
    assert np.allclose(np.asarray(xywh2xyxy(xywh)), boxes)


def test_normalized_round_trip_non_square():
    w, h = 320, 200
    boxes = random_xyxy(np.random.default_rng(1), w=w, h=h)
    xywhn = xyxy2xywhn(boxes, w=w, h=h)
    assert (xywhn >= 0).all() and (xywhn <= 1).all()
    assert np.isclose(xywhn[0, 0], (boxes[0, 0] + boxes[0, 2]) / 2 / w)  # x is divided by width,
    assert np.isclose(xywhn[0, 3], (boxes[0, 3] - boxes[0, 1]) / h)  # height by height
    assert np.allclose(xywhn2xyxy(xywhn, w=w, h=h), boxes)
    shifted = xywhn2xyxy(xywhn, w=w, h=h, padw=7, padh=-3)
    assert np.allclose(shifted, boxes + [7, -3, 7, -3])
    assert np.allclose(xyn2xy(np.array([[0.5, 0.25]]), w=w, h=h, padw=1, padh=2), [[161, 52]])


def test_xyxy2xywhn_clip_does_not_touch_input():
    boxes = np.array([[-10.0, 5.0, 50.0, 250.0]])
    out = xyxy2xywhn(boxes, w=100, h=200, clip=True)
    assert boxes[0, 0] == -10  # the caller's array is not clipped in place
    assert np.allclose(out, [[0.25, (5 + 200) / 2 / 200, 0.5, 195 / 200]])


def test_clip_boxes_numpy_and_torch():
    for boxes in (np.array([[-5.0, -5, 500, 80]]), torch.tensor([[-5.0, -5, 500, 80]])):
        clip_boxes(boxes, (60, 100))  # (h, w)
        assert np.allclose(np.asarray(boxes), [[0, 0, 100, 60]])


# ------------------------------------------------------------------ scale_boxes


def test_scale_boxes_letterbox_by_hand():
    # original 100 x 200 (h, w) letterboxed to 128 x 224: gain min(1.28, 1.12) = 1.12, pad (0, 8)
    orig = torch.tensor([[10.0, 20, 50, 60]])
    boxed = torch.tensor([[11.2, 20 * 1.12 + 8, 56, 60 * 1.12 + 8]])
    assert torch.allclose(scale_boxes((128, 224), boxed.clone(), (100, 200)), orig, atol=1e-4)
    ratio_pad = ((1.12, 1.12), (0.0, 8.0))
    assert torch.allclose(scale_boxes((128, 224), boxed.clone(), (100, 200), ratio_pad), orig, atol=1e-4)


def test_scale_boxes_clips_to_original():
    out = scale_boxes((64, 64), torch.tensor([[-10.0, 0, 70, 64]]), (32, 32))  # gain 2, no pad
    assert torch.allclose(out, torch.tensor([[0.0, 0, 32, 32]]))


# ------------------------------------------------------------------ non_max_suppression


def ref_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def ref_nms(pred, conf_thres, iou_thres, classes=None, agnostic=False, multi_label=False, max_det=300):
    """Greedy NMS by hand on one image's raw rows (x, y, w, h, obj, class probs...) -> list of (xyxy, conf, cls)."""
    nc = len(pred[0]) - 5 if len(pred) else 0
    cands = []
    for row in pred:
        x, y, w, h, obj, *probs = row
        if obj <= conf_thres:
            continue
        box = [x - w / 2, y - h / 2, x + w / 2, y + h / 2]
        scores = [p * obj for p in probs]
        if multi_label and nc > 1:
            cands += [(box, s, j) for j, s in enumerate(scores) if s > conf_thres]
        else:
            j = max(range(nc), key=lambda k: scores[k])
            if scores[j] > conf_thres:
                cands.append((box, scores[j], j))
    if classes is not None:
        cands = [c for c in cands if c[2] in classes]
    cands.sort(key=lambda c: -c[1])
    keep = []
    for c in cands:
        if all(ref_iou(c[0], k[0]) <= iou_thres for k in keep if agnostic or k[2] == c[2]):
            keep.append(c)
    return keep[:max_det]


def random_predictions(seed, bs=2, n=60, nc=3):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(bs, n, 2, generator=g) * 100
    centres = xy[:, torch.randint(0, n, (n,), generator=g) % 8]  # clusters of overlapping boxes
    xy = centres + torch.randn(bs, n, 2, generator=g) * 4
    wh = 10 + torch.rand(bs, n, 2, generator=g) * 30
    obj = torch.rand(bs, n, 1, generator=g)
    probs = torch.rand(bs, n, nc, generator=g)
    return torch.cat((xy, wh, obj, probs), 2).double()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"agnostic": True},
        {"multi_label": True},
        {"multi_label": True, "agnostic": True},
        {"classes": [0, 2]},
        {"max_det": 3},
        {"conf_thres": 0.001, "iou_thres": 0.6, "multi_label": True},
        {"conf_thres": 0.5, "iou_thres": 0.2},
    ],
)
def test_nms_matches_greedy_reference(kwargs):
    pred = random_predictions(seed=len(str(kwargs)))
    kw = {"conf_thres": 0.25, "iou_thres": 0.45} | kwargs
    out = non_max_suppression(pred.clone(), **kw)
    assert len(out) == pred.shape[0]
    for xi, det in enumerate(out):
        expected = ref_nms(pred[xi].tolist(), **kw)
        assert det.shape == (len(expected), 6)
        for row, (box, conf, cls) in zip(det.tolist(), expected):
            assert np.allclose(row[:4], box) and np.isclose(row[4], conf) and row[5] == cls
        assert (det[:, 4] > kw["conf_thres"]).all()
        assert (det[:-1, 4] >= det[1:, 4]).all()  # best first


@pytest.mark.parametrize("agnostic", [False, True])
def test_nms_with_many_candidates_equals_the_class_offset_trick(agnostic):
    """Past 4000 candidates batched NMS runs class by class on CPU; it must keep exactly what one NMS over boxes
    shifted apart by class (YOLOv5's trick) keeps, in the same order."""
    pred = random_predictions(seed=7, bs=1, n=3000, nc=4)  # float64: the shifted boxes keep their precision
    pred[..., 4] = 0.5 + 0.5 * pred[..., 4]  # every box a candidate: 12000 (box, class) pairs with multi_label
    (det,) = non_max_suppression(pred.clone(), 0.001, 0.6, agnostic=agnostic, multi_label=True, max_det=30000)
    x = pred[0].clone()
    x[:, 5:] *= x[:, 4:5]
    i, j = (x[:, 5:] > 0.001).nonzero(as_tuple=False).T
    boxes = torch.cat((x[i, :2] - x[i, 2:4] / 2, x[i, :2] + x[i, 2:4] / 2), 1)
    scores, cls = x[i, j + 5], j.float()
    assert len(scores) > 4000
    keep = torchvision.ops.nms(boxes + cls[:, None] * (0 if agnostic else 7680), scores, 0.6)
    torch.testing.assert_close(det, torch.cat((boxes[keep], scores[keep, None], cls[keep, None]), 1))


def test_nms_edge_cases():
    pred = random_predictions(seed=3, bs=2)
    pred[..., 4] = 0.0  # nothing passes the objectness threshold
    out = non_max_suppression(pred)
    assert [o.shape for o in out] == [(0, 6), (0, 6)]
    out = non_max_suppression((random_predictions(seed=4), [torch.zeros(1)]))  # eval-mode (inference, train) tuple
    assert len(out) == 2 and out[0].shape[1] == 6
    with pytest.raises(ValueError):
        non_max_suppression(pred, conf_thres=1.5)
    one_class = random_predictions(seed=5, nc=1)
    out = non_max_suppression(one_class.clone(), multi_label=True)  # multi-label is a no-op for one class
    assert len(out[0]) == len(ref_nms(one_class[0].tolist(), 0.25, 0.45))


def test_nms_prepends_labels_for_autolabelling():
    pred = torch.zeros(1, 4, 7)  # all objectness 0: only the label survives
    labels = [torch.tensor([[1.0, 50, 50, 20, 10]])]  # class, xywh pixels
    out = non_max_suppression(pred, labels=labels)[0]
    assert torch.allclose(out, torch.tensor([[40.0, 45, 60, 55, 1, 1]]))


# ------------------------------------------------------------------ increment_path


def test_increment_path(tmp_path):
    assert increment_path(tmp_path / "exp") == tmp_path / "exp"  # free: unchanged
    (tmp_path / "exp").mkdir()
    assert increment_path(tmp_path / "exp") == tmp_path / "exp2"
    (tmp_path / "exp2").mkdir()
    assert increment_path(tmp_path / "exp") == tmp_path / "exp3"
    assert increment_path(tmp_path / "exp", exist_ok=True) == tmp_path / "exp"
    assert increment_path(tmp_path / "exp", sep="_") == tmp_path / "exp_2"
    made = increment_path(tmp_path / "exp", mkdir=True)
    assert made == tmp_path / "exp3" and made.is_dir()
    (tmp_path / "results.txt").write_text("x")
    assert increment_path(tmp_path / "results.txt") == tmp_path / "results2.txt"  # suffix stays last


# ------------------------------------------------------------------ check_dataset


def make_split(root, name="images/val"):
    (root / name).mkdir(parents=True, exist_ok=True)
    return root


def test_check_dataset_resolves_paths_and_names(tmp_path):
    make_split(tmp_path)
    data = check_dataset({"path": str(tmp_path), "train": "images/val", "val": "images/val", "names": ["a", "b"]})
    assert data["names"] == {0: "a", 1: "b"} and data["nc"] == 2
    assert data["val"] == str((tmp_path / "images/val").resolve())


def test_check_dataset_from_yaml_file(tmp_path):
    make_split(tmp_path)
    f = tmp_path / "d.yaml"
    f.write_text(f"path: {tmp_path}\ntrain: images/val\nval: images/val\nnames:\n  0: cat\n")
    data = check_dataset(f)
    assert data["nc"] == 1 and data["yaml_file"] == str(f)


@pytest.mark.parametrize(
    "data, words",
    [
        ({"train": "a", "val": "a"}, "names"),
        ({"train": "a", "names": ["x"]}, "val"),
        ({"train": "a", "val": "a", "names": ["x", "y"], "nc": 3}, "nc"),
        ({"train": "a", "val": "missing_dir", "names": ["x"]}, "missing_dir"),
        ({"train": "a", "val": "missing_dir", "names": ["x"], "download": "https://example.com/d.zip"}, "example.com"),
    ],
)
def test_check_dataset_user_errors(tmp_path, data, words):
    data = {"path": str(tmp_path)} | data
    with pytest.raises(UserError, match=words):
        check_dataset(data)


def test_check_dataset_missing_yaml_file(tmp_path):
    with pytest.raises(UserError):
        check_dataset(tmp_path / "no_such_data.yaml")


def test_check_dataset_runs_python_download_step(tmp_path):
    step = "import pathlib; (pathlib.Path(yaml['path']) / 'images' / 'val').mkdir(parents=True)"
    data = check_dataset({"path": str(tmp_path), "train": "images/val", "val": "images/val", "names": ["a"],
                          "download": step})  # fmt: skip
    assert (tmp_path / "images/val").is_dir() and data["nc"] == 1


def test_no_runtime_union_syntax_below_the_pyproject_python():
    """pyproject targets Python 3.9, where `None | str` outside an annotation raises TypeError at import time (the
    annotations are strings under `from __future__ import annotations`; aliases and isinstance arguments are not)."""
    import ast
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    target = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    if (int(target[2]), int(target[3:])) >= (3, 10):
        pytest.skip(f"pyproject targets {target}: X | Y is valid at run time")
    types = {"None", "str", "int", "float", "bool", "list", "dict", "tuple", "Path"}

    def is_type(x) -> bool:
        if isinstance(x, ast.Constant):
            return x.value is None
        if isinstance(x, ast.Subscript):
            x = x.value
        return (
            isinstance(x, ast.Name) and x.id in types or isinstance(x, ast.Attribute) and x.attr in {"Tensor", "Module"}
        )

    found = []
    for file in root.glob("**/*.py"):
        if any(part in {".git", "datasets", "runs"} for part in file.relative_to(root).parts):
            continue
        tree = ast.parse(file.read_text())
        in_annotation = {
            id(m)
            for n in ast.walk(tree)
            for field in ("annotation", "returns")
            if getattr(n, field, None) is not None
            for m in ast.walk(getattr(n, field))
        }
        found += [
            f"{file.relative_to(root)}:{n.lineno}"
            for n in ast.walk(tree)
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) and id(n) not in in_annotation
            if is_type(n.left) or is_type(n.right)
        ]
    assert not found, f"X | Y evaluated at run time, a TypeError on {target}: {found}"
