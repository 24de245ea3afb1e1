"""distill/gradsink.py: the output terms' gradients added into the head outputs' own gradient in place (tap) equal
the gradients autograd gives without the tap; read_rows equals plain indexing, forward and backward."""

from __future__ import annotations

import pytest
import torch

from distill import Distiller
from distill.gradsink import read_rows, sink_of, tap
from distill.terms import box_kd_term, kd_term
from models.yolo import DetectionModel

SHAPES = [(2, 3, 6, 5, 9), (2, 3, 3, 3, 9)]  # two levels, non-square, nc 4


def _outputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    teacher = [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    anchors = torch.rand(2, 3, 2, generator=g, dtype=torch.float64) * 3 + 0.5
    return preds, teacher, anchors


def _grads(tapped: bool, yolo: bool = True, dtype=torch.float64, backwards: int = 1):
    """Gradients of the head outputs under YOLOv5-like losses (a full-size objectness read and a few gathered rows)
    plus both output terms, the outputs tapped or not."""
    base, teacher, anchors = _outputs(dtype)
    leaves = [b.clone().requires_grad_(True) for b in base]
    preds = [tap(p) if tapped else p for p in leaves]
    loss = kd_term(preds=preds, teacher_preds=teacher, balance=[4.0, 1.0], top_share=0.3)
    loss = loss + 0.5 * box_kd_term(preds=preds, anchors=anchors, teacher_preds=teacher, teacher_anchors=anchors)
    if yolo:
        loss = loss + sum(p[..., 4].sigmoid().mean() + p[0, 1, 2, 1, :4].pow(2).sum() for p in preds)
    for i in range(backwards):
        loss.backward(retain_graph=i < backwards - 1)
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("yolo", [True, False])  # without another consumer the tap's gradient starts from zeros
def test_tapped_gradients_equal_autograd(yolo):
    plain, tapped = _grads(False, yolo), _grads(True, yolo)
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(tapped, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_a_second_backward_adds_the_same_again():
    """retain_graph: each backward hands its own updates to the tap (none left over from the first)."""
    once, twice = _grads(True), _grads(True, backwards=2)
    for a, b in zip(twice, once):
        torch.testing.assert_close(a, 2 * b, rtol=1e-12, atol=1e-15)


def test_tapped_gradients_keep_the_outputs_dtype():
    plain, tapped = _grads(False, dtype=torch.bfloat16), _grads(True, dtype=torch.bfloat16)
    for a, b in zip(tapped, plain):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_read_rows_is_indexing():
    x = torch.randn(2, 3, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([5, 0, 119, 42])
    got = read_rows(x, rows, 4)
    want = x.reshape(-1, 7)[rows, :4]
    torch.testing.assert_close(got, want)
    upstream = torch.randn(4, 4, dtype=torch.float64)
    (g_got,) = torch.autograd.grad(got, x, upstream)
    (g_want,) = torch.autograd.grad(want, x, upstream)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
    assert sink_of(x) is None and sink_of(tap(x)) is not None


def test_tap_is_the_identity_forward():
    x = torch.randn(2, 3, 4, 4, 9, requires_grad=True)
    y = tap(x)
    assert torch.equal(y, x) and y.shape == x.shape


def test_distiller_taps_the_outputs_only_for_output_terms(teacher_pt):
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    imgs, targets = torch.rand(1, 3, 64, 64), torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]])
    fgfi = Distiller(student, teacher_pt, "cpu", precision="fp32")
    preds, _ = fgfi(student, imgs, targets)
    assert all(sink_of(p) is None for p in preds)
    both = Distiller(student, teacher_pt, "cpu", weights={"kd": 1.0, "box_kd": 0.05}, precision="fp32")
    preds, _ = both(student, imgs, targets)
    assert all(sink_of(p) is not None for p in preds)
