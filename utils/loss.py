"""YOLOv5 training loss: box (CIoU), objectness and class BCE, plus the distillation terms a run switches on.

The terms come back as a named dict so that logs, progress bars and results.csv columns follow its keys
(`ComputeLoss.names`); the distillation terms (FGFI imitation, output distillation, ...) are handed in by the caller
as {name: (weight, loss function)} (distill.Distiller.loss_terms, from the table in distill/terms.py), so this file
knows none of them and adding one changes no list here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn as nn

from utils.metrics import bbox_iou
from utils.torch_utils import de_parallel

# Neighbour cells a target may also be assigned to: itself, then left, up, right, down (in units of the 0.5 bias)
_NEIGHBOURS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


def smooth_BCE(eps: float = 0.1) -> tuple[float, float]:
    """Label-smoothed BCE targets (positive, negative) = (1 - eps / 2, eps / 2); eps=0 gives (1, 0)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) around an nn.BCEWithLogitsLoss: scales each element by alpha_t * (1 - p_t)^gamma.

    The wrapped loss is switched to reduction='none' and its original reduction is applied after the scaling.
    """

    def __init__(self, loss_fcn: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.loss_fcn, self.gamma, self.alpha = loss_fcn, gamma, alpha
        self.reduction = loss_fcn.reduction
        self.loss_fcn.reduction = "none"  # the scaling is per element

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fcn(pred, true)
        prob = pred.sigmoid()
        p_t = true * prob + (1 - true) * (1 - prob)
        alpha_t = true * self.alpha + (1 - true) * (1 - self.alpha)
        return _reduce(loss * alpha_t * (1.0 - p_t) ** self.gamma, self.reduction)


class QFocalLoss(FocalLoss):
    """Quality focal loss (Li et al. 2020, GFL): the modulating factor is |true - p|^gamma, for soft targets."""

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fcn(pred, true)
        alpha_t = true * self.alpha + (1 - true) * (1 - self.alpha)
        return _reduce(loss * alpha_t * (true - pred.sigmoid()).abs() ** self.gamma, self.reduction)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


class ComputeLoss:
    """YOLOv5 loss for a DetectionModel's training output.

    Args:
        model: the (possibly DDP-wrapped) model; its last layer is the Detect module, read for na, nc, nl,
            stride and anchors ([nl, na, 2] in grid cells of each level).
        hyp: hyperparameters: box, obj, cls (gains), cls_pw, obj_pw (BCE positive weights), anchor_t (max
            target/anchor side ratio), fl_gamma (focal loss when > 0), label_smoothing (optional).
        autobalance: adapt the per-level objectness weights during training (YOLOv5's option, off by default).
        terms: the distillation terms to add, {name: (weight, loss)} in logging order, loss(**inputs) -> 0-dim
            (e.g. {"imitation": (0.01, distill.terms.imitation_term)}: FGFI; Distiller.loss_terms gives a run's);
            each adds weight * loss to the total and is its own item.
        balanced: names among terms whose joint gradient with respect to the head outputs is held, batch by batch, at
            most as large (L2 norm over every level) as the detection loss's: their items are multiplied by
            min(1, |d det / d preds| / |d terms / d preds|), a factor without gradient. An output term of a weak
            teacher (or at a weight too high for the data) then cannot drown the detection loss's own gradient.
        unlabeled: names among terms that also run on unlabelled images (unlabeled_loss); their items are
            '{name}_u', so each stream's share is logged on its own (train/kd_loss, train/kd_u_loss).
        gated: every distillation term is multiplied, batch by batch, by teacher_gate: how much better the teacher
            fits the labelled batch than the student (1 far behind, 0 once the student fits it as well); the
            unlabelled terms by the same step's gate. Needs the teacher's head outputs (teacher_preds).
    """

    sort_obj_iou = False  # YOLOv5 default: no sorting, so overlapping targets in a cell write in target order

    def __init__(
        self,
        model: nn.Module,
        hyp: dict,
        autobalance: bool = False,
        terms: dict[str, tuple[float, Callable[..., torch.Tensor]]] | None = None,
        balanced: Collection[str] = (),
        unlabeled: Collection[str] = (),
        gated: bool = False,
    ):
        device = next(model.parameters()).device
        h = hyp
        BCEcls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["cls_pw"]], device=device))
        BCEobj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["obj_pw"]], device=device))
        self.cp, self.cn = smooth_BCE(eps=h.get("label_smoothing", 0.0))  # class targets, positive and negative
        if h.get("fl_gamma", 0.0) > 0:
            BCEcls, BCEobj = FocalLoss(BCEcls, h["fl_gamma"]), FocalLoss(BCEobj, h["fl_gamma"])

        m = de_parallel(model).model[-1]  # Detect
        # Objectness weight per level, P3 first: small-stride levels see many more negatives
        self.balance = {3: [4.0, 1.0, 0.4]}.get(m.nl, [4.0, 1.0, 0.25, 0.06, 0.02])
        self.ssi = list(m.stride).index(16) if autobalance else 0  # autobalance keeps the stride-16 weight at 1
        self.BCEcls, self.BCEobj, self.hyp, self.autobalance = BCEcls, BCEobj, h, autobalance
        self.gr = 1.0  # objectness target = gr * IoU + (1 - gr)
        self.na, self.nc, self.nl = m.na, m.nc, m.nl
        self.anchors = m.anchors  # [nl, na, 2] grid cells; shared with Detect, so AutoAnchor updates reach us
        self.device = device
        self.terms = {name: (float(weight), loss) for name, (weight, loss) in (terms or {}).items()}
        self.balanced = tuple(name for name in self.terms if name in set(balanced))
        self.unlabeled = tuple(name for name in self.terms if name in set(unlabeled))
        self.detection_norm = None  # |d detection / d preds| of the latest labelled batch (balanced terms only)
        self.gated = bool(gated)  # every term scaled by teacher_gate, batch by batch (needs the teacher's outputs)
        self.gate = None  # the latest labelled batch's teacher_gate
        clash = set(self.terms) & set(self.detection_names)
        if clash:
            raise ValueError(f"ComputeLoss: distillation terms may not be named {sorted(clash)}")

    detection_names = ("box", "obj", "cls")

    @property
    def names(self) -> tuple[str, ...]:
        """Keys of the loss items, in logging order: YOLOv5's three, the distillation terms switched on, then those
        terms on unlabelled images ('{name}_u')."""
        gate = ("gate",) if self.gated else ()  # logged beside the terms (train/gate), never part of the loss
        return self.detection_names + tuple(self.terms) + tuple(f"{name}_u" for name in self.unlabeled) + gate

    def __call__(
        self,
        p: list[torch.Tensor],
        targets: torch.Tensor,
        **distill,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch.

        Args:
            p: per level [B, na, H, W, 5 + nc] raw outputs (xy, wh, obj, classes; logits).
            targets: [n, 6] (image index, class, x, y, w, h), xywh normalized to the image, on self.device.
            distill: the distillation terms' inputs (Distiller's second output; distill/terms.py lists them), e.g.
                teacher, student: imitated features [B, C, H, W] (student already through its adapter), or [N, C]
                at the N masked cells only (the sparse path), or equal-length lists of them, one per imitation
                point; mask: imitation mask [B, 1, H, W] (0/1) matching each feature, or a list; teacher_preds: the
                teacher's raw outputs. A term whose inputs are missing is 0 (validation).

        Returns:
            loss: 0-dim, (box + obj + cls + distillation terms) * B, each term already weighted by its gain.
            items: name -> detached 0-dim weighted term (see `names`).
        """
        items = self._items(p, targets, distill)
        loss = sum(items.values()) * p[0].shape[0]
        return loss, self._logged(items)

    def split(
        self, p: list[torch.Tensor], targets: torch.Tensor, **distill
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """As __call__, with the loss in two parts: (box + obj + cls) * B and (the distillation terms) * B (0 without
        terms), for a gradient of each (distill.optim.DecoupledStep); items as __call__'s."""
        items, bs = self._items(p, targets, distill), p[0].shape[0]
        detection = (items["box"] + items["obj"] + items["cls"]) * bs
        terms = [v for k, v in items.items() if k not in self.detection_names]
        return detection, sum(terms) * bs if terms else torch.zeros((), device=self.device), self._logged(items)

    def _items(self, p: list[torch.Tensor], targets: torch.Tensor, distill: dict) -> dict[str, torch.Tensor]:
        """Every weighted term of the loss, with gradient: box, obj, cls and the distillation terms switched on."""
        lbox, lobj, lcls = self._detection(p, targets)
        items = {"box": lbox * self.hyp["box"], "obj": lobj * self.hyp["obj"], "cls": lcls * self.hyp["cls"]}
        if self.terms:
            inputs = dict(preds=p, anchors=self.anchors, balance=self.balance, **distill)
            for name, (weight, loss) in self.terms.items():
                items[name] = weight * loss(**inputs).to(self.device)
            if self.balanced and torch.is_grad_enabled() and p[0].requires_grad:
                self.detection_norm = _grad_norm(items["box"] + items["obj"] + items["cls"], p)
                scale = _balance(self.detection_norm, [items[k] for k in self.balanced], p)
                for name in self.balanced:
                    items[name] = items[name] * scale
            if self.gated and distill.get("teacher_preds") is not None:
                self.gate = self.teacher_gate(items, distill["teacher_preds"], distill.get("teacher_anchors"), targets)
                for name in self.terms:
                    items[name] = items[name] * self.gate
        return items

    def _logged(self, items: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The items as logged: detached, with every name in `names` (the '{name}_u' items 0 on a labelled batch
        with the gate on, which logs the gate beside them)."""
        items = {k: v.detach() for k, v in items.items()}
        if self.gated:
            items.update({f"{k}_u": torch.zeros((), device=self.device) for k in self.unlabeled})
            items["gate"] = self.gate if self.gate is not None else torch.ones((), device=self.device)
        return items

    def teacher_gate(
        self, items: dict, teacher_preds: list[torch.Tensor], teacher_anchors: torch.Tensor | None, targets
    ) -> torch.Tensor:
        """clamp(1 - L_teacher / L_student, 0, 1), 0-dim without gradient: how much better the teacher fits this
        labelled batch than the student, L = YOLOv5's weighted box + objectness + class loss of each model's raw
        outputs on the same images and targets (the teacher's with its own anchors). 1 while the student is far
        behind, falling to 0 as it catches up with the teacher, and 0 where it fits the batch as well or better."""
        with torch.no_grad():
            t = [x.detach().float() for x in teacher_preds]
            lbox, lobj, lcls = self._detection(t, targets, anchors=teacher_anchors, update=False)
            teacher = lbox * self.hyp["box"] + lobj * self.hyp["obj"] + lcls * self.hyp["cls"]
            student = (items["box"] + items["obj"] + items["cls"]).detach()
            return (1 - teacher / student.clamp(min=1e-12)).clamp(0, 1)

    def _detection(
        self, p: list[torch.Tensor], targets: torch.Tensor, anchors: torch.Tensor | None = None, update: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """YOLOv5's unweighted (box, objectness, class) losses of raw outputs p; anchors: the model's (None: the
        student's); update: autobalance may move its weights (never for the teacher's outputs)."""
        zero = torch.zeros((), device=self.device)
        lcls, lbox, lobj = zero, zero, zero
        tcls, tbox, indices, anchors = self.build_targets(p, targets, anchors)

        for i, pi in enumerate(p):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=self.device)
            if n := b.shape[0]:
                pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, self.nc), 1)
                # Box: centre may move -0.5..1.5 cells (so neighbour cells can reach it), size 0..4 anchors
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * anchors[i]
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox[i], CIoU=True).squeeze(-1)
                lbox = lbox + (1.0 - iou).mean()

                # Objectness target: the (detached) IoU of the prediction that matched the target
                iou = iou.detach().clamp(0).type(tobj.dtype)
                if self.sort_obj_iou:  # the highest IoU wins a cell shared by several targets
                    j = iou.argsort()
                    b, a, gj, gi, iou = b[j], a[j], gj[j], gi[j], iou[j]
                if self.gr < 1:
                    iou = (1.0 - self.gr) + self.gr * iou
                tobj[b, a, gj, gi] = iou

                if self.nc > 1:  # a single class needs no class loss
                    t = torch.full_like(pcls, self.cn)
                    t[torch.arange(n, device=self.device), tcls[i]] = self.cp
                    lcls = lcls + self.BCEcls(pcls, t)

            obji = self.BCEobj(pi[..., 4], tobj)
            lobj = lobj + obji * self.balance[i]
            if self.autobalance and update:  # kept as a tensor: no host sync
                self.balance[i] = self.balance[i] * 0.9999 + 0.0001 / obji.detach()

        if self.autobalance and update:
            self.balance = [x / self.balance[self.ssi] for x in self.balance]
        return lbox, lobj, lcls

    def unlabeled_loss(self, p: list[torch.Tensor], **distill) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of a batch of unlabelled images: the `unlabeled` terms alone, never YOLOv5's box, objectness or class
        loss (an image without labels would teach "no object anywhere" through objectness).

        p and distill as for __call__ (the Distiller's outputs on the unlabelled batch). Balanced terms are held to the
        detection loss's gradient norm of the latest labelled batch (the same step's, in train.py), as there.
        Returns (loss, items) as __call__, over every name in `names`: the '{name}_u' items hold the terms, every
        other item is exactly 0.
        """
        zero = torch.zeros((), device=self.device)
        items = dict.fromkeys((k for k in self.names if k != "gate"), zero)
        inputs = dict(preds=p, anchors=self.anchors, balance=self.balance, **distill)
        terms = {name: self.terms[name][0] * self.terms[name][1](**inputs).to(self.device) for name in self.unlabeled}
        balanced = [k for k in self.balanced if k in terms]
        if balanced and self.detection_norm is not None and torch.is_grad_enabled() and p[0].requires_grad:
            scale = _balance(self.detection_norm, [terms[k] for k in balanced], p)
            terms.update({k: terms[k] * scale for k in balanced})
        if self.gated and self.gate is not None:
            terms = {k: v * self.gate for k, v in terms.items()}
        items.update({f"{name}_u": v for name, v in terms.items()})
        loss, items = sum(items.values()) * p[0].shape[0], {k: v.detach() for k, v in items.items()}
        if self.gated:
            items["gate"] = zero  # counted once, with the labelled batch's items
        return loss, items

    def build_targets(self, p: list[torch.Tensor], targets: torch.Tensor, anchors: torch.Tensor | None = None):
        """Assign each target to anchors and grid cells on every level (YOLOv5 rule).

        A target matches an anchor of a level when both side ratios target/anchor lie within 1/anchor_t..anchor_t.
        Each match is assigned to the cell holding the target centre and to the two nearest neighbour cells
        (the centre's x and y each lie within half a cell of one neighbour), skipping neighbours off the grid.

        Args:
            p: per level [B, na, H, W, 5 + nc] outputs (only shapes used).
            targets: [n, 6] (image, class, x, y, w, h), xywh normalized.

        Returns per level lists: tcls [m] class, tbox [m, 4] (x, y offset from the cell corner, w, h) in grid cells,
        indices (image, anchor, gj row, gi column) each [m], anchors [m, 2] matched anchor wh in grid cells.
        """
        na, nt = self.na, targets.shape[0]
        tcls, tbox, indices, anch = [], [], [], []
        gain = torch.ones(7, device=self.device)  # image, class, x, y, w, h, anchor
        ai = torch.arange(na, device=self.device).float().view(na, 1).repeat(1, nt)
        targets = torch.cat((targets.repeat(na, 1, 1), ai[..., None]), 2)  # [na, nt, 7]: one copy per anchor
        g = 0.5  # neighbour reach, in cells
        off = torch.tensor(_NEIGHBOURS, device=self.device).float() * g

        model_anchors = self.anchors if anchors is None else anchors.to(self.device)
        for i in range(self.nl):
            anchors, shape = model_anchors[i], p[i].shape
            gain[2:6] = torch.tensor(shape, device=self.device)[[3, 2, 3, 2]].float()  # W, H, W, H
            t = targets * gain  # xywh in grid cells
            if nt:
                r = t[..., 4:6] / anchors[:, None]  # [na, nt, 2] wh ratios
                t = t[torch.max(r, 1 / r).max(2)[0] < self.hyp["anchor_t"]]

                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy  # distance to the right / bottom edges
                left, top = ((gxy % 1 < g) & (gxy > 1)).T
                right, bottom = ((gxi % 1 < g) & (gxi > 1)).T
                keep = torch.stack((torch.ones_like(left), left, top, right, bottom))
                t = t.repeat((5, 1, 1))[keep]
                offsets = (torch.zeros_like(gxy)[None] + off[:, None])[keep]
            else:
                t = targets[0]
                offsets = 0

            bc, gxy, gwh, a = t.split((2, 2, 2, 1), 1)
            a, (b, c) = a.long().view(-1), bc.long().T
            gij = (gxy - offsets).long()
            gij[:, 0].clamp_(0, shape[3] - 1)
            gij[:, 1].clamp_(0, shape[2] - 1)
            gi, gj = gij.T

            indices.append((b, a, gj, gi))
            tbox.append(torch.cat((gxy - gij, gwh), 1))
            anch.append(anchors[a])
            tcls.append(c)

        return tcls, tbox, indices, anch


def _grad_norm(loss: torch.Tensor, preds: list[torch.Tensor]) -> torch.Tensor:
    """|d loss / d preds| (L2 over every level), without gradient; 0 where loss does not reach preds. A backward pass
    through the loss function only, not through the network."""
    if not loss.requires_grad:
        return torch.zeros((), device=preds[0].device)
    return _norm(torch.autograd.grad(loss, preds, retain_graph=True, allow_unused=True)).to(preds[0].device)


def _balance(norm_det: torch.Tensor, terms: list[torch.Tensor], preds: list[torch.Tensor]) -> torch.Tensor:
    """min(1, norm_det / |d sum(terms) / d preds|) as a 0-dim tensor without gradient (1 where the terms do not reach
    preds); norm_det: the detection loss's _grad_norm."""
    norm_out = _grad_norm(sum(terms), preds)
    return torch.where(norm_out > 0, (norm_det / norm_out.clamp(min=1e-12)).clamp(max=1), torch.ones_like(norm_out))


def _norm(grads) -> torch.Tensor:
    squares = [g.float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
