"""utils/metrics.py against hand-computed values and loop-based reference implementations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from utils.metrics import ConfusionMatrix, ap_per_class, compute_ap, fitness, process_batch, smooth

ROOT = Path(__file__).resolve().parents[1]
IOUV = torch.linspace(0.5, 0.95, 10)


# ------------------------------------------------------------------ independent references (plain python loops)


def ref_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def ref_match(dets: list, labels: list, thr: float) -> set[int]:
    """Indices of true-positive detections (dets sorted best first) under YOLOv5's rule at one IoU threshold:
    pairs of the same class with IoU >= thr; every detection keeps its best label; every label then keeps
    the first (most confident) detection that chose it."""
    best = {}  # detection -> (label, iou)
    for d, det in enumerate(dets):
        for li, lab in enumerate(labels):
            if int(lab[0]) != int(det[5]):
                continue
            v = ref_iou(lab[1:5], det[:4])
            if v >= thr and (d not in best or v > best[d][1]):
                best[d] = (li, v)
    taken = {}
    for d in sorted(best):
        taken.setdefault(best[d][0], d)
    return set(taken.values())


def ref_ap(tps: list[bool], n_labels: int) -> float:
    """YOLOv5's AP of one class/threshold: tps in decreasing-confidence order; (0, 1) and (1, 0) sentinels,
    precision envelope, piecewise-linear curve sampled at recall 0, 0.01, ..., 1, trapezoid rule."""
    xs, ys, tpc = [0.0], [1.0], 0
    for k, t in enumerate(tps, 1):
        tpc += t
        xs.append(tpc / n_labels)
        ys.append(tpc / k)
    xs.append(1.0)
    ys.append(0.0)
    for i in range(len(ys) - 2, -1, -1):
        ys[i] = max(ys[i], ys[i + 1])

    def curve(x):
        j = max(i for i in range(len(xs)) if xs[i] <= x)  # at a vertical step take the lower (right) value
        if j == len(xs) - 1:
            return ys[j]
        return ys[j] + (ys[j + 1] - ys[j]) * (x - xs[j]) / (xs[j + 1] - xs[j])

    vals = [curve(k / 100) for k in range(101)]
    return sum((vals[k] + vals[k + 1]) / 2 * 0.01 for k in range(100))


def random_image(rng, n_labels: int, n_dets: int, nc: int):
    """Labels [m, 5] (class, xyxy) and detections [n, 6] (xyxy, conf, class, sorted by conf) with many overlaps."""
    xy = rng.uniform(0, 80, (n_labels, 2))
    labels = np.concatenate((rng.integers(0, nc, (n_labels, 1)), xy, xy + rng.uniform(10, 40, (n_labels, 2))), 1)
    src = labels[rng.integers(0, max(n_labels, 1), n_dets)] if n_labels else np.zeros((n_dets, 5))
    boxes = src[:, 1:5] + rng.normal(0, 3, (n_dets, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    cls = np.where(rng.random(n_dets) < 0.8, src[:, 0], rng.integers(0, nc, n_dets))
    dets = np.concatenate((boxes, rng.random((n_dets, 1)), cls[:, None]), 1)
    dets = dets[np.argsort(-dets[:, 4])]
    return torch.tensor(labels, dtype=torch.float32), torch.tensor(dets, dtype=torch.float32)


# ------------------------------------------------------------------ fitness / smooth


def test_fitness_weights():
    x = np.array([[0.9, 0.8, 0.5, 0.3], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    assert np.allclose(fitness(x), [0.1 * 0.5 + 0.9 * 0.3, 0.1, 0.9])
    assert np.allclose(fitness(np.array([[0.1, 0.2, 0.3, 0.4, 7.0, 8.0]])), [0.39])  # extra columns ignored


def test_smooth_box_filter():
    y = np.zeros(1000)
    y[500:] = 1.0
    s = smooth(y, 0.05)  # 1000 * 0.05 * 2 = 100 -> 51-wide window
    assert s.shape == y.shape
    assert s[0] == 0 and s[-1] == 1  # ends padded with the end values, not zeros
    assert np.isclose(s[500], 26 / 51)  # window 475..525 holds 26 ones
    assert np.allclose(smooth(np.full(37, 0.3), 0.1), 0.3)


# ------------------------------------------------------------------ compute_ap


def test_perfect_detector_scores_0995():
    # envelope is 1 on [0, 1) and drops to the 0 sentinel at recall 1: the last trapezoid loses half a step
    ap, mpre, mrec = compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]))
    assert ap == pytest.approx(1 - 0.01 / 2)
    assert mrec[0] == 0 and mrec[-1] == 1 and mpre[0] == 1 and mpre[-1] == 0


def test_staircase_by_hand():
    # 3 labels; detections TP, FP, TP, TP -> recall 1/3, 1/3, 2/3, 1; precision 1, 1/2, 2/3, 3/4.
    # envelope: 1 up to recall 1/3, then 3/4 until recall 1, then 0 at exactly recall 1.
    # samples: 1 at 0..0.33 (34 points), 0.75 at 0.34..0.99, 0 at 1.0 -> trapezoid area:
    expected = 0.33 * 1 + 0.01 * (1 + 0.75) / 2 + 0.65 * 0.75 + 0.01 * 0.75 / 2
    ap, mpre, _ = compute_ap(np.array([1, 1, 2, 3]) / 3, np.array([1, 1 / 2, 2 / 3, 3 / 4]))
    assert ap == pytest.approx(expected) == pytest.approx(0.83)
    assert np.all(np.diff(mpre) <= 0)  # the envelope never increases
    assert ref_ap([True, False, True, True], 3) == pytest.approx(expected)


def test_partial_recall_and_no_true_positives():
    # 4 labels, 3 found with precision 1: envelope 1 until recall 0.75 then a linear ramp to the (1, 0) sentinel
    ap, _, _ = compute_ap(np.array([0.25, 0.5, 0.75]), np.array([1.0, 1.0, 1.0]))
    assert ap == pytest.approx(0.75 + 0.25 / 2)
    ap, _, _ = compute_ap(np.zeros(5), np.zeros(5))
    assert ap == 0  # recall never leaves 0: the vertical drop at recall 0 takes the lower value
    assert ref_ap([False] * 5, 4) == 0


@pytest.mark.parametrize("seed", range(5))
def test_compute_ap_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    n_labels = int(rng.choice([3, 7, 9, 11]))
    tps = list(rng.random(15) < 0.5)
    tpc = np.cumsum(tps)
    tps = [bool(t) and c <= n_labels for t, c in zip(tps, tpc)]  # never more TPs than labels
    tpc = np.cumsum(tps)
    recall, precision = tpc / n_labels, tpc / np.arange(1, 16)
    assert compute_ap(recall, precision)[0] == pytest.approx(ref_ap(tps, n_labels), abs=1e-12)


# ------------------------------------------------------------------ process_batch


def test_process_batch_by_hand():
    labels = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30]], dtype=torch.float32)
    dets = torch.tensor(
        [
            [0, 0, 10, 10, 0.9, 0],  # exact: TP at every threshold
            [0, 0, 10, 10, 0.8, 0],  # duplicate of the same label: FP
            [20, 20, 30, 28, 0.7, 1],  # IoU 0.8 with label 1: TP up to 0.8
            [0, 0, 10, 10, 0.6, 1],  # right box, wrong class: FP
        ]
    )
    correct = process_batch(dets, labels, IOUV)
    assert correct.dtype == torch.bool and correct.shape == (4, 10)
    assert correct[0].all() and not correct[1].any() and not correct[3].any()
    assert correct[2].tolist() == [t <= 0.8 + 1e-6 for t in IOUV.tolist()]


def test_process_batch_empty():
    assert process_batch(torch.zeros(0, 6), torch.zeros((2, 5)), IOUV).shape == (0, 10)
    assert not process_batch(torch.rand(3, 6), torch.zeros((0, 5)), IOUV).any()


@pytest.mark.parametrize("seed", range(8))
def test_process_batch_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels, dets = random_image(rng, int(rng.integers(1, 6)), int(rng.integers(1, 15)), nc=2)
    correct = process_batch(dets, labels, IOUV).numpy()
    for k, thr in enumerate(IOUV.tolist()):
        expected = ref_match(dets.tolist(), labels.tolist(), thr)
        assert set(np.nonzero(correct[:, k])[0].tolist()) == expected
    # a label matched at a strict threshold stays matched at a looser one (maybe by another detection)
    assert (np.diff(correct.sum(0)) <= 0).all()


# ------------------------------------------------------------------ ap_per_class


def test_ap_per_class_tiny_by_hand():
    # class 0: 2 labels, two TPs; class 1: 1 label, one TP; class 2: a confident prediction but no labels
    tp = np.array([[1] * 10, [1] * 10, [1] * 10, [0] * 10], dtype=bool)
    conf, pred_cls, target_cls = np.array([0.9, 0.8, 0.7, 0.95]), np.array([0, 0, 1, 2]), np.array([0, 0, 1])
    tp_, fp_, p, r, f1, ap, classes = ap_per_class(tp, conf, pred_cls, target_cls)
    assert classes.tolist() == [0, 1] and classes.dtype.kind == "i"  # class 2 has no labels: not reported
    assert ap.shape == (2, 10) and np.allclose(ap, 0.995)
    # below conf 0.7 every reported class has P = R = 1: the smoothed mean-F1 peak lies on that plateau
    assert np.allclose(p, 1) and np.allclose(r, 1) and np.allclose(f1, 1)
    assert tp_.tolist() == [2, 1] and fp_.tolist() == [0, 0]

    # a late false positive in class 1 leaves its AP at 0.995 (the envelope is still 1 up to recall 1)
    tp = np.concatenate((tp, np.zeros((1, 10), dtype=bool)))
    out = ap_per_class(tp, np.append(conf, 0.6), np.append(pred_cls, 1), target_cls)
    _, _, p, r, f1, ap, _ = out
    assert np.allclose(ap, 0.995)
    assert np.allclose(f1, 2 * p * r / (p + r)) and (p <= 1).all() and (r <= 1).all()


def test_ap_per_class_class_without_predictions():
    tp = np.ones((1, 10), dtype=bool)
    _, _, p, r, _, ap, classes = ap_per_class(tp, np.array([0.9]), np.array([0]), np.array([0, 1, 1]))
    assert classes.tolist() == [0, 1]
    assert np.allclose(ap[1], 0) and p[1] == 0 and r[1] == 0
    assert np.allclose(ap[0], 0.995)


@pytest.mark.parametrize("seed", range(3))
def test_ap_per_class_matches_reference_on_a_small_dataset(seed):
    """Several images: per-image matching by process_batch, dataset AP per class and threshold vs the loops."""
    rng = np.random.default_rng(100 + seed)
    nc, images = 3, []
    for _ in range(6):
        images.append(random_image(rng, int(rng.integers(0, 5)), int(rng.integers(0, 10)), nc))
    stats = []
    for labels, dets in images:
        stats.append((process_batch(dets, labels, IOUV).numpy(), dets[:, 4].numpy(), dets[:, 5].numpy(), labels[:, 0]))
    tp, conf, pred_cls, target_cls = (np.concatenate(x, 0) for x in zip(*stats))
    _, _, _, _, _, ap, classes = ap_per_class(tp, conf, pred_cls, target_cls)

    # reference: the per-image matching from ref_match, then every class ranked by confidence over the dataset
    for ci, c in enumerate(classes):
        n_labels = sum(int((lab[:, 0] == c).sum()) for lab, _ in images)
        for k, thr in enumerate(IOUV.tolist()):
            ranked = []  # (conf, is_tp)
            for labels, dets in images:
                hits = ref_match(dets.tolist(), labels.tolist(), thr)
                ranked += [(float(d[4]), i in hits) for i, d in enumerate(dets) if int(d[5]) == c]
            ranked.sort(key=lambda x: -x[0])
            expected = ref_ap([t for _, t in ranked], n_labels) if ranked else 0.0
            assert ap[ci, k] == pytest.approx(expected, abs=1e-9), (c, thr)


def test_ap_per_class_plots(tmp_path):
    rng = np.random.default_rng(0)
    tp = rng.random((30, 10)) < 0.5
    out = ap_per_class(tp, rng.random(30), rng.integers(0, 2, 30), np.array([0, 0, 1, 1, 1]), plot=True,
                       save_dir=tmp_path, names={0: "a", 1: "b"}, prefix="x_")  # fmt: skip
    assert len(out) == 7
    for f in ("PR", "F1", "P", "R"):
        assert (tmp_path / f"x_{f}_curve.png").stat().st_size > 0


# ------------------------------------------------------------------ confusion matrix


def test_confusion_matrix_counts(tmp_path):
    cm = ConfusionMatrix(nc=2)
    labels = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [0, 50, 50, 60, 60]], dtype=torch.float32)
    dets = torch.tensor(
        [
            [0, 0, 10, 10, 0.9, 0],  # label 0, right class
            [20, 20, 30, 30, 0.8, 0],  # label 1 seen as class 0: wrong class
            [80, 80, 90, 90, 0.7, 1],  # nothing there: background false positive
            [0, 0, 10, 10, 0.1, 0],  # below conf 0.25: ignored
        ]
    )  # label 2 (class 0) is missed
    cm.process_batch(dets, labels)
    expected = np.zeros((3, 3))  # rows predicted, columns true, index 2 = background
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 2] = 1
    expected[2, 0] = 1
    assert np.array_equal(cm.matrix, expected)
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 1]

    cm.process_batch(None, torch.tensor([1.0, 1.0]))  # an image without detections: two misses of class 1
    assert cm.matrix[2, 1] == 2
    cm.process_batch(torch.tensor([[0, 0, 5, 5, 0.9, 1.0]]), torch.zeros((0, 5)))  # no labels: a false positive
    assert cm.matrix[1, 2] == 2
    assert cm.plot(save_dir=tmp_path, names=["a", "b"]).stat().st_size > 0
    assert ConfusionMatrix(nc=1).plot(normalize=False, save_dir=tmp_path).is_file()  # all-empty matrix


def test_confusion_matrix_one_to_one():
    cm = ConfusionMatrix(nc=1, iou_thres=0.3)
    labels = torch.tensor([[0, 0, 0, 10, 10]], dtype=torch.float32)
    dets = torch.tensor([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 9, 0.8, 0]])  # both overlap the one label
    cm.process_batch(dets, labels)
    assert cm.matrix.tolist() == [[1, 1], [0, 0]]  # one match, the other is a false positive


def test_no_global_matplotlib_state():
    """Plots draw on their own Figure: no pyplot, no backend switch, no seaborn theme (all global state)."""
    source = (ROOT / "utils" / "metrics.py").read_text()
    for banned in ("pyplot", "matplotlib.use(", "switch_backend", "sn.set(", "set_theme"):
        assert banned not in source
