"""distill.loss: imitation_loss values and edge cases, adapters, and where gradients go."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.loss import Adapter, FeatureAdapters, imitation_loss
from distill.teacher import teacher_features


def test_hand_computed_value():
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, -1.0], [2.0, 0.5]]]])  # [1, 2, 2, 2]
    teacher = torch.tensor([[[[0.0, 2.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # cells (0, 0) and (1, 0): N_p = 2 (not 2 * channels)
    # (0,0): (1-0)^2 + (0-1)^2 = 2;  (1,0): (3-1)^2 + (2-0)^2 = 8;  total 10 / (2 * 2) = 2.5
    loss = imitation_loss(student, teacher, mask)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2.5)
    assert imitation_loss(student, teacher, mask[:, 0]).item() == pytest.approx(2.5)  # [B, H, W] mask too


def test_full_mask_is_half_mean_square_per_location():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 4, 6), torch.randn(3, 5, 4, 6)
    expected = ((student - teacher) ** 2).sum() / (2 * 3 * 4 * 6)
    torch.testing.assert_close(imitation_loss(student, teacher, torch.ones(3, 1, 4, 6)), expected)
    torch.testing.assert_close(imitation_loss(student, teacher, None), expected)


def test_empty_mask_is_exactly_zero_with_zero_grads():
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 3)
    loss = imitation_loss(student, teacher, torch.zeros(2, 1, 3, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()


def test_missing_features_give_zero():
    x = torch.randn(1, 2, 2, 2)
    for student, teacher in ((None, x), (x, None), (None, None)):
        loss = imitation_loss(student, teacher, torch.ones(1, 1, 2, 2))
        assert isinstance(loss, torch.Tensor) and loss.item() == 0.0


def test_half_inputs_and_autocast_give_float32():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mask = (torch.rand(2, 1, 4, 4) > 0.5).float()
    full = imitation_loss(student, teacher, mask)
    half = imitation_loss(student.half(), teacher.half(), mask.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-3, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert imitation_loss(student, teacher, mask).dtype == torch.float32


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="adapt the student"):
        imitation_loss(torch.zeros(1, 8, 4, 4), torch.zeros(1, 16, 4, 4), torch.ones(1, 1, 4, 4))


def test_adapters_map_channels():
    adapters = FeatureAdapters([8, 16], [32, 24])
    out = adapters([torch.zeros(2, 8, 10, 6), torch.zeros(2, 16, 5, 3)])
    assert [tuple(o.shape) for o in out] == [(2, 32, 10, 6), (2, 24, 5, 3)]
    conv = adapters.m[0].conv
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    single = FeatureAdapters([4], [6])
    assert single(torch.zeros(1, 4, 3, 3)).shape == (1, 6, 3, 3)
    with pytest.raises(ValueError):
        adapters([torch.zeros(2, 8, 10, 6)])
    with pytest.raises(ValueError):
        FeatureAdapters([8], [8, 8])


class StubTeacher(nn.Module):
    """Anything with extract_features(x, layers) and parameters stands in for a DetectionModel here."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, 2, 1)
        self.bn = nn.BatchNorm2d(6)

    def extract_features(self, x, layers):
        return [self.bn(self.conv(x)) for _ in layers]


def test_gradients_reach_student_and_adapter_never_teacher():
    torch.manual_seed(2)
    imgs = torch.rand(2, 3, 8, 8)
    student = nn.Conv2d(3, 4, 3, 2, 1)
    teacher = StubTeacher().requires_grad_(False).eval()
    adapter = Adapter(4, 6)

    t_feat = teacher_features(teacher, imgs, [0])[0]
    assert not t_feat.requires_grad and t_feat.dtype == torch.float32
    s_feat = student(imgs)
    s_feat.retain_grad()
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 1:3, 2] = 1
    imitation_loss(adapter(s_feat), t_feat, mask).backward()

    assert s_feat.grad is not None and s_feat.grad.abs().sum() > 0
    assert (s_feat.grad[1] == 0).all()  # image 1 has an empty mask
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_tensor_with_grad_is_detached():
    teacher = torch.randn(1, 2, 3, 3, requires_grad=True)
    student = torch.randn(1, 2, 3, 3, requires_grad=True)
    imitation_loss(student, teacher, torch.ones(1, 1, 3, 3)).backward()
    assert teacher.grad is None and student.grad is not None


def test_teacher_features_keep_teacher_in_eval():
    teacher = StubTeacher().requires_grad_(False)
    teacher.train()  # something switched it: teacher_features puts it back
    before = teacher.bn.running_mean.clone()
    teacher_features(teacher, torch.rand(2, 3, 8, 8), [0, 1])
    assert not teacher.training
    assert torch.equal(teacher.bn.running_mean, before)


def test_adapter_kernel_size_keeps_the_map_and_scales_cost():
    x = torch.randn(2, 8, 5, 7)
    for k, params in ((3, 16 * 8 * 9 + 16), (1, 16 * 8 + 16)):
        adapters = FeatureAdapters([8], [16], k=k)
        assert adapters([x])[0].shape == (2, 16, 5, 7)
        assert sum(p.numel() for p in adapters.parameters()) == params
    with pytest.raises(ValueError, match="odd"):
        FeatureAdapters([8], [16], k=2)
