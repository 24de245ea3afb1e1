"""The distillation terms, as one table: each a small loss function with its weight key and its log name.

ComputeLoss (utils/loss.py) adds weight * term.loss(**inputs) for every term a run switches on, beside YOLOv5's box,
objectness and class losses; train.py takes each term's flag (--{name}-weight), hyp-file key ({name}) and default
from the table; results.csv columns (train/{name}_loss) and progress-bar fields follow the loss dict's keys. A new
term is one entry in TERMS and touches nothing else.

The inputs every term receives (keyword arguments; a term reads what it needs and ignores the rest, **_):
    preds: the student's raw head outputs, per level [B, na, H, W, 5 + nc] (x, y, w, h, objectness, classes; logits)
    anchors: the student's anchors [nl, na, 2], in grid cells of each level
    balance: YOLOv5's objectness weight per level ([4.0, 1.0, 0.4] for P3-P5)
    student, teacher, mask: FGFI's adapted student features, teacher features and imitation masks, one per imitated
        layer (Distiller; see imitation_term), and level_weights, how the imitated layers' terms are combined
    teacher_preds, teacher_anchors: the teacher's raw head outputs and anchors, of the student's shapes (only when an
        output term is on: the teacher then runs its whole forward)
A term's own settings (kd's temperature) reach its loss as keywords (Term.settings, Setting.arg).
A term whose inputs are absent (validation: no teacher) is 0.

Output distillation follows Mehta & Ozturk (2018, "Object detection at 200 Frames Per Second"): the teacher's class and
box predictions count in proportion to its objectness, so the dense background teaches "no object" through
objectness alone and does not swamp the class and box terms; and LD (Zheng et al., CVPR 2022), which finds that
distilling the head's outputs adds to feature imitation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from distill.fast import use_fast_kernels
from distill.loss import imitation_loss
from utils.metrics import bbox_iou


@dataclass(frozen=True)
class Setting:
    """A setting of its own that a term's loss takes (a temperature, a ratio): flag --{name with '-'}, hyp-file key
    {name}, saved in the checkpoint and restored by --resume; the loss receives it as the keyword `arg`.

    default: its value when neither the flag nor the hyp file gives one; low, high: the range a value must lie in.
    """

    name: str
    arg: str
    default: float
    low: float
    high: float
    help: str


# The inputs a term may read: ComputeLoss's own (the student's head) and the Distiller's (distill/distiller.py)
LOSS_INPUTS = ("preds", "anchors", "balance")
FEATURE_INPUTS = ("student", "teacher", "mask", "level_weights")  # with feature imitation (adapters)
OUTPUT_INPUTS = ("teacher_preds", "teacher_anchors")  # with the teacher's whole forward (outputs=True)


@dataclass(frozen=True)
class Term:
    """One distillation term: everything the rest of the code needs to know about it.

    name: loss-dict key, hyp-file key of its weight, results.csv column train/{name}_loss, flag --{name}-weight
    loss: loss(**inputs, **settings) -> unweighted 0-dim float32 loss (inputs: see the module docstring)
    default: weight when neither the flag nor the hyp file gives one (0: off)
    outputs: reads the teacher's head outputs (its whole forward runs), not only its features
    label: progress-bar field ({label}_loss, at most 6 characters)
    help: the flag's help text
    inputs: the input keys loss reads; the Distiller checks each is provided (a misspelt one is an error, not a 0)
    settings: its own settings (Setting), each a flag, a hyp key and part of the checkpoint
    features: needs the imitated features (the Distiller then builds adapters)
    same_anchors: compares scores anchor by anchor, so needs the teacher's anchor sizes (a student from scratch
        takes them; with a pretrained student whose anchors differ the term is dropped or refused)
    """

    name: str
    loss: Callable[..., torch.Tensor]
    default: float
    outputs: bool
    label: str
    help: str
    inputs: tuple[str, ...] = ("preds",)
    settings: tuple[Setting, ...] = ()
    features: bool = False
    same_anchors: bool = False


def imitation_term(
    student=None, teacher=None, mask=None, level_weights: Sequence[float] | None = None, **_
) -> torch.Tensor:
    """FGFI: imitation_loss per imitated layer, combined as sum_l level_weights[l] * L_l (None: a plain sum).

    student, teacher: [B, C_t, h, w] maps (student through its adapter) or [N, C_t] at the N masked cells (the
    sparse path), or equal-length lists of them, one per imitated layer; mask: [B, 1, h, w] 0/1 or a list of them
    (None imitates every cell; not read for [N, C] inputs). See level_weights for the weights.
    """
    if student is None or teacher is None:
        return _zero(student, teacher)
    if isinstance(student, torch.Tensor):
        teacher, student, mask = [teacher], [student], [mask]
    elif mask is None:
        mask = [None] * len(student)
    if not len(teacher) == len(student) == len(mask):
        raise ValueError(f"imitation: {len(student)} student, {len(teacher)} teacher and {len(mask)} mask features")
    weights = [1.0] * len(student) if level_weights is None else list(level_weights)
    if len(weights) != len(student):
        raise ValueError(f"imitation: {len(weights)} level weights for {len(student)} imitated layers")
    total = torch.zeros((), device=student[0].device)
    for s, t, m, w in zip(student, teacher, mask, weights):
        total = total + w * imitation_loss(s, t, m)
    return total


REDUCTIONS = ("sum", "mean", "channel")
DEFAULT_REDUCTION = "mean"  # measured: README, "Several imitated layers"


def level_weights(channels: Sequence[int], reduction: str) -> list[float]:
    """Weights of the imitated layers' terms, from the teacher's channel counts C_l at those layers.

    sum: 1 each (the summed loss of earlier versions); mean: 1 / L; channel: (1 / C_l) / sum_k (1 / C_k), a mean in
    which each layer counts per channel (a layer's term grows with its channel count, so under 'sum' the widest layer
    dominates). Every reduction gives weight 1 to a single layer: the default FGFI term is the paper's, unchanged.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"level_weights: reduction {reduction!r} is not one of {REDUCTIONS}")
    if reduction == "sum":
        return [1.0] * len(channels)
    if reduction == "mean":
        return [1.0 / len(channels)] * len(channels)
    inverse = [1.0 / c for c in channels]
    return [x / sum(inverse) for x in inverse]


# The share of each level's anchors the class part of kd and box_kd read: the ceil(share * n) anchors (of the n =
# B * na * H * W of the level) where the teacher's objectness is highest. Measured (benchmarks/RESULTS.md,
# benchmarks/bench_output_terms.py): with real teachers (the shipped one at 192 px, the official yolov5n on COCO128 at
# 320 and 640 px) the top eighth holds 95-98% of the teacher's summed objectness and every anchor above
# BOX_KD_MIN_OBJ; reading only it cuts the class part's elementwise work eightfold (8.1 M class logits per step at
# nc 80, 320 px, batch 16).
OUTPUT_TOP_SHARE = 1 / 8


def top_anchors(teacher_obj: torch.Tensor, share: float = OUTPUT_TOP_SHARE) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the ceil(share * n) largest of a level's flattened teacher objectness logits [n], in no
    particular order. A fixed count (torch.topk), so no host sync: the step's only sync stays FGFI's."""
    k = min(len(teacher_obj), max(1, math.ceil(share * len(teacher_obj))))
    return teacher_obj.topk(k, sorted=False)


def kd_term(
    preds=None,
    teacher_preds=None,
    balance: Sequence[float] | None = None,
    temperature: float = 1.0,
    top_share: float = OUTPUT_TOP_SHARE,
    **_,
) -> torch.Tensor:
    """Objectness and class distillation: the student's logits learn the teacher's probabilities as soft targets.

    Per level l, with s, t the student's and teacher's raw outputs [B, na, H, W, 5 + nc] (same anchors, cell by
    cell), T the temperature, p = sigmoid(t / T), q = sigmoid(s / T) and KL(p || q) the Bernoulli KL divergence
    (= BCE(s / T, p) - BCE(t / T, p): the soft-target BCE YOLOv5 trains its outputs with, minus the teacher's
    entropy, so the same gradients and exactly 0 where the student matches):

        objectness: sum_l balance[l] * mean over every anchor of every cell of KL(p_obj || q_obj)
            Every cell and anchor counts: background cells, where the teacher sees nothing, teach "no object".
        class:      sum_l sum_{a in A_l} w_a * mean_c KL(p_c || q_c)  /  max(sum_l sum_{a in A_l} w_a, 1)
            w = sigmoid(t_obj), the teacher's (untempered) objectness; A_l = the ceil(top_share * n_l) anchors of
            level l (of its n_l = B * na * H * W) with the highest w (top_anchors). Objectness-scaled (Mehta &
            Ozturk 2018): an anchor counts in proportion to the teacher's belief that it holds an object, and the
            background beyond A_l (2-5% of the teacher's summed objectness with real teachers, see
            OUTPUT_TOP_SHARE) does not push class scores around at all. The floor 1 makes the class part 0, never
            NaN, where the teacher sees nothing. A single class has no class part (as YOLOv5's class loss).
            top_share = 1 reads every anchor.

    Returns T^2 * (objectness + class) (Hinton et al.: keeps the gradients' scale as T changes), float32.
    """
    if preds is None or teacher_preds is None:
        return _zero(preds, teacher_preds)
    balance = [1.0] * len(preds) if balance is None else balance
    with torch.autocast(device_type=preds[0].device.type, enabled=False):
        teacher_preds = [t.detach().reshape(-1, t.shape[-1]) for t in teacher_preds]
        multiclass = preds[0].shape[-1] > 6  # nc > 1
        # the class part's anchors and normaliser first (teacher only, no grad): max(sum of their objectness, 1)
        tops = [top_anchors(_wide(t[:, 4]), top_share) if multiclass else None for t in teacher_preds]
        weight_sum = sum(v.sigmoid().sum() for v, _ in tops).clamp(min=1) if multiclass else None
        total = _zero(preds)
        for s, t, top, gain in zip(preds, teacher_preds, tops, balance):
            rows, cls_weight = None, None
            if multiclass:
                nc = s.shape[-1] - 5
                values, rows = top
                cls_weight = values.sigmoid() / (nc * weight_sum)
            level = _LogitKL.apply if use_fast_kernels() else _logit_kl_reference
            total = total + level(s, t, gain / len(t), rows, cls_weight, float(temperature))
        return total.float()


def _logit_kl_reference(s, t, obj_weight: float, rows, cls_weight, temperature: float) -> torch.Tensor:
    """_LogitKL in plain autograd (the reference the fast kernel is tested against; distill.fast switches)."""
    flat = s.reshape(-1, s.shape[-1])
    loss = obj_weight * _bernoulli_kl_autograd(_wide(flat[:, 4]), _wide(t[:, 4]), temperature).sum()
    if rows is not None:
        kl = _bernoulli_kl_autograd(_wide(flat[rows, 5:]), _wide(t[rows, 5:]), temperature)
        loss = loss + kl.sum(1) @ cls_weight
    return loss * temperature**2


def _bernoulli_kl_autograd(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(sigmoid(t / T) || sigmoid(s / T)) elementwise, differentiable in s: softplus(s') - softplus(t') - p (s' - t')
    with the same clamps as _bernoulli_kl."""
    s, t = (s / temperature).clamp(-1e4, 1e4), (t.detach() / temperature).clamp(-1e4, 1e4)
    return (F.softplus(s) - F.softplus(t) - torch.sigmoid(t) * (s - t)).clamp(min=0)


class _LogitKL(torch.autograd.Function):
    """One level of kd_term: T^2 * (obj_weight * sum_anchors KL_obj + sum_{r in rows} cls_weight_r * sum_c KL_c),
    KL the Bernoulli KL(sigmoid(t / T) || sigmoid(s / T)) of the objectness (column 4, every anchor) and class (5:,
    the anchors `rows` alone) logits. s [B, na, H, W, 5 + nc] (any float dtype), t the same values as [n, 5 + nc];
    rows [K] distinct anchor indices into n and cls_weight [K], or both None (no class part).

    Written out because autograd's composition of the same formula (slices, gathers, two BCEs, means) made a dozen
    full-size passes in backward (benchmarks/RESULTS.md); here backward writes one full-size gradient: zeros, the
    column, the rows. Computed in float32 (float64 stays float64) on the columns and rows read, never on a full-size
    float copy of the output. The fast kernel of distill.fast; _logit_kl_reference is the same in plain autograd.
    """

    @staticmethod
    def forward(ctx, s, t, obj_weight: float, rows, cls_weight, temperature: float):
        flat = s.detach().reshape(-1, s.shape[-1])
        kl, diff_obj = _bernoulli_kl(_wide(flat[:, 4]), _wide(t[:, 4]), temperature)
        loss = obj_weight * kl.sum()
        diff_cls = None
        if rows is not None:
            kl, diff_cls = _bernoulli_kl(_wide(flat[rows, 5:]), _wide(t[rows, 5:]), temperature)
            loss = loss + kl.sum(1) @ cls_weight
        ctx.save_for_backward(diff_obj, diff_cls, rows, cls_weight)
        ctx.obj_weight, ctx.temperature, ctx.shape, ctx.dtype = obj_weight, temperature, s.shape, s.dtype
        return loss * temperature**2

    @staticmethod
    def backward(ctx, grad):
        diff_obj, diff_cls, rows, cls_weight = ctx.saved_tensors
        scale = grad * ctx.temperature  # d(T^2 * KL) / ds = T^2 * (q - p) / T
        obj = diff_obj * (scale * ctx.obj_weight)
        cls = None if rows is None else diff_cls * (scale * cls_weight).unsqueeze(1)

        out = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad.device)
        g = out.view(-1, ctx.shape[-1])  # the output's gradient as [n, 5 + nc] rows
        g[:, 4] += obj.to(g.dtype)
        if cls is not None:
            g[:, 5:].index_add_(0, rows, cls.to(g.dtype))
        return out, None, None, None, None, None


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when it is a narrower float (fp16 / bf16 under AMP); float32 and float64 as they are."""
    return x.float() if x.element_size() < 4 else x


def _bernoulli_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise KL(p || q) and q - p, p = sigmoid(t / T), q = sigmoid(s / T), of two float tensors.

    With s' = s / T, t' = t / T, a = sigmoid(-s') = 1 - q and b = sigmoid(-t') = 1 - p:
    KL = log b - log a - (1 - b) * (s' - t') and q - p = b - a. The logs come from logsigmoid, exact where a or b
    underflow (a teacher logit above ~88 T in float32 made log b = -inf before), and both logits are first clamped to
    +-1e4 (an fp16 head's inf): there the sigmoids are saturated, so q - p is unchanged. KL >= 0 in exact arithmetic;
    rounding below 0 is clipped to 0."""
    if temperature != 1:
        s, t = s / temperature, t / temperature
    s, t = s.clamp(-1e4, 1e4), t.clamp(-1e4, 1e4)
    log_a, log_b = F.logsigmoid(-s), F.logsigmoid(-t)
    a, b = log_a.exp(), log_b.exp()
    kl = log_b - log_a
    kl.addcmul_(b - 1, s - t)  # log b - log a - p * (s' - t'), in place
    return kl.clamp_(min=0), b.sub_(a)


# The teacher's objectness below which an anchor's box is not distilled (box_kd_term); above it the anchor counts in
# proportion to that objectness.
BOX_KD_MIN_OBJ = 0.1


def box_kd_term(
    preds=None,
    anchors=None,
    teacher_preds=None,
    teacher_anchors=None,
    min_obj: float = BOX_KD_MIN_OBJ,
    top_share: float = OUTPUT_TOP_SHARE,
    **_,
) -> torch.Tensor:
    """Box distillation: where the teacher is confident, the student's decoded box learns the teacher's.

    Each anchor of each cell is decoded as YOLOv5's box loss decodes it, in grid cells of its level relative to the
    cell's corner: xy = 2 * sigmoid(t_xy) - 0.5, wh = (2 * sigmoid(t_wh))^2 * anchor, the student with its own
    anchors and the teacher with its own (so anchors that differ, e.g. after AutoAnchor, are compared as absolute
    boxes). With w = p * [p > min_obj], p = sigmoid(teacher objectness),

        box_kd = sum_l sum_{a in A_l} w_a * (1 - CIoU(student box, teacher box))  /  max(sum w, 1)

    CIoU as YOLOv5's box loss. Background anchors (p <= min_obj) do not count: at the image sizes used here the
    thousands of cells at p ~ 0.01 would otherwise outweigh the objects. A_l: the ceil(top_share * n_l) anchors of
    level l with the highest p (top_anchors), which hold every anchor above min_obj unless more than that many are:
    then the most confident ones count. 0 where the teacher sees nothing.
    """
    if preds is None or teacher_preds is None or anchors is None or teacher_anchors is None:
        return _zero(preds, teacher_preds)
    with torch.autocast(device_type=preds[0].device.type, enabled=False):
        weights, boxes, anchor_pairs = [], [], []
        for s, t, a_s, a_t in zip(preds, teacher_preds, anchors, teacher_anchors):
            _, na, h, w, no = s.shape
            t = t.detach().reshape(-1, no)
            logits, rows = top_anchors(t[:, 4].float(), top_share)
            p = logits.sigmoid()
            weights.append(p * (p > min_obj))
            anchor = rows // (h * w) % na  # each row's anchor index
            boxes.append((s.reshape(-1, no)[rows, :4].double(), t[rows, :4].double()))
            anchor_pairs.append((a_s.double()[anchor], a_t.double().to(s.device)[anchor]))
        # every level's rows at once (boxes in grid cells of their own level: CIoU compares each pair in its level);
        # CIoU in float64: in float32 1 + 1e-7 == 1, so a student box equal to the teacher's (a student started from
        # the teacher) makes CIoU's alpha 0 / 0 = NaN; K boxes are a small tensor beside the network
        (s_box, t_box), (s_anchor, t_anchor) = ([torch.cat(x) for x in zip(*pairs)] for pairs in (boxes, anchor_pairs))
        iou = bbox_iou(_decode(s_box, s_anchor), _decode(t_box, t_anchor), CIoU=True).squeeze(-1).float()
        weight = torch.cat(weights)
        return (weight * (1.0 - iou)).sum() / weight.sum().clamp(min=1)


def _decode(box: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[K, 4] raw box outputs -> [K, 4] boxes (x, y offsets from the cell corner, w, h) in grid cells of their
    level; anchors [K, 2], each row's anchor in grid cells of that level."""
    box = box.sigmoid() * 2
    return torch.cat((box[:, :2] - 0.5, box[:, 2:] ** 2 * anchors), 1)


def _zero(*refs) -> torch.Tensor:
    """A 0-dim float32 zero on the device of the first tensor found in refs (lists searched too)."""
    for r in refs:
        r = r[0] if isinstance(r, (list, tuple)) and r else r
        if isinstance(r, torch.Tensor):
            return torch.zeros((), device=r.device)
    return torch.zeros(())


TERMS: dict[str, Term] = {
    t.name: t
    for t in (
        Term(
            "imitation", imitation_term, 0.01, False, "imit",
            "FGFI imitation loss gain (default: hyp 'imitation', 0.01 as in the paper)",
            inputs=FEATURE_INPUTS, features=True,
        ),
        Term(
            "kd", kd_term, 1.0, True, "kd",
            "objectness + class output distillation gain, objectness-scaled (default: hyp 'kd', 1.0; on when the "
            "teacher's head matches the student's, 0 = off)",
            inputs=("preds", "teacher_preds", "balance"), same_anchors=True,
            settings=(Setting(
                "kd_temperature", "temperature", 1.0, 0.1, 20.0,
                "softening temperature T of --kd-weight, in [0.1, 20] (default: hyp 'kd_temperature', 1.0)",
            ),),
        ),
        Term(
            "box_kd", box_kd_term, 0.05, True, "boxkd",
            "box output distillation gain, where the teacher is confident (default: hyp 'box_kd', 0.05; on when the "
            "teacher's head matches the student's, 0 = off)",
            inputs=("preds", "anchors", "teacher_preds", "teacher_anchors"),
        ),
    )
}  # fmt: skip


def term_settings() -> dict[str, Setting]:
    """Every term's settings by name (their flags and hyp keys), in the table's order."""
    return {s.name: s for term in TERMS.values() for s in term.settings}


def term_weights(given: dict[str, float | None], hyp: dict) -> dict[str, float]:
    """Each term's weight: the flag's value (given[name], None when not set), else the hyp file's, else the default."""
    weights = {}
    for name, term in TERMS.items():
        value = given.get(name)
        weights[name] = float(hyp.get(name, term.default) if value is None else value)
    return weights


def check_weight(name: str, value: float | None) -> None:
    """--{name}-weight must be a finite number >= 0 (None: not chosen yet)."""
    from utils.general import UserError

    if value is not None and not (math.isfinite(value) and value >= 0):
        raise UserError(f"--{name.replace('_', '-')}-weight {value}: must be a finite number >= 0")
