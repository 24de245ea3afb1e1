"""distill.teacher: a frozen eval teacher beside a training student; compatibility checks; channel adapters."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from distill import FeatureAdapters, feature_channels, imitation_loss, load_teacher, teacher_features
from models.yolo import DetectionModel
from utils.checkpoint import save_checkpoint
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


def test_teacher_is_frozen_eval_and_outside(models, teacher):
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # fp16 only on CUDA by default
    assert not any(p is q for p in teacher.parameters() for q in models["student"].parameters())
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
        assert all(torch.isfinite(imitation_loss(a, t, m)) for a, t, m in zip(adapted, t_feats, masks))
    # Layer 16 (default point) concatenates two 256 * width layers: 32 channels for the student, 64 for the teacher
    expected = [2 * make_divisible(256 * w, 8) for w in (0.0625, 0.125)]
    assert [feature_channels(student, [16], IMGSZ)[0], feature_channels(teacher, [16], IMGSZ)[0]] == expected


def test_training_loop_moves_student_not_teacher(models, unfused_teacher):
    student, teacher = deepcopy(models["student"]).train(), unfused_teacher
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    layers, t_layers = student.imitation_points(), teacher.imitation_points()
    adapters = FeatureAdapters(feature_channels(student, layers, IMGSZ), feature_channels(teacher, t_layers, IMGSZ))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}  # weights and BN running stats
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in adapters.state_dict().items()}
    optimizer = torch.optim.SGD([*student.parameters(), *adapters.parameters()], lr=0.1)
    for _ in range(2):
        imgs, targets = batch()
        preds, feat, mask = student(imgs, target=targets)
        loss = imitation_loss(adapters([feat])[0], teacher_features(teacher, imgs, t_layers)[0], mask)
        loss = loss + 0 * sum(p.sum() for p in preds)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert loss.item() > 0
    assert not teacher.training
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items() if "running" in k)
    assert any(not torch.equal(v, adapter_before[k]) for k, v in adapters.state_dict().items())


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
    assert any("5 classes" in m and "3" in m for m in log_lines)
    assert teacher.model[-1].nc == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_half_teacher_on_cuda(models):
    student = deepcopy(models["student"]).cuda()
    teacher = load_teacher(models["wide"], student, "cuda")
    assert all(p.dtype == torch.float16 for p in teacher.parameters())
    feats = teacher_features(teacher, batch()[0].cuda(), teacher.imitation_points("detect"))
    assert all(f.dtype == torch.float32 and f.is_cuda and torch.isfinite(f).all() for f in feats)
