"""Checkpoint save/load: YOLOv5 v7 layout round trip, old-checkpoint fixes, refusing unsafe or broken files."""

from __future__ import annotations

import os
import pickle
import zipfile
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.yolo import Detect, DetectionModel, Model
from utils.checkpoint import attempt_load, load_checkpoint, save_checkpoint, strip_optimizer
from utils.general import UserError, yaml_load


@pytest.fixture(scope="module")
def model() -> DetectionModel:
    torch.manual_seed(0)
    cfg = yaml_load("models/yolov5n.yaml") | {"width_multiple": 0.125}
    m = Model(cfg, nc=3)
    m.names = ["cat", "dog", "bird"]
    g = torch.Generator().manual_seed(2)
    for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):  # trained-looking statistics
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return m


def _v7_checkpoint(model: nn.Module, **extra) -> dict:
    """The dict YOLOv5 v7.0's train.py saves (plus our 'distill')."""
    opt = {"weights": "yolov5n.pt", "epochs": 3, "save_dir": Path("runs/train/exp"), "imgsz": 640}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return {
        "epoch": 2,
        "best_fitness": np.float64(0.25),
        "model": deepcopy(model).half(),
        "ema": deepcopy(model).half(),
        "updates": 30,
        "optimizer": optimizer.state_dict(),
        "opt": opt,
        "git": {"remote": None, "branch": None, "commit": None},
        "date": datetime.now().isoformat(),
        "distill": None,
        **extra,
    }


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval output of the model after the fp16 rounding a checkpoint applies."""
    with torch.no_grad():
        return deepcopy(model).half().float().eval()(x)[0]


def test_round_trip_v7_layout(model, tmp_path):
    path = tmp_path / "weights" / "last.pt"
    ckpt = _v7_checkpoint(model, best_fitness=np.array([0.25]))  # numpy arrays appear in older checkpoints
    save_checkpoint(ckpt, path)
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left behind

    loaded = load_checkpoint(path)
    assert set(loaded) == set(ckpt)
    assert loaded["model"].parameters().__next__().dtype == torch.float16
    assert isinstance(loaded["best_fitness"], np.ndarray) and loaded["best_fitness"][0] == 0.25
    assert loaded["opt"]["save_dir"] == Path("runs/train/exp")

    x = torch.rand(1, 3, 64, 96)
    m = attempt_load(path, fuse=False)
    assert isinstance(m, DetectionModel) and not m.training
    assert m.names == {0: "cat", 1: "dog", 2: "bird"}
    assert next(m.parameters()).dtype == torch.float32 and m.stride.tolist() == [8, 16, 32]
    with torch.no_grad():
        assert torch.allclose(m(x)[0], _reference(model, x), atol=1e-5)
        fused = attempt_load([path], fuse=True)
        assert not any(hasattr(c, "bn") for c in fused.modules() if hasattr(c, "forward_fuse"))
        assert torch.allclose(fused(x)[0], _reference(model, x), atol=1e-3, rtol=1e-3)


def test_numpy_scalar_and_ema_preference(model, tmp_path):
    ema = deepcopy(model)
    with torch.no_grad():
        ema.model[-1].m[0].bias.add_(1.0)  # tell the EMA apart
    path = tmp_path / "best.pt"
    save_checkpoint(_v7_checkpoint(model, ema=deepcopy(ema).half()), path)
    assert load_checkpoint(path)["best_fitness"] == np.float64(0.25)
    m = attempt_load(path, fuse=False)
    assert torch.allclose(m.model[-1].m[0].bias, ema.model[-1].m[0].bias.half().float())
    save_checkpoint(_v7_checkpoint(model, ema=None), path)  # strip_optimizer()'d checkpoints have no EMA
    m = attempt_load(path, fuse=False)
    assert torch.allclose(m.model[-1].m[0].bias, model.model[-1].m[0].bias.half().float())


def test_v61_model_class_name_loads(model, tmp_path):
    """YOLOv5 <= v6.1 pickled the model as models.yolo.Model."""
    path = tmp_path / "v61.pt"
    DetectionModel.__qualname__ = "Model"  # pickle writes the class under this name; Model is the same class
    try:
        torch.save({"model": deepcopy(model).half(), "ema": None, "epoch": -1}, path)
    finally:
        DetectionModel.__qualname__ = "DetectionModel"
    with zipfile.ZipFile(path) as z:
        pickled = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"models.yolo\nModel" in pickled and b"DetectionModel" not in pickled
    m = attempt_load(path, fuse=False)
    assert type(m) is DetectionModel


def test_old_checkpoint_quirks_are_fixed(model, tmp_path):
    old = deepcopy(model).half()
    detect = old.model[-1]
    del detect.anchor_grid
    detect.register_buffer("anchor_grid", torch.zeros(detect.nl, 1, detect.na, 1, 1, 2))  # a buffer before v6.0
    del detect.inplace
    for m in old.modules():
        if isinstance(m, nn.Upsample):
            del m.recompute_scale_factor  # absent before torch 1.11
        if isinstance(m, nn.SiLU):
            m.inplace = False
    old.names = ["cat", "dog", "bird"]
    path = tmp_path / "old.pt"
    torch.save({"model": old, "epoch": -1, "best_fitness": None}, path)

    m = attempt_load(path, fuse=False, inplace=True)
    d = next(x for x in m.modules() if isinstance(x, Detect))
    assert isinstance(d.anchor_grid, list) and "anchor_grid" not in d._buffers and d.inplace is True
    assert all(hasattr(x, "recompute_scale_factor") for x in m.modules() if isinstance(x, nn.Upsample))
    assert all(x.inplace for x in m.modules() if isinstance(x, nn.SiLU))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x)[0], _reference(model, x), atol=1e-5)


class _NotYOLO:
    pass


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_forbidden_globals_are_refused_without_running(tmp_path, model):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": deepcopy(model).half(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(UserError, match=r"needs (posix|nt)\.system, which is not an allowed YOLOv5 class"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(UserError, match="evil.pt"):
        attempt_load(path)
    assert not marker.exists()

    path = tmp_path / "other.pt"
    torch.save({"model": _NotYOLO()}, path)
    with pytest.raises(UserError, match=r"needs .*_NotYOLO, which is not an allowed YOLOv5 class; refusing"):
        load_checkpoint(path)


def test_broken_files_give_one_line_user_errors(tmp_path, model):
    good = tmp_path / "good.pt"
    save_checkpoint(_v7_checkpoint(model), good)
    data = good.read_bytes()
    cases = {
        "missing.pt": None,
        "truncated.pt": data[: len(data) // 2],
        "text.pt": b"not a checkpoint at all\n",
        "empty.pt": b"",
        "random.pt": np.random.default_rng(0).bytes(4096),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(UserError) as e:
            load_checkpoint(path)
        assert name in str(e.value) and "\n" not in str(e.value)

    for name, obj in (("nomodel.pt", {"epoch": 1}), ("tensor.pt", torch.zeros(3)), ("list.pt", [1, 2])):
        torch.save(obj, tmp_path / name)
        with pytest.raises(UserError, match=f"{name} is not a YOLOv5 checkpoint"):
            load_checkpoint(tmp_path / name)
    torch.save({"model": model.state_dict()}, tmp_path / "state_dict.pt")
    with pytest.raises(UserError, match="no whole model"):
        attempt_load(tmp_path / "state_dict.pt")
    with pytest.raises(UserError, match="ensembles"):
        attempt_load([good, good])


def test_save_is_atomic(tmp_path, model):
    path = tmp_path / "last.pt"
    save_checkpoint(_v7_checkpoint(model), path)
    before = path.read_bytes()
    with pytest.raises(
        (AttributeError, TypeError, pickle.PicklingError)
    ):  # a lambda cannot be pickled: the old file must survive intact
        save_checkpoint({"model": None, "bad": lambda: 0}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]
    save_checkpoint({"model": None, "epoch": 5}, path)  # overwriting works
    assert load_checkpoint(path)["epoch"] == 5


def test_strip_optimizer_keeps_the_ema_as_model_and_drops_training_state_and_adapters(model, tmp_path):
    path = tmp_path / "last.pt"
    ema = deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.5)  # tell the EMA apart from the raw model
    ckpt = _v7_checkpoint(model, distill={"adapters": {"m.0.conv.weight": torch.ones(2, 1, 3, 3)}})
    ckpt["ema"] = deepcopy(ema).half()
    save_checkpoint(ckpt, path)
    strip_optimizer(path)
    x = load_checkpoint(path)
    assert x["epoch"] == -1 and all(x[k] is None for k in ("optimizer", "best_fitness", "ema", "updates"))
    assert "distill" not in x  # adapters only serve --resume: a finished checkpoint is a plain YOLOv5 one
    assert not any(p.requires_grad for p in x["model"].parameters())
    for a, b in zip(x["model"].state_dict().values(), ema.half().state_dict().values()):
        assert torch.equal(a, b)


def test_load_student_says_whether_the_head_came_pretrained(tmp_path):
    """train.py keeps the anchors of a pretrained head (AutoAnchor would re-fit them and the head would lose what it
    learnt); a head of another class count, or a --cfg / hyp anchors that replace them, is not pretrained."""
    from tests.conftest import save_random_model
    from utils.checkpoint import load_student

    ckpt = save_random_model("yolov5n", tmp_path / "n8.pt", nc=8)
    device = torch.device("cpu")
    model, _, pretrained = load_student(ckpt, "", 8, None, False, device)
    assert pretrained and torch.equal(model.model[-1].anchors, load_checkpoint(ckpt)["model"].model[-1].anchors.float())
    assert load_student(ckpt, "", 3, None, False, device)[2] is False  # other nc: the head's convs are new
    assert load_student(ckpt, "yolov5n.yaml", 8, None, False, device)[2] is False  # --cfg: anchors from the YAML
    assert load_student("", "yolov5n.yaml", 8, None, False, device)[2] is False  # from scratch


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_during_a_checkpoint_write_is_one_line_and_keeps_the_old_file(tmp_path, model):
    """A write that hits a full disk (the temporary file is made to land on /dev/full, which answers every write
    with ENOSPC) gave torch's raw 'RuntimeError: [enforce fail at inline_container.cc] unexpected pos'; now one line,
    and the previous checkpoint is intact."""
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 0, "model": model}, path)
    before = path.read_bytes()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.symlink_to("/dev/full")
    with pytest.raises(UserError, match=r"could not write checkpoint .*last.pt \(No space left on device\)") as e:
        save_checkpoint({"epoch": 1, "model": model}, path)
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before and not tmp.exists() and not tmp.is_symlink()
