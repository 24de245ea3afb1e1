"""--distill-decouple: the detection loss's gradient stepped by the run's Adam/AdamW as for the student alone, the terms'
by their own Adam moments, divided by sqrt(max(v_detection, v_terms)) (distill/optim.py).

Losses linear in the parameters give constant gradients, so the expected steps can be written out in float64 by hand."""

from __future__ import annotations

import pytest
import torch

from distill import Distiller
from distill.optim import DEFAULT_CAP, DecoupledStep, decouple_refusal
from distill.options import decoupled_step, distill_state
from models.yolo import DetectionModel
from utils.general import yaml_load
from utils.loss import ComputeLoss

G_DET = torch.tensor([0.5, -2.0, 1e-3, 0.0], dtype=torch.float64)  # the detection loss's gradient, per parameter
G_TERMS = torch.tensor([-0.25, 1.0, 4.0, 3.0], dtype=torch.float64)  # the terms': larger than G_DET on the last two
LR, BETAS, EPS, DECAY = 0.01, (0.9, 0.999), 1e-8, 0.05


def _groups(p: torch.nn.Parameter) -> torch.optim.AdamW:
    """smart_optimizer's layout: the student's three groups (here the parameter in the decayed one), then an adapter's."""
    adapter = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    groups = [{"params": []}, {"params": [p], "weight_decay": DECAY}, {"params": []}, {"params": [adapter]}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0), adapter


def _reference(steps: int) -> torch.Tensor:
    """The parameter after `steps` steps, in float64 by hand: AdamW on G_DET, then Adam on G_TERMS whose denominator
    is the larger of the two bias-corrected second moments."""
    b1, b2 = BETAS
    p = torch.zeros(4, dtype=torch.float64)
    m_d = v_d = m_t = v_t = torch.zeros(4, dtype=torch.float64)
    for t in range(1, steps + 1):
        p = p * (1 - LR * DECAY)
        m_d, v_d = b1 * m_d + (1 - b1) * G_DET, b2 * v_d + (1 - b2) * G_DET**2
        p = p - LR * (m_d / (1 - b1**t)) / ((v_d / (1 - b2**t)).sqrt() + EPS)
        m_t, v_t = b1 * m_t + (1 - b1) * G_TERMS, b2 * v_t + (1 - b2) * G_TERMS**2
        v = torch.maximum(v_t / (1 - b2**t), v_d / (1 - b2**t))
        p = p - LR * (m_t / (1 - b1**t)) / (v.sqrt() + EPS)
    return p


def _train(steps: int, accumulate: int = 1):
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    optimizer, adapter = _groups(p)
    decoupled, scaler = DecoupledStep(optimizer), torch.amp.GradScaler("cuda", enabled=False)
    for _ in range(steps):
        for _ in range(accumulate):  # gradients summed over the batches of one step, each buffer on its own
            shared = (p * G_DET).sum() / accumulate
            terms = (p * G_TERMS).sum() / accumulate + (adapter * 2.0).sum()
            decoupled.backward(scaler, shared, terms)
        scaler.step(optimizer)
        decoupled.step(scaler)
        scaler.update()
        optimizer.zero_grad()
    return p, optimizer, decoupled, adapter


@pytest.mark.parametrize("accumulate", [1, 3])
def test_steps_equal_a_float64_reference(accumulate):
    p, *_ = _train(5, accumulate)
    torch.testing.assert_close(p.detach(), _reference(5), rtol=1e-12, atol=1e-15)


def test_the_runs_optimizer_sees_only_the_detection_gradient():
    """Its moments are those of AdamW fed G_DET alone (the student's own step); the adapter, which only the terms
    reach, is stepped by the run's optimizer with its gradient, as without --distill-decouple."""
    p, optimizer, decoupled, adapter = _train(3)
    alone = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    ref = torch.optim.AdamW([alone], lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY)
    for _ in range(3):
        alone.grad = G_DET.clone()
        ref.step()
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(optimizer.state[p][k], ref.state[alone][k], rtol=0, atol=0)
    torch.testing.assert_close(
        optimizer.state[adapter]["exp_avg"] / (1 - BETAS[0] ** 3), torch.full((2,), 2.0).double()
    )
    assert decoupled.optimizer.state[p]["step"] == 3
    assert all(g is None for g in decoupled.grads)  # emptied by every step


def test_terms_step_never_exceeds_the_terms_own_adam_step():
    """Where the detection gradient is the larger, the terms' step is smaller than their own Adam step would be;
    where it is the smaller (or 0: a parameter only the terms reach through the student), exactly that step."""
    p, *_ = _train(1)
    first_step = lambda g: -LR * g / (g.abs() + EPS)  # noqa: E731  Adam's first step (each moment is g itself)
    terms_step = p.detach() - first_step(G_DET)  # (the decay of 0 is 0)
    own = first_step(G_TERMS)
    assert terms_step[0].abs() < own[0].abs() and terms_step[1].abs() < own[1].abs()  # |G_DET| > |G_TERMS|
    torch.testing.assert_close(terms_step[2:], own[2:], rtol=1e-12, atol=0)


def test_refusals():
    p = torch.nn.Parameter(torch.zeros(2))
    assert "SGD" in decouple_refusal(torch.optim.SGD([p], lr=0.1), ddp=False)
    assert "RMSprop" in decouple_refusal(torch.optim.RMSprop([p], lr=0.1), ddp=False)
    assert "DDP" in decouple_refusal(torch.optim.AdamW([p]), ddp=True)
    assert decouple_refusal(torch.optim.Adam([p]), ddp=False) is None


def test_split_is_the_loss_in_two_parts(teacher_pt):
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    distiller = Distiller(student, teacher_pt, "cpu", weights={"kd": 1.0, "box_kd": 0.05}, precision="fp32")
    distiller.check_student(student, adopt_anchors=True)
    loss_fn = ComputeLoss(student, yaml_load("data/hyps/hyp.scratch-low.yaml"), terms=distiller.loss_terms,
                          balanced=distiller.balanced_terms)  # fmt: skip
    imgs = torch.rand(2, 3, 64, 96)
    targets = torch.tensor([[0, 1, 0.3, 0.4, 0.2, 0.3], [1, 2, 0.6, 0.5, 0.3, 0.2]])
    preds, inputs = distiller(student, imgs, targets)
    loss, items = loss_fn(preds, targets, **inputs)
    detection, terms, split_items = loss_fn.split(preds, targets, **inputs)
    assert items.keys() == split_items.keys()
    assert all(torch.equal(items[k], split_items[k]) for k in items)
    torch.testing.assert_close(detection, (items["box"] + items["obj"] + items["cls"]) * 2)
    torch.testing.assert_close(detection + terms, loss)
    assert terms > 0


def test_train_builds_it_only_where_it_runs(teacher_pt, log_lines):
    """On from the option under Adam/AdamW, its state in the checkpoint's 'distill' entry and restored from it; off
    with one line under SGD and DDP."""
    student = DetectionModel("yolov5n.yaml", nc=8)
    distiller = Distiller(student, teacher_pt, "cpu", weights={"kd": 1.0}, precision="fp32", decouple=True)
    assert distiller.settings["distill_decouple"] is True
    assert Distiller.options_from_state(distiller.state_dict())["distill_decouple"] is True
    assert Distiller.options_from_state({"teacher": "t.pt", "adapters": {}})["distill_decouple"] is False  # older runs
    adam = torch.optim.AdamW(student.parameters())
    decoupled = decoupled_step(distiller, adam, ddp=False)
    assert isinstance(decoupled, DecoupledStep)
    decoupled.optimizer.state[decoupled.params[0]] = {"step": 7, "exp_avg": torch.ones(1), "exp_avg_sq": torch.ones(1)}
    state = distill_state(distiller, decoupled)
    resumed = decoupled_step(distiller, adam, ddp=False, ckpt={"distill": state})
    assert resumed.optimizer.state[resumed.params[0]]["step"] == 7
    assert distill_state(distiller, None)["decoupled"] is None
    # the cap as it stepped (the default resolved) is what --resume trains with; runs from before it: uncapped
    assert Distiller.options_from_state(state)["distill_cap"] == DEFAULT_CAP
    assert Distiller.options_from_state(distill_state(distiller, DecoupledStep(adam, cap=2.5)))["distill_cap"] == 2.5
    assert Distiller.options_from_state(distill_state(distiller, None))["distill_cap"] == 0.0
    assert Distiller.options_from_state({"teacher": "t.pt", "adapters": {}})["distill_cap"] == 0.0
    assert decoupled_step(distiller, torch.optim.SGD(student.parameters(), lr=0.1), ddp=False) is None
    assert decoupled_step(distiller, adam, ddp=True) is None
    assert sum("--distill-decouple off" in line for line in log_lines) == 2  # asked for: a line each
    distiller.decouple = None  # the default: wherever it can run, silently off elsewhere
    assert isinstance(decoupled_step(distiller, adam, ddp=False), DecoupledStep)
    assert decoupled_step(distiller, torch.optim.SGD(student.parameters(), lr=0.1), ddp=False) is None
    assert sum("--distill-decouple off" in line for line in log_lines) == 2
    distiller.decouple = False
    assert decoupled_step(distiller, adam, ddp=False) is None
    # --distill-cap caps the decoupled step: with it, or one line where the decoupled step is off
    distiller.decouple = None
    assert decoupled_step(distiller, adam, ddp=False).cap == DEFAULT_CAP == 1.0  # the default: the gate's share
    assert decoupled_step(distiller, adam, ddp=False, cap=2.5).cap == 2.5
    assert decoupled_step(distiller, adam, ddp=False, cap=0.0).cap == 0.0  # no cap
    sgd = torch.optim.SGD(student.parameters(), lr=0.1)
    assert decoupled_step(distiller, sgd, ddp=False) is None  # the default cap: silently off with the decoupled step
    assert decoupled_step(distiller, sgd, ddp=False, cap=0.0) is None
    assert sum("--distill-cap off" in line for line in log_lines) == 0
    assert decoupled_step(distiller, sgd, ddp=False, cap=1.0) is None  # asked for by name: one line
    assert sum("--distill-cap off" in line for line in log_lines) == 1


def _capped_reference(steps: int, share: float) -> torch.Tensor:
    """_reference with --distill-cap: the terms' step of the (one) tensor scaled down to at most share times the norm
    of the detection loss's step of it (decay included: the parameter's change over the run's step)."""
    b1, b2 = BETAS
    p = torch.zeros(4, dtype=torch.float64)
    m_d = v_d = m_t = v_t = torch.zeros(4, dtype=torch.float64)
    for t in range(1, steps + 1):
        before = p
        p = p * (1 - LR * DECAY)
        m_d, v_d = b1 * m_d + (1 - b1) * G_DET, b2 * v_d + (1 - b2) * G_DET**2
        p = p - LR * (m_d / (1 - b1**t)) / ((v_d / (1 - b2**t)).sqrt() + EPS)
        m_t, v_t = b1 * m_t + (1 - b1) * G_TERMS, b2 * v_t + (1 - b2) * G_TERMS**2
        v = torch.maximum(v_t / (1 - b2**t), v_d / (1 - b2**t))
        update = -LR * (m_t / (1 - b1**t)) / (v.sqrt() + EPS)
        limit = share * (p - before).norm()
        p = p + update * min(1.0, float(limit / update.norm()))
    return p


@pytest.mark.parametrize("cap, share", [(1.0, 0.0), (1.0, 0.3), (1.0, 1.0), (1.0, 100.0), (2.0, 0.15), (0.5, 0.6)])
def test_cap_holds_the_terms_step_to_the_gates_share_of_the_detection_step(cap, share):
    """cap x share: --distill-cap K with the gate's share; K = 2 at share 0.15 steps as K = 1 at 0.3."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    optimizer, adapter = _groups(p)
    decoupled, scaler = DecoupledStep(optimizer, cap=cap), torch.amp.GradScaler("cuda", enabled=False)
    for _ in range(4):
        decoupled.backward(scaler, (p * G_DET).sum(), (p * G_TERMS).sum() + (adapter * 2.0).sum())
        before = p.detach().clone()
        scaler.step(optimizer)
        detection_step = (p.detach() - before).norm()
        after_main = p.detach().clone()
        decoupled.step(scaler, share=torch.tensor(share, dtype=torch.float64))
        assert (p.detach() - after_main).norm() <= cap * share * detection_step * (1 + 1e-12)
        scaler.update()
        optimizer.zero_grad()
    torch.testing.assert_close(p.detach(), _capped_reference(4, cap * share), rtol=1e-12, atol=1e-15)
    if cap * share == 100.0:  # a cap never reached: the uncapped step
        torch.testing.assert_close(p.detach(), _reference(4), rtol=1e-12, atol=1e-15)
    assert decoupled.before is None  # the snapshot lives one step


def test_cap_option_reads_every_run_as_it_trained():
    """--distill-cap K: not given, the default (None, DEFAULT_CAP where the decoupled step runs); a run saved before
    the flag trained uncapped (0); one saved when it was a switch, True/False as 1/0; a negative K is one line."""
    import train
    from distill.options import check_distill_options
    from utils.general import UserError

    def checked(**changes):
        opt = train.parse_opt(args=["--ft_weights", "teacher.pt"])
        for k, v in changes.items():
            setattr(opt, k, v)
        if changes.get("distill_cap") == "absent":
            del opt.distill_cap
        check_distill_options(opt)
        return opt.distill_cap

    assert checked() is None
    assert train.parse_opt(args=["--ft_weights", "t.pt", "--distill-cap", "2"]).distill_cap == 2.0
    assert [checked(distill_cap=v) for v in ("absent", True, False, 0.5)] == [0.0, 1.0, 0.0, 0.5]
    with pytest.raises(UserError, match=r"^--distill-cap -1.0: must be in \[0, inf\)"):
        checked(distill_cap=-1.0)
