"""distill.teacher: a frozen eval teacher beside a training student; compatibility checks; channel adapters."""

from __future__ import annotations

import re
from copy import deepcopy

import pandas as pd
import pytest
import torch

import distill.distiller
import train
from distill import Distiller, FeatureAdapters, feature_channels, imitation_loss, load_teacher, teacher_features
from models.yolo import DetectionModel
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.general import ROOT, UserError, make_divisible, yaml_load

IMGSZ = 64


def tiny_model(cfg: str, width: float, nc: int) -> DetectionModel:
    d = yaml_load(ROOT / "models" / cfg)
    d["depth_multiple"], d["width_multiple"], d["nc"] = 0.33, width, nc
    return DetectionModel(d)


def save_model(model: DetectionModel, path) -> str:
    ckpt = {"epoch": -1, "best_fitness": None, "model": deepcopy(model).half(), "ema": None, "updates": None,
            "optimizer": None, "opt": {}, "git": None, "date": None}  # fmt: skip
    save_checkpoint(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Quarter-yolov5n-width student (3 classes), a 2x wider teacher and a 5-class P6 teacher, saved."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("teachers")
    student = tiny_model("yolov5n.yaml", 0.0625, 3)
    wide = tiny_model("yolov5s.yaml", 0.125, 3)
    return {
        "student": student,
        "wide": save_model(wide, root / "wide.pt"),
        "p6": save_model(tiny_model("yolov5n6.yaml", 0.0625, 5), root / "p6.pt"),
    }


@pytest.fixture(scope="module")
def teacher(models):
    return load_teacher(models["wide"], models["student"], "cpu")


@pytest.fixture(scope="module")
def unfused_teacher(models):
    return load_teacher(models["wide"], models["student"], "cpu", fuse=False)  # keeps its BN layers to watch


def batch(n_images: int = 2):
    imgs = torch.rand(n_images, 3, IMGSZ, IMGSZ)
    targets = torch.tensor([[0, 1, 0.3, 0.6, 0.4, 0.3], [1, 0, 0.7, 0.2, 0.2, 0.25], [1, 2, 0.5, 0.5, 0.9, 0.8]])
    return imgs, targets


def _storages(model: torch.nn.Module) -> set[int]:
    """Where each parameter's and buffer's memory lives (a tensor sharing another's storage has the same pointer)."""
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def test_teacher_is_frozen_eval_and_outside(models, teacher, unfused_teacher):
    for t in (teacher, unfused_teacher):
        assert not t.training and all(not m.training for m in t.modules())
        assert all(not p.requires_grad for p in t.parameters())
        assert all(p.dtype == torch.float32 for p in t.parameters())  # fp16 only on CUDA by default
        assert not _storages(t) & _storages(models["student"])  # no tensor memory shared with the student
    # a training step of the student and adapters, with BN in train mode, moves no teacher weight or BN statistic
    student = deepcopy(models["student"]).train()
    s_layers, t_layers = student.imitation_points(), unfused_teacher.imitation_points()
    adapters = FeatureAdapters(
        feature_channels(student, s_layers, IMGSZ), feature_channels(unfused_teacher, t_layers, IMGSZ)
    )
    before = {k: v.clone() for k, v in unfused_teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.SGD([*student.parameters(), *adapters.parameters()], lr=0.5)
    imgs, targets = batch()
    with torch.enable_grad():
        _, s_feats, masks = student(imgs, target=targets)
        t_feats = teacher_features(unfused_teacher, imgs, t_layers)
        loss = imitation_loss(adapters([s_feats])[0], t_feats[0], masks)
    assert not t_feats[0].requires_grad and t_feats[0].grad_fn is None  # nothing to carry a gradient back
    loss.backward()
    optimizer.step()
    assert loss.item() > 0 and all(p.grad is None for p in unfused_teacher.parameters())
    assert not unfused_teacher.training
    assert not [k for k, v in unfused_teacher.state_dict().items() if not torch.equal(v, before[k])]
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any("running_mean" in k for k in moved) and any(k.endswith("conv.weight") for k in moved)
    feats = teacher_features(teacher, batch()[0], teacher.imitation_points())
    assert len(feats) == 1 and feats[0].dtype == torch.float32 and not feats[0].requires_grad
    assert feats[0].shape[-2:] == (IMGSZ // 8, IMGSZ // 8)  # default point: stride 8


def test_fused_teacher_gives_the_same_features(teacher, unfused_teacher):
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    layers = teacher.imitation_points("detect")
    imgs = batch()[0]
    for a, b in zip(teacher_features(teacher, imgs, layers), teacher_features(unfused_teacher, imgs, layers)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_wider_teacher_adapters_map_channels(models, teacher):
    student = models["student"]
    for imitation_layers in (None, "detect", [4, 6]):
        s_layers, t_layers = student.imitation_points(imitation_layers), teacher.imitation_points(imitation_layers)
        s_ch, t_ch = feature_channels(student, s_layers, IMGSZ), feature_channels(teacher, t_layers, IMGSZ)
        adapters = FeatureAdapters(s_ch, t_ch)
        student.train()
        imgs, targets = batch()
        _, s_feats, masks = student(imgs, target=targets, imitation_layers=[*s_layers])
        t_feats = teacher_features(teacher, imgs, t_layers)
        adapted = adapters(s_feats)
        assert [a.shape for a in adapted] == [t.shape for t in t_feats]
        assert sum(int(m.sum()) for m in masks) > 0, imitation_layers  # some cells imitated: a nonzero loss
        for a, t, m in zip(adapted, t_feats, masks):
            # eq. 2-3 by hand in float64: sum over b, c, y, x of I * (s - t)^2, over 2 * N_p (N_p floored at 1)
            a64, t64, m64 = a.detach().double(), t.double(), m.double()
            expected = (m64 * (a64 - t64) ** 2).sum() / (2 * max(float(m64.sum()), 1.0))
            loss = imitation_loss(a, t, m)
            assert loss.dtype == torch.float32 and loss.dim() == 0
            torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0)
            if m.sum() == 0:
                assert loss.item() == 0.0
    # Layer 16 (default point) concatenates two 256 * width layers: 32 channels for the student, 64 for the teacher
    expected = [2 * make_divisible(256 * w, 8) for w in (0.0625, 0.125)]
    assert [feature_channels(student, [16], IMGSZ)[0], feature_channels(teacher, [16], IMGSZ)[0]] == expected


@pytest.mark.slow
def test_train_py_moves_student_and_adapters_not_teacher(tmp_path, tiny_data, models, monkeypatch):
    """train.py's own loop, one distilled epoch: the student's weights and BN statistics and the adapters move; the
    teacher (kept unfused here, so that its BN statistics can be watched) keeps every tensor bit for bit, gets no
    gradient, stays frozen in eval mode and is in no optimizer group and no saved checkpoint."""
    seen = {"modes": []}
    real_load_teacher, real_optimizer = distill.distiller.load_teacher, train.smart_optimizer
    real_call = Distiller.__call__

    def unfused_teacher(*args, **kwargs):
        seen["teacher"] = teacher = real_load_teacher(*args, **{**kwargs, "fuse": False})
        seen["teacher_before"] = {k: v.clone() for k, v in teacher.state_dict().items()}
        return teacher

    def recording_optimizer(model, *args, **kwargs):
        seen["student"], seen["student_before"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        seen["optimizer"] = real_optimizer(model, *args, **kwargs)
        return seen["optimizer"]

    def recording_call(self, student, imgs, targets, **kwargs):
        if "adapters_before" not in seen:  # the first step, before any optimizer step
            seen["distiller"] = self
            seen["adapters_before"] = {k: v.clone() for k, v in self.adapters.state_dict().items()}
        seen["modes"].append(self.teacher.training or any(m.training for m in self.teacher.modules()))
        return real_call(self, student, imgs, targets, **kwargs)

    monkeypatch.setattr(distill.distiller, "load_teacher", unfused_teacher)
    monkeypatch.setattr(train, "smart_optimizer", recording_optimizer)
    monkeypatch.setattr(Distiller, "__call__", recording_call)
    train.run(
        data=str(tiny_data), cfg="yolov5n.yaml", ft_weights=models["wide"], epochs=1, imgsz=64, batch_size=4,
        device="cpu", workers=0, noplots=True, noautoanchor=True, project=str(tmp_path), name="d", exist_ok=True,
    )  # fmt: skip
    teacher, student, adapters = seen["teacher"], seen["student"], seen["distiller"].adapters
    assert seen["modes"] == [False] * 4  # 16 images, batch 4: four steps, the teacher in eval mode at every one
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, seen["teacher_before"][k])]
    assert not changed, changed  # weights and BN running statistics
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    # the optimizer trains the student and the adapters, never a teacher tensor (same objects here: one process)
    trained = [p for group in seen["optimizer"].param_groups for p in group["params"]]
    assert not {id(p) for p in trained} & {id(p) for p in teacher.parameters()}
    assert not {p.untyped_storage().data_ptr() for p in trained} & _storages(teacher)
    assert {id(p) for p in adapters.parameters()} <= {id(p) for p in trained}
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, seen["student_before"][k])]
    assert any("running_mean" in k for k in moved) and any(k.endswith("conv.weight") for k in moved)
    assert all(not torch.equal(v, seen["adapters_before"][k]) for k, v in adapters.state_dict().items())
    # what train.py wrote: an imitation loss each epoch, and plain student checkpoints without teacher tensors
    df = pd.read_csv(tmp_path / "d/results.csv", skipinitialspace=True).rename(columns=str.strip)
    assert list(df["epoch"]) == [0] and (df["train/imitation_loss"] > 0).all()
    for f in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / "d/weights" / f)
        assert "distill" not in ckpt and set(ckpt["model"].state_dict()) == set(student.state_dict()), f


def test_stride_mismatch_names_both(models):
    # layer 16 is a stride-8 Concat in the P5 student but a stride-32 Conv in the P6 teacher
    with pytest.raises(UserError) as error:
        load_teacher(models["p6"], models["student"], "cpu", imitation_layers=[16])
    message = str(error.value)
    assert "p6.pt" in message and "16" in message and "stride 32" in message and "stride 8" in message
    # their default points differ in index but share stride 8: accepted
    teacher = load_teacher(models["p6"], models["student"], "cpu", fuse=False)
    assert teacher.imitation_points() != models["student"].imitation_points()
    with pytest.raises(UserError):  # 'detect': 4 teacher levels, 3 student levels
        load_teacher(models["p6"], models["student"], "cpu", imitation_layers="detect")


def test_class_count_mismatch_warns(models, log_lines):
    load_teacher(models["wide"], models["student"], "cpu", fuse=False)
    assert not any("classes" in m for m in log_lines)
    teacher = load_teacher(models["p6"], models["student"], "cpu", fuse=False)  # default points: both stride 8
    warning = re.compile(
        rf"--ft_weights {re.escape(models['p6'])}: teacher has 5 classes, student 3; distilling anyway "
        r"\(only neck features are imitated\)"
    )
    assert len([m for m in log_lines if warning.search(m)]) == 1, log_lines
    assert teacher.model[-1].nc == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_half_teacher_on_cuda(models):
    student = deepcopy(models["student"]).cuda()
    teacher = load_teacher(models["wide"], student, "cuda")
    assert all(p.dtype == torch.float16 for p in teacher.parameters())
    feats = teacher_features(teacher, batch()[0].cuda(), teacher.imitation_points("detect"))
    assert all(f.dtype == torch.float32 and f.is_cuda and torch.isfinite(f).all() for f in feats)
