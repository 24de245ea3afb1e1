"""The Distiller's CPU precision (--distill-precision): bf16 teacher and adapter products where the CPU has AMX.

The bf16 sparse adapter (distill.sparse._CellConv under CPU autocast) against an independent float64 conv of the
bf16-rounded inputs; which precision 'auto' picks; a teacher in bf16 keeping its anchors exact; a bf16 distillation
step close to the float32 one, with float32 gradients; the resolved precision saved for --resume.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import distill.distiller as distiller_module
from distill import Distiller
from distill.loss import imitation_loss
from distill.sparse import gather_cells, sparse_conv
from models.yolo import DetectionModel
from utils.general import UserError, yaml_load
from utils.loss import ComputeLoss
from utils.torch_utils import cpu_has_bf16_matmul

HYP = "data/hyps/hyp.scratch-low.yaml"


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bfloat16, as float64."""
    return t.detach().bfloat16().double()


def test_bf16_sparse_conv_is_the_conv_of_the_rounded_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 7, 5, generator=g, requires_grad=True)  # non-square map
    weight = torch.randn(4, 6, 3, 3, generator=g, requires_grad=True)
    bias = torch.randn(4, generator=g, requires_grad=True)
    cells = torch.tensor([0, 4, 30, 34, 35, 41, 69])  # corners and borders of both images: zero padding is read
    upstream = torch.randn(len(cells), 4, generator=g)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_conv(x, cells, weight, bias)
    out.float().backward(upstream)
    assert out.dtype == torch.bfloat16  # as autocast's F.linear would give
    assert x.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float32

    # independent: a float64 dense conv of the bf16-rounded feature, weight and bias, read at the cells; the upstream
    # gradient rounded to bf16 as the products take it
    xr, wr, br = (_bf16(t).requires_grad_(True) for t in (x, weight, bias))
    want = gather_cells(F.conv2d(xr, wr, br, padding=1), cells)
    want.backward(_bf16(upstream))
    # bf16 keeps 8 significant bits: the output and the products inside the gradients are rounded to about 0.4%
    for got, ref in ((out, want), (x.grad, xr.grad), (weight.grad, wr.grad), (bias.grad, br.grad)):
        scale = float(ref.detach().abs().max())
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-2, atol=1e-2 * scale)
    # and not simply the float32 result: the bf16 path rounds (its error is well above float32's)
    with torch.no_grad():
        exact = gather_cells(F.conv2d(x.double(), weight.double(), bias.double(), padding=1), cells)
    assert float((out.detach().double() - exact).abs().max()) > 1e-4


def test_bf16_sparse_conv_of_no_cells_is_empty():
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    conv = torch.nn.Conv2d(3, 2, 3, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_conv(x, torch.zeros(0, dtype=torch.long), conv.weight, conv.bias)
    assert out.shape == (0, 2)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_follows_the_cpu(teacher_pt, monkeypatch, amx):
    monkeypatch.setattr(distiller_module, "cpu_has_bf16_matmul", lambda: amx)
    student = DetectionModel("yolov5n.yaml", nc=8)
    d = Distiller(student, teacher_pt, "cpu")
    assert d.cpu_bf16 is amx and d.precision == ("bf16" if amx else "fp32")
    assert next(d.teacher.parameters()).dtype == (torch.bfloat16 if amx else torch.float32)
    assert d.settings["distill_precision"] == d.precision  # resolved: a --resume elsewhere keeps it
    for asked, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):  # asked for: whatever the CPU has
        d = Distiller(student, teacher_pt, "cpu", precision=asked)
        assert d.precision == asked and next(d.teacher.parameters()).dtype == dtype


def test_bf16_teacher_keeps_its_anchors_exact(teacher_pt):
    student = DetectionModel("yolov5n.yaml", nc=8)
    fp32, bf16 = (Distiller(student, teacher_pt, "cpu", precision=p) for p in ("fp32", "bf16"))
    anchors = bf16.teacher.model[-1].anchors
    # 373 / 32 = 11.65625 needs 10 significant bits: bf16 would round it, and a student adopting the teacher's
    # anchors (--kd-weight from scratch) would copy the rounded value
    assert anchors.dtype == torch.float32 and torch.equal(anchors, fp32.teacher.model[-1].anchors)
    assert not torch.equal(anchors.bfloat16().float(), anchors)  # the check above is not vacuous


def test_bad_precision_is_one_line(teacher_pt):
    with pytest.raises(UserError, match="--distill-precision 'fp16': use one of auto, fp32, bf16"):
        Distiller(DetectionModel("yolov5n.yaml", nc=8), teacher_pt, "cpu", precision="fp16")


def test_bf16_step_is_close_to_the_float32_step(teacher_pt):
    """One fixed batch through the Distiller (FGFI + both output terms) and ComputeLoss in fp32 and in bf16: the loss
    items agree to bf16's precision, the gradients reaching the student and the adapters are float32 and close, and
    in bf16 the sparse and dense adapter paths agree too."""
    imgs = torch.rand(2, 3, 128, 96, generator=torch.Generator().manual_seed(0))  # non-square
    targets = torch.tensor(
        [[0, 1, 0.30, 0.40, 0.20, 0.30], [0, 2, 0.70, 0.25, 0.10, 0.10], [1, 0, 0.55, 0.60, 0.25, 0.35]]
    )
    runs = {}
    for precision, max_share in (("fp32", None), ("bf16", None), ("bf16", 0.0)):
        torch.manual_seed(0)
        student = DetectionModel("yolov5n.yaml", nc=8).train()
        d = Distiller(
            student, teacher_pt, "cpu", weights={"kd": 1.0, "box_kd": 0.05}, precision=precision,
            sparse_max_share=max_share,
        )  # fmt: skip
        compute_loss = ComputeLoss(student, yaml_load(HYP), terms=d.loss_terms)
        preds, inputs = d(student, imgs, targets)
        if max_share is None:
            assert inputs["student"][0].dim() == 2  # the sparse path
            assert inputs["student"][0].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        loss, items = compute_loss(preds, targets, **inputs)
        loss.backward()
        params = list(student.parameters()) + d.parameters()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in params)
        runs[(precision, max_share)] = items, [p.grad for p in params]
    (fp32_items, fp32_grads), (bf16_items, bf16_grads), (dense_items, dense_grads) = runs.values()
    assert bf16_items["imitation"] > 0 and bf16_items["kd"] > 0
    for k in fp32_items:
        torch.testing.assert_close(bf16_items[k], fp32_items[k], rtol=2e-2, atol=1e-6, msg=k)
        torch.testing.assert_close(dense_items[k], bf16_items[k], rtol=2e-2, atol=1e-6, msg=k)
    errors = [float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(bf16_grads, fp32_grads)]
    # each parameter's gradient against its norm (measured: at most 3.8%, 1.4% on average)
    assert max(errors) < 0.1 and sum(errors) / len(errors) < 0.03, errors


def test_precision_is_restored_on_resume():
    assert Distiller.options_from_state({"teacher": "t.pt", "distill_precision": "bf16"})["distill_precision"] == "bf16"
    # checkpoints from before the flag ran the teacher and the adapters in float32
    assert Distiller.options_from_state({"teacher": "t.pt"})["distill_precision"] == "fp32"


def test_cpu_has_bf16_matmul_without_torch_support(monkeypatch):
    assert isinstance(cpu_has_bf16_matmul(), bool)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert cpu_has_bf16_matmul() is False


def test_bf16_imitation_loss_is_float32():
    s = torch.randn(5, 4).bfloat16()
    t = torch.randn(5, 4)
    loss = imitation_loss(s, t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ((s.float() - t) ** 2).sum() / (2 * 5))
