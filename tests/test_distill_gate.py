"""--distill-gate: every distillation term scaled, batch by batch, by clamp(1 - L_teacher / L_student, 0, 1), from
YOLOv5's own loss of each model's outputs on the same labelled batch (computed here with a plain ComputeLoss)."""

from __future__ import annotations

import pytest
import torch

from distill import Distiller
from distill.terms import box_kd_term, kd_term
from models.yolo import DetectionModel
from tests.conftest import save_random_model
from tests.test_unlabeled import SHIPPED
from utils.general import yaml_load
from utils.loss import ComputeLoss

HYP = "data/hyps/hyp.scratch-low.yaml"
TARGETS = torch.tensor([[0, 1, 0.30, 0.40, 0.20, 0.30], [0, 2, 0.70, 0.25, 0.10, 0.10], [1, 0, 0.55, 0.60, 0.25, 0.35]])


def _setup(teacher, gate=True, **kwargs):
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    distiller = Distiller(student, teacher, "cpu", weights={"kd": 1.0, "box_kd": 0.05}, precision="fp32", gate=gate,
                          **kwargs)  # fmt: skip
    distiller.check_student(student, adopt_anchors=True)
    return student, distiller


def _detection(loss: ComputeLoss, preds, targets) -> float:
    _, items = loss([p.detach().float() for p in preds], targets)
    return float(items["box"] + items["obj"] + items["cls"])


def _real_batch(data):
    """Built-in images with their labels: the shipped (trained) teacher fits them better than a random student."""
    from utils.dataloaders import create_dataloader
    from utils.general import check_dataset

    imgs, targets = next(iter(create_dataloader(check_dataset(data)["val"], 128, 4, 32)[0]))[:2]
    return imgs.float() / 255, targets


def test_gate_is_how_much_better_the_teacher_fits_the_batch(tiny_data):
    student, distiller = _setup(SHIPPED, imitation_weight=0.0)
    hyp = yaml_load(HYP)
    gated = ComputeLoss(student, hyp, terms=distiller.loss_terms, gated=True)
    assert gated.names == ("box", "obj", "cls", "kd", "box_kd", "gate")
    imgs, targets = _real_batch(tiny_data)
    preds, inputs = distiller(student, imgs, targets)
    _, items = gated(preds, targets, **inputs)

    plain = ComputeLoss(student, hyp)  # the same anchors: the student took the teacher's
    l_student, l_teacher = _detection(plain, preds, targets), _detection(plain, inputs["teacher_preds"], targets)
    want = 1 - l_teacher / l_student
    assert 0 < want < 1
    assert items["gate"].item() == pytest.approx(want, rel=1e-5)
    kd = kd_term(preds=preds, teacher_preds=inputs["teacher_preds"], balance=plain.balance)
    box_kd = box_kd_term(preds=preds, anchors=plain.anchors, **inputs)
    assert items["kd"].item() == pytest.approx(want * kd.item(), rel=1e-5, abs=1e-9)
    assert items["box_kd"].item() == pytest.approx(want * 0.05 * box_kd.item(), rel=1e-5, abs=1e-9)


def test_gate_is_zero_when_the_student_fits_as_well_as_the_teacher(teacher_pt):
    """A student whose outputs are the teacher's: nothing to learn from it, every term 0 (and no NaN)."""
    student, distiller = _setup(teacher_pt)
    gated = ComputeLoss(student, yaml_load(HYP), terms=distiller.loss_terms, gated=True)
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    preds, inputs = distiller(student, imgs, TARGETS)
    same = [t.detach().float().clone().requires_grad_(True) for t in inputs["teacher_preds"]]
    loss, items = gated(same, TARGETS, **{**inputs, "teacher_preds": inputs["teacher_preds"]})
    assert items["gate"].item() == 0.0
    assert all(items[k].item() == 0.0 for k in ("imitation", "kd", "box_kd"))
    assert torch.isfinite(loss)


def test_unlabelled_terms_take_the_same_steps_gate(tiny_data):
    student, distiller = _setup(SHIPPED, imitation_weight=0.0)
    hyp = yaml_load(HYP)
    kwargs = dict(terms=distiller.loss_terms, unlabeled=distiller.unlabeled_terms)
    gated, ungated = ComputeLoss(student, hyp, gated=True, **kwargs), ComputeLoss(student, hyp, **kwargs)
    imgs, targets = _real_batch(tiny_data)
    preds, inputs = distiller(student, imgs, targets)
    gate = gated(preds, targets, **inputs)[1]["gate"]
    assert 0 < gate < 1
    preds_u, inputs_u = distiller(student, imgs.flip(-1), None)
    _, items = gated.unlabeled_loss(preds_u, **inputs_u)
    _, plain = ungated.unlabeled_loss(preds_u, **inputs_u)
    assert items["gate"] == 0  # counted once, with the labelled items
    for k in ("kd_u", "box_kd_u"):
        assert items[k].item() == pytest.approx(gate.item() * plain[k].item(), rel=1e-6, abs=1e-12)


def test_gate_needs_a_teacher_with_the_students_head(tmp_path, log_lines):
    """A teacher of other classes has no detection loss on the student's labels: the gate is off, with one line; a
    gated FGFI-alone run gets the teacher's head outputs it needs."""
    other = save_random_model("yolov5s", tmp_path / "nc3.pt", nc=3)
    _, distiller = _setup(other, imitation_weight=0.01, explicit=[])  # the output terms dropped as defaults
    assert not distiller.gate and any("--distill-gate off" in line for line in log_lines)
    assert "distill_gate" in distiller.settings and distiller.settings["distill_gate"] is False
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    fgfi = Distiller(student, save_random_model("yolov5s", tmp_path / "nc8.pt"), "cpu", gate=True, precision="fp32")
    assert fgfi.gate and not fgfi.outputs
    _, inputs = fgfi(student, torch.rand(2, 3, 64, 64), TARGETS)
    assert "teacher_preds" in inputs and "mask" in inputs


def test_gate_is_train_defaults_wherever_the_teacher_has_the_students_head(tmp_path, log_lines):
    """train.py's default (None): on beside a teacher with the student's head; beside one of other classes off,
    silently (nobody asked for it), while FGFI goes on; named off, it stays off."""
    import train

    assert train.parse_opt(True, args=[]).distill_gate is None
    same = save_random_model("yolov5s", tmp_path / "nc8.pt")
    assert _setup(same, gate=None)[1].gate is True
    assert _setup(same, gate=False)[1].gate is False
    other = save_random_model("yolov5s", tmp_path / "nc3.pt", nc=3)
    before = len(log_lines)
    _, distiller = _setup(other, gate=None, imitation_weight=0.01, explicit=[])
    assert distiller.gate is False and distiller.imitate
    assert not any("--distill-gate" in line for line in log_lines[before:])


def test_gate_survives_resume_options(teacher_pt):
    _, distiller = _setup(teacher_pt)
    assert Distiller.options_from_state(distiller.state_dict())["distill_gate"] is True
    assert (
        Distiller.options_from_state({k: v for k, v in distiller.state_dict().items() if k != "distill_gate"})[
            "distill_gate"
        ]
        is False
    )  # a checkpoint from before the option trained without it
