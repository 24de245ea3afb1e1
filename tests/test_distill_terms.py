"""distill/terms.py: the output distillation terms against independent per-anchor float64 computations, their edge
cases (a teacher that sees nothing, gradients), the head checks, the multi-level reduction, and the table itself
(a term added in a test becomes a results.csv column without touching train.py)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

import train
import val
from distill import BOXES, Distiller, check_heads
from distill.loss import imitation_loss
from distill.terms import (
    OUTPUT_TOP_SHARE,
    TERMS,
    Term,
    box_kd_term,
    imitation_term,
    kd_term,
    level_weights,
    top_anchors,
)
from models.yolo import DetectionModel
from tests.test_train import _Interrupt, _interrupt_after_first_epoch
from utils.checkpoint import load_checkpoint
from utils.general import UserError, yaml_load
from utils.loss import ComputeLoss

HYP = "data/hyps/hyp.scratch-low.yaml"
SHAPES = [(3, 4), (2, 2)]  # two levels, non-square


def random_outputs(seed: int, nc: int = 3, na: int = 2, b: int = 2, shapes=SHAPES, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, na, h, w, 5 + nc, generator=gen, dtype=dtype) * 2 for h, w in shapes]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bernoulli_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def top_rows(t_flat, share):
    """The anchors (row numbers) of a level's class and box parts: the ceil(share * n) of highest teacher
    objectness, by sorting in plain Python."""
    k = math.ceil(share * len(t_flat))
    return set(sorted(range(len(t_flat)), key=lambda i: -t_flat[i][4])[:k])


def ref_kd(student, teacher, balance, temperature, top_share=1.0):
    """The kd term anchor by anchor, in plain Python floats."""
    obj, cls_num, cls_den = 0.0, 0.0, 0.0
    for s_level, t_level, gain in zip(student, teacher, balance):
        s_flat, t_flat = (
            s_level.reshape(-1, s_level.shape[-1]).tolist(),
            t_level.reshape(-1, t_level.shape[-1]).tolist(),
        )
        top = top_rows(t_flat, top_share)
        level_obj = 0.0
        for i, (s, t) in enumerate(zip(s_flat, t_flat)):
            level_obj += bernoulli_kl(sigmoid(t[4] / temperature), sigmoid(s[4] / temperature))
            nc = len(s) - 5
            if nc > 1 and i in top:
                w = sigmoid(t[4])
                kl = sum(
                    bernoulli_kl(sigmoid(t[5 + c] / temperature), sigmoid(s[5 + c] / temperature)) for c in range(nc)
                )
                cls_num += w * kl / nc
                cls_den += w
        obj += gain * level_obj / len(s_flat)
    return temperature**2 * (obj + cls_num / max(cls_den, 1.0))


def ref_ciou(b1, b2, eps=1e-7):
    """CIoU of two (x, y, w, h) boxes (Zheng et al. 2020), written out for one pair."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = b1, b2
    l1, r1, t1, d1 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    l2, r2, t2, d2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = max(0.0, min(r1, r2) - max(l1, l2)) * max(0.0, min(d1, d2) - max(t1, t2))
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    c2 = (max(r1, r2) - min(l1, l2)) ** 2 + (max(d1, d2) - min(t1, t2)) ** 2 + eps
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = 4 / math.pi**2 * (math.atan(w2 / (h2 + eps)) - math.atan(w1 / (h1 + eps))) ** 2
    alpha = v / (v - iou + 1 + eps)
    return iou - rho2 / c2 - v * alpha


def ref_box_kd(student, teacher, s_anchors, t_anchors, min_obj, top_share=1.0):
    num, den = 0.0, 0.0
    for s_level, t_level, a_s, a_t in zip(student, teacher, s_anchors.tolist(), t_anchors.tolist()):
        b, na, h, w, _ = s_level.shape
        top = top_rows(t_level.reshape(-1, t_level.shape[-1]).tolist(), top_share)
        for i in range(b):
            for a in range(na):
                for y in range(h):
                    for x in range(w):
                        s, t = s_level[i, a, y, x].tolist(), t_level[i, a, y, x].tolist()
                        p = sigmoid(t[4])
                        if p <= min_obj or ((i * na + a) * h + y) * w + x not in top:
                            continue
                        box_s = [2 * sigmoid(s[0]) - 0.5, 2 * sigmoid(s[1]) - 0.5,
                                 (2 * sigmoid(s[2])) ** 2 * a_s[a][0], (2 * sigmoid(s[3])) ** 2 * a_s[a][1]]  # fmt: skip
                        box_t = [2 * sigmoid(t[0]) - 0.5, 2 * sigmoid(t[1]) - 0.5,
                                 (2 * sigmoid(t[2])) ** 2 * a_t[a][0], (2 * sigmoid(t[3])) ** 2 * a_t[a][1]]  # fmt: skip
                        num += p * (1 - ref_ciou(box_s, box_t))
                        den += p
    return num / max(den, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("nc", [1, 3])
@pytest.mark.parametrize("top_share", [1.0, 0.3, OUTPUT_TOP_SHARE])
def test_kd_term_equals_per_anchor_reference(temperature, nc, top_share):
    student, teacher = random_outputs(0, nc), random_outputs(1, nc)
    kwargs = dict(balance=[4.0, 1.0], temperature=temperature, top_share=top_share)
    got = kd_term(preds=student, teacher_preds=teacher, **kwargs)
    want = ref_kd(student, teacher, **kwargs)
    # float32 out (as under AMP): agreement to float32 rounding
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-6)
    if nc > 1 and top_share < 1:  # the anchors left out change the class part: the selection is really tested
        assert abs(ref_kd(student, teacher, balance=[4.0, 1.0], temperature=temperature) - want) > 1e-3


def test_top_anchors_are_the_most_confident_share():
    obj = torch.randn(1001, generator=torch.Generator().manual_seed(3))
    for share, k in ((1 / 8, 126), (1.0, 1001), (1e-6, 1)):  # ceil(share * n), at least 1
        values, rows = top_anchors(obj, share)
        assert len(rows) == k == len(set(rows.tolist()))
        assert torch.equal(obj[rows], values) and values.min() >= obj.sort(descending=True).values[k - 1]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("nc", [1, 3])
def test_kd_term_gradient_is_the_formulas(temperature, nc):
    """The written-out backward of kd_term (_LogitKL) against finite differences (gradcheck, float64) and against
    autograd through the plain formula (soft-target BCE minus the teacher's entropy)."""
    from distill.terms import _LogitKL

    student, teacher = random_outputs(12, nc, shapes=[(2, 3)]), random_outputs(13, nc, shapes=[(2, 3)])
    s = student[0].requires_grad_()
    t_flat = teacher[0].view(-1, 5 + nc)
    rows = torch.tensor([7, 0, 11, 3]) if nc > 1 else None  # a subset, in no order: the others get no class gradient
    w = t_flat[rows, 4].sigmoid() / 7.0 if nc > 1 else None
    assert torch.autograd.gradcheck(lambda x: _LogitKL.apply(x, t_flat, 0.3, rows, w, temperature), (s,))
    kd_term(preds=[s], teacher_preds=teacher, temperature=temperature, top_share=1.0).backward()
    plain = s.detach().clone().requires_grad_()
    st, tt = plain / temperature, teacher[0] / temperature
    p = tt.sigmoid()
    kl = F.binary_cross_entropy_with_logits(st, p, reduction="none") - F.binary_cross_entropy_with_logits(
        tt, p, reduction="none"
    )
    ref = kl[..., 4].mean()
    if nc > 1:
        weight = teacher[0][..., 4].sigmoid()
        ref = ref + (weight * kl[..., 5:].mean(-1)).sum() / weight.sum().clamp(min=1)
    (temperature**2 * ref).backward()
    torch.testing.assert_close(s.grad, plain.grad)
    assert (s.grad[..., :4] == 0).all()  # the box columns are box_kd's


def test_kd_term_stays_finite_with_extreme_student_logits():
    """Student logits of +-120 (sigmoid(-120) is 0 in float32): a finite loss, close to the float64 formula where
    float32 can hold it, and the gradient still T * weight * (q - p)."""
    teacher = random_outputs(4, 3, shapes=[(2, 2)])
    student = [torch.where(t > 0, -120.0, 120.0) for t in random_outputs(5, 3, shapes=[(2, 2)])]
    s = student[0].requires_grad_()
    loss = kd_term(preds=[s], teacher_preds=teacher, top_share=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # float64 formula: softplus(s) - softplus(t) - p (s - t); logsigmoid keeps float32 exact out there
    s64, t64 = s.detach().double(), teacher[0].double()
    kl = F.softplus(s64) - F.softplus(t64) - t64.sigmoid() * (s64 - t64)
    weight = t64[..., 4].sigmoid()
    want = kl[..., 4].mean() + (weight * kl[..., 5:].mean(-1)).sum() / weight.sum().clamp(min=1)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    q, p = s64.sigmoid(), t64.sigmoid()
    grad = torch.zeros_like(s64)
    grad[..., 4] = (q - p)[..., 4] / weight.numel()
    grad[..., 5:] = (q - p)[..., 5:] * (weight / (3 * weight.sum().clamp(min=1)))[..., None]
    torch.testing.assert_close(s.grad.double(), grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 20.0])
def test_kd_term_is_finite_and_not_negative_at_extreme_teacher_logits(temperature):
    """A teacher logit of 200, 1e4 or inf (an fp16 head's overflow) gave -inf or NaN before (log(1 - p) of a p that
    rounds to 1): the loss is finite, >= 0, equal to the float64 formula where that is finite, gradient finite."""
    teacher = random_outputs(6, 3, shapes=[(2, 2)], dtype=torch.float32)
    teacher[0][0, 0, 0, 0, 4], teacher[0][0, 1, 0, 0, 4], teacher[0][1, 1, 1, 0, 5] = 200.0, 1e4, float("inf")
    student = random_outputs(7, 3, shapes=[(2, 2)], dtype=torch.float32)
    s = student[0].requires_grad_()
    loss = kd_term(preds=[s], teacher_preds=teacher, temperature=temperature, top_share=1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0 and torch.isfinite(s.grad).all()
    s64, t64 = s.detach().double() / temperature, teacher[0].double().clamp(max=1e4) / temperature
    kl = F.softplus(s64) - F.softplus(t64) - t64.sigmoid() * (s64 - t64)
    weight = (teacher[0].double().clamp(max=1e4))[..., 4].sigmoid()
    want = kl[..., 4].mean() + (weight * kl[..., 5:].mean(-1)).sum() / weight.sum().clamp(min=1)
    assert loss.item() == pytest.approx(temperature**2 * want.item(), rel=1e-4)


def test_kd_term_is_zero_when_the_student_matches_and_class_free_where_the_teacher_sees_nothing():
    teacher = random_outputs(2)
    assert kd_term(preds=teacher, teacher_preds=teacher).item() == pytest.approx(0.0, abs=1e-6)
    blind = [t.clone() for t in teacher]
    for t in blind:
        t[..., 4] = -40.0  # the teacher sees nothing anywhere
    student = random_outputs(3)
    for s in student:
        s[..., 4] = -40.0  # ... and neither does the student: only the class scores differ
    assert kd_term(preds=student, teacher_preds=blind).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("min_obj", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("top_share", [1.0, 0.3, OUTPUT_TOP_SHARE])
def test_box_kd_term_equals_per_anchor_reference(min_obj, top_share):
    student, teacher = random_outputs(4), random_outputs(5)
    s_anchors = torch.tensor([[[1.0, 1.5], [2.0, 1.0]], [[1.5, 3.0], [3.0, 2.0]]], dtype=torch.float64)
    t_anchors = s_anchors * 1.3  # other anchors: the boxes are compared as decoded boxes
    got = box_kd_term(
        preds=student, anchors=s_anchors, teacher_preds=teacher, teacher_anchors=t_anchors, min_obj=min_obj,
        top_share=top_share,
    )  # fmt: skip
    want = ref_box_kd(student, teacher, s_anchors, t_anchors, min_obj, top_share)
    assert want > 0 and got.item() == pytest.approx(want, rel=1e-5)


def test_box_kd_reads_every_confident_anchor_when_they_fit_in_the_top_share():
    """Where at most ceil(share * n) anchors of each level have p > min_obj, the top share holds all of them: the same
    value as reading every anchor."""
    student, teacher = random_outputs(14), random_outputs(15)
    for t in teacher:
        t[..., 4] = torch.where(t[..., 4] > 3.0, t[..., 4], torch.full_like(t[..., 4], -5.0))  # few confident
        assert 0 < int((t[..., 4].sigmoid() > 0.1).sum()) <= math.ceil(t[..., 4].numel() * OUTPUT_TOP_SHARE)
    anchors = torch.ones(2, 2, 2, dtype=torch.float64)
    kwargs = dict(preds=student, anchors=anchors, teacher_preds=teacher, teacher_anchors=anchors, min_obj=0.1)
    assert box_kd_term(**kwargs).item() == pytest.approx(box_kd_term(**kwargs, top_share=1.0).item(), rel=1e-6)


def test_box_kd_term_is_zero_where_the_teacher_sees_nothing_and_for_equal_boxes():
    student, teacher = random_outputs(6), random_outputs(7)
    anchors = torch.ones(2, 2, 2, dtype=torch.float64)
    for t in teacher:
        t[..., 4] = -40.0
    assert box_kd_term(preds=student, anchors=anchors, teacher_preds=teacher, teacher_anchors=anchors).item() == 0.0
    same = [x.float() for x in random_outputs(8)]
    for x in same:
        x[..., 2:4] = x[..., 2:4].abs()  # boxes of at least an anchor: IoU's eps (1e-7) is then below 1e-6
    student = [x.clone().requires_grad_() for x in same]  # equal boxes: no NaN (CIoU's 0 / 0 in float32)
    value = box_kd_term(preds=student, anchors=anchors.float(), teacher_preds=same, teacher_anchors=anchors.float())
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(x.grad).all() for x in student)


def test_output_terms_are_zero_without_their_inputs():
    preds = random_outputs(9)
    assert kd_term(preds=preds).item() == 0.0 and box_kd_term(preds=preds).item() == 0.0  # validation: no teacher
    assert imitation_term().item() == 0.0


def test_output_terms_send_gradients_to_the_student_only():
    student = [p.float().requires_grad_() for p in random_outputs(10)]
    teacher = [p.float().requires_grad_() for p in random_outputs(11)]
    anchors = torch.ones(2, 2, 2)
    loss = kd_term(preds=student, teacher_preds=teacher, top_share=1.0) + box_kd_term(
        preds=student, anchors=anchors, teacher_preds=teacher, teacher_anchors=anchors, min_obj=0.0, top_share=1.0
    )
    loss.backward()
    assert all(t.grad is None for t in teacher)
    for s in student:  # every output of every level: x, y, w, h (box), objectness and classes (kd)
        assert (s.grad.abs().sum((0, 1, 2, 3)) > 0).all()


# --- the Distiller with output terms -----------------------------------------------------------------------------


def fixed_batch():
    imgs = torch.rand(2, 3, 128, 96, generator=torch.Generator().manual_seed(0))  # non-square
    targets = torch.tensor(
        [[0, 1, 0.30, 0.40, 0.20, 0.30], [0, 2, 0.70, 0.25, 0.10, 0.10], [1, 0, 0.55, 0.60, 0.25, 0.35]]
    )
    return imgs, targets


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_distiller_with_output_terms_reaches_the_head_not_the_teacher(teacher_pt, precision):
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    distiller = Distiller(student, teacher_pt, "cpu", weights={"kd": 1.0, "box_kd": 0.05}, precision=precision)
    assert distiller.outputs and distiller.loss_weights == {"imitation": 0.01, "kd": 1.0, "box_kd": 0.05}
    for p in distiller.teacher.parameters():
        p.requires_grad_(True)  # even a teacher whose parameters could take gradients gets none
    compute_loss = ComputeLoss(student, yaml_load(HYP), terms=distiller.loss_terms)
    assert compute_loss.names == ("box", "obj", "cls", "imitation", "kd", "box_kd")
    imgs, targets = fixed_batch()
    preds, inputs = distiller(student, imgs, targets)
    assert [tuple(t.shape) for t in inputs["teacher_preds"]] == [tuple(p.shape) for p in preds]
    loss, items = compute_loss(preds, targets, **inputs)
    assert items["kd"] > 0 and items["box_kd"] >= 0
    # the terms read the teacher's own head outputs: its plain eval forward returns them raw beside the decoded ones
    teacher_preds = distiller.teacher(imgs.to(next(distiller.teacher.parameters()).dtype))[1]
    for t, mine in zip(teacher_preds, inputs["teacher_preds"]):
        torch.testing.assert_close(t, mine)
    want = kd_term(preds=preds, teacher_preds=teacher_preds, balance=compute_loss.balance)
    assert items["kd"].item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    for conv in student.model[-1].m:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_output_terms_alone_skip_imitation_and_fgfi_alone_skips_the_teacher_head(teacher_pt, monkeypatch):
    import distill.distiller as dd
    from distill.teacher import teacher_outputs

    calls = []

    def recording(*args, **kwargs):
        calls.append("outputs")
        return teacher_outputs(*args, **kwargs)

    monkeypatch.setattr(dd, "teacher_outputs", recording)

    student = DetectionModel("yolov5n.yaml", nc=8).train()
    imgs, targets = fixed_batch()
    kd_only = Distiller(student, teacher_pt, "cpu", imitation_weight=0.0, weights={"kd": 1.0})
    assert kd_only.loss_weights == {"kd": 1.0} and kd_only.param_groups(5e-4) == [] and not kd_only.parameters()
    _, inputs = kd_only(student, imgs, targets)
    assert calls == ["outputs"] and "mask" not in inputs and "teacher_preds" in inputs
    fgfi = Distiller(student, teacher_pt, "cpu")
    _, inputs = fgfi(student, imgs, targets)
    assert calls == ["outputs"] and "teacher_preds" not in inputs  # FGFI alone: the teacher stops at layer 16


def test_output_terms_at_weight_zero_give_todays_fgfi_losses(teacher_pt):
    """kd and box_kd at 0 (the default) leave the FGFI step as it was: the same loss items, and those equal
    YOLOv5's loss plus 0.01 * the imitation loss computed by hand on the same batch."""
    imgs, targets = fixed_batch()
    items = []
    for weights in (None, {"kd": 0.0, "box_kd": 0.0}):
        torch.manual_seed(0)
        student = DetectionModel("yolov5n.yaml", nc=8).train()
        distiller = Distiller(student, teacher_pt, "cpu", weights=weights, sparse_max_share=0.0, precision="fp32")
        assert not distiller.outputs and distiller.loss_weights == {"imitation": 0.01}
        compute_loss = ComputeLoss(student, yaml_load(HYP), terms=distiller.loss_terms)
        preds, inputs = distiller(student, imgs, targets)
        items.append(compute_loss(preds, targets, **inputs)[1])
        # by hand: the plain YOLOv5 loss and the paper's imitation term
        plain = ComputeLoss(student, yaml_load(HYP))(preds, targets)[1]
        feature = student.extract_features(imgs, distiller.student_layers)[0]
        teacher = distiller.teacher.extract_features(imgs, distiller.teacher_layers)[0]
        mask = student(imgs, target=targets)[2]
        imitation = 0.01 * imitation_loss(distiller.adapters(feature), teacher, mask)
        for k in ("box", "obj", "cls"):
            assert items[-1][k].item() == plain[k].item()
        assert items[-1]["imitation"].item() == pytest.approx(imitation.item(), rel=1e-5)
    assert list(items[0]) == list(items[1]) == ["box", "obj", "cls", "imitation"]
    for k in items[0]:
        assert items[0][k].item() == items[1][k].item(), k


def test_head_checks_one_line_each(teacher_pt, tmp_path):
    from tests.conftest import save_random_model

    student = DetectionModel("yolov5n.yaml", nc=8)
    other_nc = save_random_model("yolov5s", tmp_path / "nc5.pt", nc=5)
    with pytest.raises(UserError, match=r"teacher has classes 5 and the student 8"):
        Distiller(student, other_nc, "cpu", weights={"kd": 1.0})
    Distiller(student, other_nc, "cpu")  # FGFI alone: another class count is fine
    teacher = Distiller(student, teacher_pt, "cpu").teacher
    moved = DetectionModel("yolov5n.yaml", nc=8)
    moved.model[-1].anchors *= 1.5  # as AutoAnchor would
    with pytest.raises(UserError, match=r"anchors \(pixels\) .* differ from the student's") as e:
        check_heads(teacher, moved, "t.pt", same_anchors=True)
    assert "\n" not in str(e.value)
    check_heads(teacher, moved, "t.pt", same_anchors=False)  # boxes alone are compared as decoded boxes
    # a student from scratch takes the teacher's anchors for --kd-weight; a pretrained one with others is refused
    distiller = Distiller(student, teacher_pt, "cpu", weights={"kd": 1.0})
    with pytest.raises(UserError, match="differ from the student's"):
        distiller.check_student(moved)
    distiller.check_student(moved, adopt_anchors=True)
    assert torch.equal(moved.model[-1].anchors, teacher.model[-1].anchors.float())
    p6 = save_random_model("yolov5s6", tmp_path / "p6.pt")
    with pytest.raises(UserError, match=r"detection levels 4 and the student 3"):
        Distiller(student, p6, "cpu", weights={"box_kd": 0.05})


# --- several imitated layers ---------------------------------------------------------------------------------------


def test_level_weights_formulas():
    channels = [128, 256, 512]
    assert level_weights(channels, "sum") == [1.0, 1.0, 1.0]
    assert level_weights(channels, "mean") == pytest.approx([1 / 3] * 3)
    inv = [1 / 128, 1 / 256, 1 / 512]
    assert level_weights(channels, "channel") == pytest.approx([x / sum(inv) for x in inv])
    for reduction in ("sum", "mean", "channel"):  # one layer: the paper's loss, unchanged
        assert level_weights([256], reduction) == [1.0]


@pytest.mark.parametrize("reduction", ["sum", "mean", "channel"])
def test_multi_level_imitation_equals_its_formula(teacher_pt, reduction):
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    distiller = Distiller(student, teacher_pt, "cpu", "detect", imitation_reduce=reduction, sparse_max_share=0.0)
    imgs, targets = fixed_batch()
    _, inputs = distiller(student, imgs, targets)
    per_level = [
        imitation_loss(s, t, m).item() for s, t, m in zip(inputs["student"], inputs["teacher"], inputs["mask"])
    ]
    channels = [t.shape[1] for t in inputs["teacher"]]
    assert channels == [128, 256, 512]
    if reduction == "sum":
        want = sum(per_level)
    elif reduction == "mean":
        want = sum(per_level) / 3
    else:
        want = sum(v / c for v, c in zip(per_level, channels)) / sum(1 / c for c in channels)
    assert imitation_term(**inputs).item() == pytest.approx(want, rel=1e-5)


def test_imitation_boxes_auto_is_matched_with_several_layers_and_all_with_one(teacher_pt):
    """--imitation-boxes auto (the default): the masks of 'matched' when several layers are imitated, the paper's
    all-box masks for a single layer, shown on layers where the two choices give different masks."""
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    imgs, targets = fixed_batch()

    def masks(layers, boxes):
        distiller = Distiller(student, teacher_pt, "cpu", layers, imitation_boxes=boxes, sparse_max_share=0.0)
        return [m.clone() for m in distiller(student, imgs, targets)[1]["mask"]]

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    neck = {boxes: masks("neck", boxes) for boxes in BOXES}
    assert len(neck["auto"]) == 3 and same(neck["auto"], neck["matched"]) and not same(neck["all"], neck["matched"])
    p5 = {boxes: masks([22], boxes) for boxes in BOXES}  # stride 32: these boxes are too small for its anchors
    assert same(p5["auto"], p5["all"]) and not same(p5["all"], p5["matched"]) and p5["all"][0].sum() > 0
    with pytest.raises(UserError, match="--imitation-boxes 'some'"):
        Distiller(student, teacher_pt, "cpu", imitation_boxes="some")


# --- the table ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_new_term_is_one_table_entry(tmp_path, tiny_data, teacher_pt, monkeypatch):
    """A dummy term with a setting of its own, added to TERMS alone: its weight flag and hyp default, its setting's
    flag, hyp key and range, its loss-dict key and results.csv column, the setting passed to its loss, saved in the
    checkpoint and restored by --resume; train.py, distill/options.py, utils/ and the progress bar untouched."""
    from distill.terms import Setting

    def dummy(preds=None, scale=1.0, **_):
        return torch.zeros((), device=preds[0].device) + 0.25 * scale

    setting = Setting("dummy_scale", "scale", 2.0, 0.0, 10.0, "the dummy's scale")
    monkeypatch.setitem(TERMS, "dummy", Term("dummy", dummy, 0.5, False, "dummy", "a test term", settings=(setting,)))
    opt = train.parse_opt(True, args=["--dummy-weight", "2", "--dummy-scale", "3"])
    assert (opt.dummy_weight, opt.dummy_scale) == (2.0, 3.0)
    hyp = yaml_load(HYP) | {"dummy_scale": 4.0}
    (tmp_path / "hyp.yaml").write_text(yaml.safe_dump(hyp))
    with pytest.raises(UserError, match=r"--dummy-scale 11.0: must be in \[0, 10\]"):
        train.run(data=str(tiny_data), cfg="yolov5n.yaml", ft_weights=str(teacher_pt), dummy_scale=11.0)
    common = dict(
        data=str(tiny_data),
        cfg="yolov5n.yaml",
        imgsz=64,
        batch_size=8,
        device="cpu",
        workers=0,
        noplots=True,
        project=str(tmp_path),
        hyp=str(tmp_path / "hyp.yaml"),
        distill_gate=False,
    )  # fmt: skip  (the term's logged value at its weight, not scaled by the gate)
    _interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(_Interrupt):
        train.run(ft_weights=str(teacher_pt), epochs=2, name="dummy", **common)
    df = pd.read_csv(tmp_path / "dummy/results.csv", skipinitialspace=True)
    df.columns = [c.strip() for c in df.columns]
    assert df["train/dummy_loss"].tolist() == pytest.approx([0.5 * 0.25 * 4.0])  # table weight, the hyp file's scale
    assert "val/dummy_loss" not in df.columns and "val/imitation_loss" not in df.columns
    assert yaml_load(tmp_path / "dummy/opt.yaml")["dummy_scale"] == 4.0
    state = load_checkpoint(tmp_path / "dummy/weights/last.pt")["distill"]
    assert (state["dummy_weight"], state["dummy_scale"]) == (0.5, 4.0)
    seen = []
    real = Distiller.__init__

    def recording(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.term_settings["dummy_scale"])

    monkeypatch.setattr(Distiller, "__init__", recording)
    monkeypatch.setattr(train.validate, "run", val.run)
    train.run(resume=str(tmp_path / "dummy/weights/last.pt"))
    assert seen == [4.0]  # from the checkpoint, not the table's default
    df = pd.read_csv(tmp_path / "dummy/results.csv", skipinitialspace=True)
    assert len(df) == 2


def test_a_term_with_a_misspelt_input_fails_loudly(teacher_pt, monkeypatch):
    def misspelt(preds=None, teacher_pred=None, **_):  # 'teacher_pred': the Distiller provides 'teacher_preds'
        return torch.zeros(())

    monkeypatch.setitem(
        TERMS, "typo", Term("typo", misspelt, 1.0, True, "typo", "a term", inputs=("preds", "teacher_pred"))
    )
    student = DetectionModel("yolov5n.yaml", nc=8)
    with pytest.raises(ValueError, match=r"'typo' reads \['teacher_pred'\], which are not provided"):
        Distiller(student, teacher_pt, "cpu", weights={"typo": 1.0})
    # an output term that forgot outputs=True asks for the teacher's head without getting it: the same error
    monkeypatch.setitem(TERMS, "typo", Term("typo", misspelt, 1.0, False, "typo", "a term", inputs=("teacher_preds",)))
    with pytest.raises(ValueError, match="set outputs=True"):
        Distiller(student, teacher_pt, "cpu", imitation_weight=0.0, weights={"typo": 1.0})


def test_output_flags_are_checked(tmp_path, tiny_data, teacher_pt):
    common = dict(data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, imgsz=64, project=str(tmp_path), device="cpu")
    for kwargs, message in (
        (dict(kd_weight=1.0), "--kd-weight: output distillation needs a teacher: add --ft_weights"),
        (dict(ft_weights=str(teacher_pt), kd_weight=float("inf")), "--kd-weight inf: must be a finite number >= 0"),
        (dict(ft_weights=str(teacher_pt), box_kd_weight=-1.0), "--box-kd-weight -1.0: must be a finite number >= 0"),
        (dict(ft_weights=str(teacher_pt), kd_temperature=0.0), r"--kd-temperature 0.0: must be in \[0.1, 20\]"),
        (dict(ft_weights=str(teacher_pt), kd_temperature=1e6), r"--kd-temperature 1000000.0: must be in \[0.1, 20\]"),
        (dict(ft_weights=str(teacher_pt), imitation_weight=float("nan")), "--imitation-weight nan: must be >= 0"),
        (dict(ft_weights=str(teacher_pt), imitation_weight=float("inf")), "--imitation-weight inf: must be >= 0"),
        (dict(ft_weights=str(teacher_pt), imitation_layers="17:"), "--imitation-layers '17:': use"),
        (dict(ft_weights=str(teacher_pt), imitation_layers=":"), "--imitation-layers ':': use"),
    ):
        with pytest.raises(UserError, match=message.replace("+", r"\+")):
            train.run(**common, **kwargs)
