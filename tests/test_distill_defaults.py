"""The default recipe: what --ft_weights alone switches on, the fallback for a teacher whose head differs, the adapter
warm-up, and the student's gradient clip kept separate from the adapters'."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

import train
from distill import Distiller
from distill.terms import TERMS, term_weights
from models.yolo import DetectionModel
from tests.conftest import save_random_model
from utils.general import ROOT, UserError, yaml_load
from utils.torch_utils import clip_gradients

HYP = ROOT / "data/hyps/hyp.scratch-low.yaml"


def fixed_batch(n: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    imgs = torch.rand(n, 3, size, size)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [1, 3, 0.3, 0.6, 0.2, 0.5]])
    return imgs, targets


def default_weights() -> dict[str, float]:
    """The weights train.py gives the terms when no flag is set (the hyp file's): these may fall back where the
    teacher cannot serve them."""
    return term_weights({}, yaml_load(HYP))


def test_default_recipe_is_fgfi_plus_output_terms_in_every_hyp_file():
    """Measured (docs/results.md): the best recipe across the built-in data and BCCD fine-tuning."""
    for hyp in sorted((ROOT / "data/hyps").glob("*.yaml")):
        assert term_weights({}, yaml_load(hyp)) == {"imitation": 0.01, "kd": 1.0, "box_kd": 0.05}, hyp.name
    assert {name: term.default for name, term in TERMS.items()} == {"imitation": 0.01, "kd": 1.0, "box_kd": 0.05}


def test_matching_teacher_gets_every_default_term(teacher_pt, log_lines):
    student = DetectionModel("yolov5n.yaml", nc=8)
    distiller = Distiller(student, teacher_pt, "cpu", weights=default_weights(), explicit=[])
    assert distiller.loss_weights == {"imitation": 0.01, "kd": 1.0, "box_kd": 0.05}
    assert distiller.outputs and distiller.imitate and distiller.same_anchors
    assert any("terms imitation 0.01, kd 1, box_kd 0.05" in line for line in log_lines)


def test_teacher_with_another_head_falls_back_to_fgfi_with_one_line(tmp_path, log_lines):
    student = DetectionModel("yolov5n.yaml", nc=8)
    other_nc = save_random_model("yolov5s", tmp_path / "nc5.pt", nc=5)
    distiller = Distiller(student, other_nc, "cpu", weights=default_weights(), explicit=[])
    assert distiller.loss_weights == {"imitation": 0.01} and not distiller.outputs
    assert distiller.settings["kd_weight"] == distiller.settings["box_kd_weight"] == 0.0  # what --resume restores
    line = next(line for line in log_lines if "kd, box_kd off" in line)
    assert "classes 5 and the student 8" in line and "terms on: imitation 0.01" in line and "\n" not in line
    # asked for by flag: refused, as before
    with pytest.raises(UserError, match="teacher has classes 5 and the student 8"):
        Distiller(student, other_nc, "cpu", weights=default_weights(), explicit=["kd"])


def test_pretrained_student_with_other_anchors_keeps_box_kd_and_drops_kd(teacher_pt, log_lines):
    student = DetectionModel("yolov5n.yaml", nc=8)
    student.model[-1].anchors *= 1.5  # a pretrained student whose anchors differ from the teacher's (AutoAnchor)
    distiller = Distiller(student, teacher_pt, "cpu", weights=default_weights(), explicit=[])
    distiller.check_student(student)  # pretrained: keeps its own anchors
    assert distiller.loss_weights == {"imitation": 0.01, "box_kd": 0.05} and not distiller.same_anchors
    assert any("kd off (the pretrained student's anchors differ" in line for line in log_lines)
    explicit = Distiller(student, teacher_pt, "cpu", weights=default_weights(), explicit=["kd"])
    with pytest.raises(UserError, match="differ from the student's"):
        explicit.check_student(student)


def test_adapter_warmup_trains_the_adapters_alone(teacher_pt):
    imgs, targets = fixed_batch()
    grads = {}
    for adapters_only in (True, False):
        torch.manual_seed(0)
        student = DetectionModel("yolov5n.yaml", nc=8).train()
        distiller = Distiller(student, teacher_pt, "cpu", precision="fp32")  # FGFI alone
        _, inputs = distiller(student, imgs, targets, adapters_only=adapters_only)
        loss = TERMS["imitation"].loss(**inputs)
        loss.backward()
        student_grad = sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None)
        adapter_grad = sum(p.grad.abs().sum() for p in distiller.parameters())
        grads[adapters_only] = float(student_grad), float(adapter_grad), float(loss)
    assert grads[True][0] == 0.0 and grads[True][1] > 0  # warm-up: the adapters learn, the student is untouched
    assert grads[False][0] > 0
    assert grads[True][1] == pytest.approx(grads[False][1], rel=1e-5)  # the adapters' gradient is the same
    assert grads[True][2] == grads[False][2]  # and so is the loss


def test_clip_gradients_clips_each_group_on_its_own():
    student, adapter = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    for p in student.parameters():
        p.grad = torch.full_like(p, 0.1)  # norm 0.2 * sqrt(5): below the limit
    for p in adapter.parameters():
        p.grad = torch.full_like(p, 100.0)  # far above it
    before = [p.grad.clone() for p in student.parameters()]
    clip_gradients([student.parameters(), adapter.parameters()], max_norm=10.0)
    assert all(torch.equal(p.grad, b) for p, b in zip(student.parameters(), before))  # the student's step is intact
    norm = torch.cat([p.grad.flatten() for p in adapter.parameters()]).norm()
    assert norm.item() == pytest.approx(10.0, rel=1e-5)


@pytest.mark.slow
def test_train_py_names_the_terms_at_start_and_resume_keeps_the_warmup(tmp_path, tiny_data, teacher_pt, log_lines):
    """--ft_weights with the output terms on in the hyp file: one line naming every term and its weight; the warm-up
    (hyp warmup_epochs) is saved in opt.yaml and in the checkpoint, and each term logs its own column."""
    hyp = tmp_path / "hyp.kd.yaml"
    hyp.write_text(yaml.safe_dump({**yaml_load(HYP), "kd": 1.0, "box_kd": 0.05}))
    train.run(
        data=str(tiny_data), cfg="yolov5n.yaml", ft_weights=str(teacher_pt), epochs=1, imgsz=64, batch_size=8,
        device="cpu", workers=0, noplots=True, noautoanchor=True, project=str(tmp_path), name="d", exist_ok=True,
        hyp=str(hyp),
    )  # fmt: skip
    assert any("terms imitation 0.01, kd 1, box_kd 0.05" in line for line in log_lines)
    assert any("adapters warm up alone for 3 epochs" in line for line in log_lines)  # scratch-low: 3 warmup epochs
    opt = yaml_load(tmp_path / "d/opt.yaml")
    assert (opt["kd_weight"], opt["box_kd_weight"], opt["adapter_warmup"]) == (1.0, 0.05, 3.0)
    df = pd.read_csv(tmp_path / "d/results.csv", skipinitialspace=True)
    assert {"train/imitation_loss", "train/kd_loss", "train/box_kd_loss"} <= {c.strip() for c in df.columns}


def test_old_checkpoints_resume_without_the_new_defaults():
    """A run saved before output terms were on by default, or before the warm-up, resumes as it trained."""
    old = {"teacher": "t.pt", "imitation_weight": 0.01, "iou_factor": 0.5, "imitation_region": "fgfi"}
    opts = Distiller.options_from_state(old)
    assert (opts["kd_weight"], opts["box_kd_weight"], opts["adapter_warmup"]) == (0.0, 0.0, 0.0)
    assert opts["imitation_weight"] == 0.01


def test_resume_resolves_auto_precision_again_and_says_so(teacher_pt, log_lines):
    """A run that chose bf16 with 'auto' on a CPU with AMX resumed in bf16 anywhere (emulated, slow): 'auto' is
    resolved again for the resuming machine, with one line when that changes the precision."""
    from distill.distiller import resolve_cpu_bf16
    from distill.options import build_distiller, resolve_distill_options

    here = "bf16" if resolve_cpu_bf16("auto", "cpu") else "fp32"
    there = "fp32" if here == "bf16" else "bf16"
    student = DetectionModel("yolov5n.yaml", nc=8)
    state = Distiller(student, teacher_pt, "cpu", precision=there).state_dict()
    state["distill_precision_asked"] = "auto"  # the run asked for auto, and auto gave `there` on its machine
    opts = Distiller.options_from_state(state)
    assert opts["distill_precision"] == "auto"
    assert Distiller.options_from_state({**state, "distill_precision_asked": there})["distill_precision"] == there
    old = {k: v for k, v in state.items() if k != "distill_precision_asked"}  # before the key: as saved
    assert Distiller.options_from_state(old)["distill_precision"] == there
    opt = train.parse_opt(True, args=[])
    for k, v in {**opts, "ft_weights": str(teacher_pt)}.items():
        setattr(opt, k, v)
    hyp = yaml_load(HYP)
    explicit = resolve_distill_options(opt, hyp)
    distiller = build_distiller(opt, student, torch.device("cpu"), hyp, explicit, resume_state=state)
    assert distiller.precision == here
    assert any(f"trained its teacher and adapters in {there}" in line and "not bit-exact" in line for line in log_lines)


def head_grad_norm(loss, preds) -> float:
    grads = torch.autograd.grad(loss, preds, retain_graph=True, allow_unused=True)
    return float(torch.stack([g.pow(2).sum() for g in grads if g is not None]).sum().sqrt())


@pytest.mark.parametrize("kd_weight, scaled", [(100.0, True), (1e-6, False)])
def test_balance_holds_the_output_terms_gradient_to_the_detection_loss(teacher_pt, kd_weight, scaled):
    """--distill-balance (default): the output terms' joint gradient at the head outputs is at most the detection
    loss's; a term already below it is left as it is; FGFI (which does not reach the head outputs) is untouched."""
    from utils.loss import ComputeLoss

    imgs, targets = fixed_batch()
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    distiller = Distiller(student, teacher_pt, "cpu", weights={"kd": kd_weight, "box_kd": 0.05}, precision="fp32")
    assert distiller.balanced_terms == ["kd", "box_kd"]
    preds, inputs = distiller(student, imgs, targets)
    hyp = yaml_load(HYP)
    _, plain = ComputeLoss(student, hyp, terms=distiller.loss_terms)(preds, targets, **inputs)
    loss_fn = ComputeLoss(student, hyp, terms=distiller.loss_terms, balanced=distiller.balanced_terms)
    _, items = loss_fn(preds, targets, **inputs)
    # the two gradients at the head outputs, by hand: the factor is the ratio of their norms, capped at 1
    plain_fn = ComputeLoss(student, hyp)
    extra = dict(preds=preds, anchors=student.model[-1].anchors, balance=plain_fn.balance, **inputs)
    out = sum(w * fn(**extra) for name, (w, fn) in distiller.loss_terms.items() if name != "imitation")
    ratio = head_grad_norm(out, preds) / head_grad_norm(_graph_detection(plain_fn, preds, targets), preds)
    factor = float(items["kd"] / plain["kd"])
    if scaled:
        assert ratio > 1 and factor == pytest.approx(1 / ratio, rel=1e-4)
        assert float(items["box_kd"]) == pytest.approx(float(plain["box_kd"]) * factor, rel=1e-5, abs=1e-12)
    else:
        assert ratio < 1 and factor == 1.0
    assert items["imitation"] == plain["imitation"]


def _graph_detection(loss_fn, preds, targets):
    """box + obj + cls with their graph (ComputeLoss returns its items detached; the total is (sum) * B)."""
    total, _ = loss_fn(preds, targets)
    return total / preds[0].shape[0]
