"""CUDA-only checks of the distillation step: AMP student, fp16 teacher, mask built on the GPU from GPU targets."""

from __future__ import annotations

import pytest
import torch

from distill import FeatureAdapters, feature_channels, imitation_mask, teacher_features
from models.yolo import DetectionModel
from utils.general import yaml_load
from utils.loss import ComputeLoss

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT_HYP = "data/hyps/hyp.scratch-low.yaml"


def _targets(device):
    return torch.tensor(
        [[0, 1, 0.30, 0.40, 0.20, 0.30], [0, 2, 0.70, 0.25, 0.10, 0.10], [2, 0, 0.50, 0.50, 0.60, 0.40]], device=device
    )


def test_amp_distillation_step_on_cuda():
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=3).to(device).train()
    teacher = DetectionModel("yolov5s.yaml", nc=3).to(device).eval().requires_grad_(False).half()
    layers = student.imitation_points()
    adapters = FeatureAdapters(feature_channels(student, layers), feature_channels(teacher, layers)).to(device)
    hyp = yaml_load(ROOT_HYP)
    compute_loss = ComputeLoss(student, hyp, imitation_weight=0.01)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(adapters.parameters()), lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    imgs = torch.rand(4, 3, 128, 160, device=device)
    targets = _targets(device)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}

    with torch.autocast("cuda"):
        pred, feat, mask = student(imgs, target=targets)
        t_feats = teacher_features(teacher, imgs, layers)
        loss, items = compute_loss(pred, targets, teacher=t_feats, student=adapters([feat]), mask=[mask])
    assert mask.device.type == "cuda" and mask.shape == (4, 1, 16, 20)
    assert t_feats[0].dtype == torch.float32 and not t_feats[0].requires_grad
    assert items["imitation"].dtype == torch.float32 and torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert next(teacher.parameters()).dtype == torch.float16


def test_mask_on_gpu_equals_cpu():
    anchors = torch.tensor([[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]])
    targets = _targets("cpu")
    cpu = imitation_mask(targets, anchors, (3, 16, 20))
    gpu = imitation_mask(targets.cuda(), anchors.cuda(), (3, 16, 20))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
