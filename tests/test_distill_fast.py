"""Each fast kernel of distill/ equals its plain-autograd reference (distill/fast.py), in values and gradients."""

from __future__ import annotations

import pytest
import torch

from distill import Distiller
from distill.fast import fast_kernels, use_fast_kernels
from distill.sparse import sparse_conv
from distill.terms import box_kd_term, kd_term
from models.yolo import DetectionModel


def outputs(seed: int, nc: int = 3, shapes=((4, 6), (2, 3)), dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, h, w, 5 + nc, generator=gen, dtype=dtype) * 3 for h, w in shapes]


def both(fn):
    """fn() with the fast kernels on and off: ((value, grads) fast, (value, grads) reference)."""
    results = []
    for on in (True, False):
        with fast_kernels(on):
            assert use_fast_kernels() is on
            results.append(fn())
    return results


@pytest.mark.parametrize(
    "nc, temperature, dtype", [(3, 1.0, torch.float32), (1, 2.0, torch.float32), (80, 1.0, torch.float64)]
)
def test_logit_kl_kernel_equals_reference(nc, temperature, dtype):
    teacher = outputs(0, nc, dtype=dtype)

    def run():
        student = [s.requires_grad_() for s in outputs(1, nc, dtype=dtype)]
        loss = kd_term(preds=student, teacher_preds=teacher, balance=[4.0, 1.0], temperature=temperature)
        loss.backward()
        return loss.detach(), [s.grad for s in student]

    (fast, fast_grads), (ref, ref_grads) = both(run)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_sparse_conv_kernel_equals_reference():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 8, 5, 7, generator=gen)
    weight0, bias0 = torch.randn(6, 8, 3, 3, generator=gen), torch.randn(6, generator=gen)
    cells = torch.tensor([0, 3, 11, 34, 35, 40, 69])

    def run():
        x, weight, bias = (t.clone().requires_grad_() for t in (x0, weight0, bias0))
        out = sparse_conv(x, cells, weight, bias)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        return out.detach(), [x.grad, weight.grad, bias.grad]

    (fast, fast_grads), (ref, ref_grads) = both(run)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_distiller_step_equals_reference(teacher_pt):
    """A whole distillation step (sparse adapter, kd, box_kd) with the fast kernels on and off: the same loss and the
    same gradients on the student and the adapters; off, the adapter runs dense."""
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [1, 3, 0.3, 0.6, 0.2, 0.5]])

    def run():
        torch.manual_seed(0)
        student = DetectionModel("yolov5n.yaml", nc=8).train()
        distiller = Distiller(
            student, teacher_pt, "cpu", weights={"kd": 1.0, "box_kd": 0.05}, precision="fp32"
        )  # fmt: skip
        preds, inputs = distiller(student, imgs, targets)
        loss = sum(w * fn(preds=preds, anchors=student.model[-1].anchors, **inputs) for w, fn in
                   distiller.loss_terms.values())  # fmt: skip
        loss.backward()
        grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
        grads += [p.grad.clone() for p in distiller.parameters()]
        return loss.detach(), grads, distiller.sparse_max_share

    (fast, fast_grads, share_on), (ref, ref_grads, share_off) = both(run)
    assert share_on > 0 and share_off == 0.0
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    assert len(fast_grads) == len(ref_grads)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_box_kd_needs_no_kernel():
    """box_kd reads its rows by plain indexing: autograd's gradient, nothing hand-written."""
    teacher = outputs(4)
    student = [s.requires_grad_() for s in outputs(5)]
    anchors = [torch.rand(3, 2) + 0.5 for _ in student]
    box_kd_term(
        preds=student, anchors=anchors, teacher_preds=teacher, teacher_anchors=anchors, top_share=1.0
    ).backward()
    assert all(s.grad is not None and s.grad[..., 4:].abs().sum() == 0 for s in student)
