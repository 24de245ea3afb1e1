"""ComputeLoss against hand-worked assignments and an independently written reference loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from distill.terms import imitation_term
from utils.loss import ComputeLoss, FocalLoss, QFocalLoss, smooth_BCE

HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "cls_pw": 1.5, "obj_pw": 0.7, "anchor_t": 4.0, "fl_gamma": 0.0}


class FakeDetect(nn.Module):
    """Just the attributes ComputeLoss reads from a Detect module."""

    def __init__(self, nc: int, anchors: list[list[float]], strides: list[float]):
        super().__init__()
        self.nc, self.nl, self.na = nc, len(anchors), len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, self.na, 2))
        self.stride = torch.tensor(strides).float()
        self.weight = nn.Parameter(torch.zeros(1))  # ComputeLoss reads the device from the parameters


class FakeModel(nn.Module):
    def __init__(self, nc=2, anchors=((1, 1, 2, 2, 4, 4),), strides=(8,)):
        super().__init__()
        self.model = nn.Sequential(FakeDetect(nc, [list(a) for a in anchors], list(strides)))


def preds(shapes, nc, bs=2, seed=0, requires_grad=True):
    """Random raw outputs, one [bs, 3, H, W, 5 + nc] per (H, W)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, h, w, 5 + nc, generator=gen).requires_grad_(requires_grad) for h, w in shapes]


# ------------------------------------------------------------------ independent reference


def ref_assign(targets, shape_hw, anchors, anchor_t):
    """Assignment by explicit loops: [(b, a, gj, gi, cls, tx, ty, tw, th)], in grid cells."""
    h, w = shape_hw
    out = []
    for a, (aw, ah) in enumerate(anchors.tolist()):
        for b, c, x, y, bw, bh in targets.tolist():
            gx, gy, gw, gh = x * w, y * h, bw * w, bh * h
            if max(gw / aw, aw / gw, gh / ah, ah / gh) >= anchor_t:
                continue
            cells = [(math.floor(gx), math.floor(gy))]
            if gx % 1 < 0.5 and gx > 1:
                cells.append((math.floor(gx) - 1, math.floor(gy)))
            if gy % 1 < 0.5 and gy > 1:
                cells.append((math.floor(gx), math.floor(gy) - 1))
            if (w - gx) % 1 < 0.5 and w - gx > 1:
                cells.append((math.floor(gx) + 1, math.floor(gy)))
            if (h - gy) % 1 < 0.5 and h - gy > 1:
                cells.append((math.floor(gx), math.floor(gy) + 1))
            for gi, gj in cells:
                gi, gj = min(max(gi, 0), w - 1), min(max(gj, 0), h - 1)
                out.append((int(b), a, gj, gi, int(c), gx - gi, gy - gj, gw, gh))
    return out


def ref_ciou(p, t):
    """CIoU (Zheng et al. 2020) of two xywh boxes given as python floats."""
    px1, py1, px2, py2 = p[0] - p[2] / 2, p[1] - p[3] / 2, p[0] + p[2] / 2, p[1] + p[3] / 2
    tx1, ty1, tx2, ty2 = t[0] - t[2] / 2, t[1] - t[3] / 2, t[0] + t[2] / 2, t[1] + t[3] / 2
    inter = max(0.0, min(px2, tx2) - max(px1, tx1)) * max(0.0, min(py2, ty2) - max(py1, ty1))
    iou = inter / (p[2] * p[3] + t[2] * t[3] - inter)
    diag2 = (max(px2, tx2) - min(px1, tx1)) ** 2 + (max(py2, ty2) - min(py1, ty1)) ** 2
    rho2 = (p[0] - t[0]) ** 2 + (p[1] - t[1]) ** 2
    v = 4 / math.pi**2 * (math.atan(t[2] / t[3]) - math.atan(p[2] / p[3])) ** 2
    alpha = v / (1 - iou + v) if v > 0 else 0.0
    return iou - rho2 / diag2 - alpha * v


def bce(logit, target, pos_weight=1.0):
    """Elementwise BCE with logits written out: -(pw * y * log s(x) + (1 - y) * log(1 - s(x)))."""
    return -(pos_weight * target * nn.functional.logsigmoid(logit) + (1 - target) * nn.functional.logsigmoid(-logit))


def ref_loss(p, targets, anchors, hyp, nc, balance):
    """Total YOLOv5 loss and its weighted terms, from the loop assignment and the written-out formulas."""
    cp, cn = 1 - hyp.get("label_smoothing", 0.0) / 2, hyp.get("label_smoothing", 0.0) / 2
    lbox, lobj, lcls = 0.0, 0.0, 0.0
    for i, pi in enumerate(p):
        pi = pi.detach().double()
        assigned = ref_assign(targets, pi.shape[2:4], anchors[i], hyp["anchor_t"])
        tobj = torch.zeros(pi.shape[:4], dtype=torch.float64)
        assert len({r[:4] for r in assigned}) == len(assigned), "test targets must not share a cell and anchor"
        if assigned:
            ious, cls_losses = [], []
            for b, a, gj, gi, c, tx, ty, tw, th in assigned:
                out = pi[b, a, gj, gi]
                s = out.sigmoid().tolist()
                aw, ah = anchors[i][a].tolist()
                box = (s[0] * 2 - 0.5, s[1] * 2 - 0.5, (s[2] * 2) ** 2 * aw, (s[3] * 2) ** 2 * ah)
                ious.append(ref_ciou(box, (tx, ty, tw, th)))
                tobj[b, a, gj, gi] = max(ious[-1], 0.0)
                cls_t = torch.full((nc,), cn, dtype=torch.float64)
                cls_t[c] = cp
                cls_losses.append(bce(out[5:], cls_t, hyp["cls_pw"]))
            lbox += sum(1 - x for x in ious) / len(ious)
            if nc > 1:
                lcls += torch.stack(cls_losses).mean().item()
        lobj += bce(pi[..., 4], tobj, hyp["obj_pw"]).mean().item() * balance[i]
    items = {"box": lbox * hyp["box"], "obj": lobj * hyp["obj"], "cls": lcls * hyp["cls"]}
    return sum(items.values()) * p[0].shape[0], items


# ------------------------------------------------------------------ target assignment


def test_build_targets_hand_worked():
    # 4x4 grid, anchors 1x1, 2x2, 4x4 cells. Box centre (1.2, 2.4) cells, size 1x2 cells:
    # side ratios vs anchors: max 2, 2, 4 -> anchor 2 fails anchor_t=4 (strict <).
    # x frac 0.2 < 0.5 and x > 1 -> left neighbour; y frac 0.4 -> upper neighbour; right/bottom are > half away.
    compute = ComputeLoss(FakeModel(), HYP)
    targets = torch.tensor([[1, 1, 1.2 / 4, 2.4 / 4, 1 / 4, 2 / 4]])
    tcls, tbox, indices, anch = compute.build_targets(preds([(4, 4)], 2), targets)
    b, a, gj, gi = (x.tolist() for x in indices[0])
    got = sorted(zip(b, a, gj, gi, [tuple(round(v, 5) for v in row) for row in tbox[0].tolist()]))
    want = []
    for anchor in (0, 1):
        want += [
            (1, anchor, 2, 1, (0.2, 0.4, 1.0, 2.0)),  # own cell
            (1, anchor, 2, 0, (1.2, 0.4, 1.0, 2.0)),  # left neighbour
            (1, anchor, 1, 1, (0.2, 1.4, 1.0, 2.0)),  # upper neighbour
        ]
    assert got == sorted(want)
    assert tcls[0].tolist() == [1] * 6
    assert torch.equal(anch[0], compute.anchors[0][indices[0][1]])


def test_build_targets_edges_and_right_bottom_neighbours():
    # Centre (3.7, 2.6) on a 4-wide, 3-tall grid: fractions 0.7 and 0.6 rule out left/upper neighbours, and the
    # right/lower ones would be off the grid (3.7 and 2.6 are within one cell of the edges).
    compute = ComputeLoss(FakeModel(), HYP)
    targets = torch.tensor([[0, 0, 3.7 / 4, 2.6 / 3, 1 / 4, 1 / 3]])
    _, _, indices, _ = compute.build_targets(preds([(3, 4)], 2), targets)
    cells = {(a, gj, gi) for _, a, gj, gi in zip(*(x.tolist() for x in indices[0]))}
    assert cells == {(0, 2, 3), (1, 2, 3)}  # 1x1 box: anchors 0 and 1 (ratio 2), 4x4 anchor fails (ratio 4)

    # Centre (2.7, 1.6) on 4x4: right neighbour (4 - 2.7 = 1.3, frac 0.3) and lower neighbour (4 - 1.6 = 2.4)
    targets = torch.tensor([[0, 0, 2.7 / 4, 1.6 / 4, 3 / 4, 3 / 4]])  # 3x3 cells: all three anchors match
    _, tbox, indices, _ = compute.build_targets(preds([(4, 4)], 2), targets)
    cells = {(a, gj, gi) for _, a, gj, gi in zip(*(x.tolist() for x in indices[0]))}
    assert cells == {(a, gj, gi) for a in range(3) for gj, gi in ((1, 2), (1, 3), (2, 2))}
    assert (tbox[0][:, :2] > -0.5).all() and (tbox[0][:, :2] < 1.5).all()  # reachable by 2 * sigmoid - 0.5


def test_build_targets_edge_clamp_and_no_match():
    compute = ComputeLoss(FakeModel(), HYP)
    # x = 1.0 exactly lands on column W -> clamped to the last column; the offset is measured from that column
    _, tbox, indices, _ = compute.build_targets(preds([(4, 4)], 2), torch.tensor([[0, 0, 1.0, 0.5, 0.25, 0.25]]))
    assert indices[0][3].max().item() == 3 and torch.allclose(tbox[0][:, 0], torch.tensor(1.0))
    # A 16x16-cell box is > 4x every anchor: no assignment at all
    _, _, indices, _ = compute.build_targets(preds([(4, 4)], 2), torch.tensor([[0, 0, 0.5, 0.5, 4.0, 4.0]]))
    assert all(x.numel() == 0 for x in indices[0])


def test_build_targets_matches_loop_reference_two_levels():
    anchors = ((1, 1, 2, 2, 4, 4), (0.5, 0.5, 1, 1, 3, 1))
    compute = ComputeLoss(FakeModel(anchors=anchors, strides=(8, 16)), HYP)
    gen = torch.Generator().manual_seed(1)
    n = 12
    targets = torch.cat(
        (torch.randint(0, 2, (n, 1), generator=gen), torch.randint(0, 2, (n, 1), generator=gen),
         torch.rand(n, 2, generator=gen) * 0.98 + 0.01, torch.rand(n, 2, generator=gen) * 0.6 + 0.05), 1
    ).float()  # fmt: skip
    p = preds([(4, 6), (2, 3)], 2)  # non-square grids
    tcls, tbox, indices, _ = compute.build_targets(p, targets)
    for i in range(2):
        got = [
            (*idx, c, *box)
            for *idx, c, box in zip(*(x.tolist() for x in indices[i]), tcls[i].tolist(), tbox[i].tolist())
        ]
        want = ref_assign(targets, p[i].shape[2:4], compute.anchors[i], HYP["anchor_t"])
        assert len(got) == len(want) > 0
        got, want = (sorted(x, key=lambda r: (*r[:5], round(r[5], 2))) for x in (got, want))
        assert [r[:5] for r in got] == [r[:5] for r in want]  # image, anchor, row, column, class
        assert torch.allclose(torch.tensor([r[5:] for r in got]), torch.tensor([r[5:] for r in want]), atol=1e-5)


# ------------------------------------------------------------------ loss values


def separated_targets():
    # Boxes far enough apart that no two assignments share (image, anchor, cell)
    return torch.tensor(
        [[0, 1, 0.30, 0.60, 0.25, 0.50], [0, 0, 0.80, 0.15, 0.40, 0.20], [1, 0, 0.55, 0.55, 0.10, 0.30]]
    )


@pytest.mark.parametrize("nc", [2, 1])
def test_total_loss_matches_reference(nc):
    anchors = ((1, 1, 2, 2, 4, 4), (0.5, 0.5, 1, 1, 2, 2))
    compute = ComputeLoss(FakeModel(nc=nc, anchors=anchors, strides=(8, 16)), HYP)
    targets = separated_targets()
    targets[:, 1] = targets[:, 1].clamp(max=nc - 1)
    p = preds([(4, 4), (2, 2)], nc)
    loss, items = compute(p, targets)
    want, want_items = ref_loss(p, targets, compute.anchors, HYP, nc, [4.0, 1.0])
    assert loss.shape == () and set(items) == {"box", "obj", "cls"} == set(compute.names)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    for k in items:
        assert items[k].shape == () and not items[k].requires_grad
        assert items[k].item() == pytest.approx(want_items[k], rel=1e-5, abs=1e-9)
    if nc == 1:
        assert items["cls"].item() == 0.0  # one class: no class loss
    loss.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in p)


def test_label_smoothing_changes_class_targets():
    hyp = {**HYP, "label_smoothing": 0.2}
    assert smooth_BCE(0.2) == pytest.approx((0.9, 0.1)) and smooth_BCE(0.0) == (1.0, 0.0)
    compute = ComputeLoss(FakeModel(), hyp)
    assert (compute.cp, compute.cn) == pytest.approx((0.9, 0.1))
    p, targets = preds([(4, 4)], 2), separated_targets()
    _, items = compute(p, targets)
    _, want = ref_loss(p, targets, compute.anchors, hyp, 2, [4.0])
    assert items["cls"].item() == pytest.approx(want["cls"], rel=1e-5)
    _, plain = ComputeLoss(FakeModel(), HYP)(p, targets)
    assert torch.equal(items["box"], plain["box"]) and not torch.equal(items["cls"], plain["cls"])


def test_image_without_boxes_and_empty_batch():
    compute = ComputeLoss(FakeModel(), HYP)
    p = preds([(4, 4)], 2, bs=2)
    # image 1 has no boxes: still finite, and its objectness is all-negative
    loss, items = compute(p, separated_targets()[:2])
    assert torch.isfinite(loss)
    # no boxes at all: zero box and class terms, objectness = mean BCE against zeros
    loss, items = compute(p, torch.zeros((0, 6)))
    assert items["box"].item() == 0.0 and items["cls"].item() == 0.0
    want_obj = bce(p[0].detach()[..., 4], torch.zeros(2, 3, 4, 4), HYP["obj_pw"]).mean() * 4.0 * HYP["obj"]
    assert items["obj"].item() == pytest.approx(want_obj.item(), rel=1e-6)
    assert loss.item() == pytest.approx(want_obj.item() * 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(p[0].grad).all() and p[0].grad[..., 4].abs().sum() > 0


def test_focal_losses_match_formula():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 4, generator=gen), torch.rand(5, 4, generator=gen)
    base = nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
    s = x.sigmoid()
    alpha_t = y * 0.25 + (1 - y) * 0.75
    fl = base * alpha_t * (1 - (y * s + (1 - y) * (1 - s))) ** 1.5
    assert torch.allclose(FocalLoss(nn.BCEWithLogitsLoss())(x, y), fl.mean())
    assert torch.allclose(FocalLoss(nn.BCEWithLogitsLoss(reduction="sum"))(x, y), fl.sum())
    qfl = base * alpha_t * (y - s).abs() ** 1.5
    assert torch.allclose(QFocalLoss(nn.BCEWithLogitsLoss())(x, y), qfl.mean())
    compute = ComputeLoss(FakeModel(), {**HYP, "fl_gamma": 1.5})
    assert isinstance(compute.BCEcls, FocalLoss) and isinstance(compute.BCEobj, FocalLoss)
    assert torch.isfinite(compute(preds([(4, 4)], 2), separated_targets())[0])


def test_autobalance_keeps_stride16_weight_at_one():
    compute = ComputeLoss(FakeModel(anchors=((1, 1, 2, 2, 4, 4),) * 2, strides=(8, 16)), HYP, autobalance=True)
    assert compute.ssi == 1
    compute(preds([(4, 4), (2, 2)], 2), separated_targets())
    assert float(compute.balance[1]) == pytest.approx(1.0) and float(compute.balance[0]) != 4.0


# ------------------------------------------------------------------ imitation term


def ref_imitation(s, t, m):
    return ((m * (s - t) ** 2).sum() / (2 * max(m.sum().item(), 1.0))).item()


def features(seed, shape=(2, 4, 4, 4)):
    gen = torch.Generator().manual_seed(seed)
    s, t = torch.randn(*shape, generator=gen).requires_grad_(), torch.randn(*shape, generator=gen)
    m = (torch.rand(shape[0], 1, *shape[2:], generator=gen) > 0.6).float()
    return s, t, m


def test_imitation_term_is_added_with_its_weight():
    p, targets = preds([(4, 4)], 2), separated_targets()
    base = ComputeLoss(FakeModel(), HYP)
    distil = ComputeLoss(FakeModel(), HYP, terms={"imitation": (0.01, imitation_term)})
    assert base.names == ("box", "obj", "cls") and distil.names == ("box", "obj", "cls", "imitation")
    s, t, m = features(4)
    loss0, items0 = base(p, targets, teacher=t, student=s, mask=m)  # no weight: features ignored
    assert "imitation" not in items0
    loss, items = distil(p, targets, teacher=t, student=s, mask=m)
    assert tuple(items) == distil.names
    imitation = ref_imitation(s, t, m)
    assert items["imitation"].item() == pytest.approx(0.01 * imitation, rel=1e-5)
    assert (loss - loss0).item() == pytest.approx(0.01 * imitation * 2, abs=1e-5)
    loss.backward()
    grad = s.grad.abs().sum(1, keepdim=True)
    assert (grad[m == 0] == 0).all() and (grad[m == 1] > 0).all()  # only masked locations are imitated

    _, items = distil(p, targets)  # no teacher: the term is present and zero
    assert items["imitation"].item() == 0.0


def test_imitation_points_are_summed():
    distil = ComputeLoss(FakeModel(), HYP, terms={"imitation": (0.5, imitation_term)})
    p, targets = preds([(4, 4)], 2), separated_targets()
    (s1, t1, m1), (s2, t2, m2) = features(5), features(6, (2, 3, 2, 2))
    _, items = distil(p, targets, teacher=[t1, t2], student=[s1, s2], mask=[m1, m2])
    want = 0.5 * (ref_imitation(s1, t1, m1) + ref_imitation(s2, t2, m2))
    assert items["imitation"].item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError):
        distil(p, targets, teacher=[t1, t2], student=[s1], mask=[m1])
    # an all-zero mask gives zero, not NaN (normaliser floored at 1)
    _, items = distil(p, targets, teacher=t1, student=s1, mask=torch.zeros_like(m1))
    assert items["imitation"].item() == 0.0
