"""Detection metrics: box IoUs, average precision, the confusion matrix and fitness."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def box_iou(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: box1 [N, 4], box2 [M, 4] -> [N, M]."""
    return torchvision.ops.box_iou(box1, box2)


def bbox_iou(box1, box2, xywh: bool = True, GIoU: bool = False, DIoU: bool = False, CIoU: bool = False, eps=1e-7):
    """Element-wise IoU (or GIoU / DIoU / CIoU) of box1 [..., 4] and box2 [..., 4], returned as [..., 1].

    xywh: boxes are (x centre, y centre, w, h), else (x1, y1, x2, y2). CIoU follows Zheng et al. 2020
    (https://arxiv.org/abs/1911.08287): IoU - centre distance^2 / enclosing diagonal^2 - alpha * v.
    """
    if xywh:
        (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.chunk(4, -1), box2.chunk(4, -1)
        b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
        b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    else:
        b1_x1, b1_y1, b1_x2, b1_y2 = box1.chunk(4, -1)
        b2_x1, b2_y1, b2_x2, b2_y2 = box2.chunk(4, -1)
        w1, h1 = b1_x2 - b1_x1, (b1_y2 - b1_y1).clamp(eps)
        w2, h2 = b2_x2 - b2_x1, (b2_y2 - b2_y1).clamp(eps)

    inter = (b1_x2.minimum(b2_x2) - b1_x1.maximum(b2_x1)).clamp(0) * (
        b1_y2.minimum(b2_y2) - b1_y1.maximum(b2_y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (CIoU or DIoU or GIoU):
        return iou
    cw = b1_x2.maximum(b2_x2) - b1_x1.minimum(b2_x1)  # enclosing box
    ch = b1_y2.maximum(b2_y2) - b1_y1.minimum(b2_y1)
    if CIoU or DIoU:
        c2 = cw**2 + ch**2 + eps  # enclosing diagonal squared
        rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
        if CIoU:
            v = (4 / math.pi**2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))).pow(2)
            with torch.no_grad():
                alpha = v / (v - iou + (1 + eps))
            return iou - (rho2 / c2 + v * alpha)
        return iou - rho2 / c2
    c_area = cw * ch + eps
    return iou - (c_area - union) / c_area


# ------------------------------------------------------------------------------------------ AP and fitness

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 renamed trapz


def fitness(x: np.ndarray) -> np.ndarray:
    """Model fitness of result rows x [n, >=4] (P, R, mAP50, mAP50-95, ...): 0.1 * mAP50 + 0.9 * mAP50-95 -> [n]."""
    w = np.array([0.0, 0.0, 0.1, 0.9])
    return (np.asarray(x)[:, :4] * w).sum(1)


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box filter over a fraction f of len(y) (odd width); the ends are padded with the end values."""
    nf = round(len(y) * f * 2) // 2 + 1
    pad = np.ones(nf // 2)
    padded = np.concatenate((pad * y[0], y, pad * y[-1]), 0)
    return np.convolve(padded, np.ones(nf) / nf, mode="valid")


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Area under one precision-recall curve, YOLOv5 style.

    recall, precision: [n] cumulative curves in decreasing-confidence order. The curve gets the sentinels
    (recall 0, precision 1) and (recall 1, precision 0), precision is replaced by its envelope (the max
    precision at any higher recall), and the piecewise-linear envelope is integrated with the trapezoid rule
    at 101 evenly spaced recalls (COCO's sampling). A perfect detector therefore scores 0.995, not 1.
    Returns (ap, mpre, mrec) with the envelope and recall sentinels included.
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    ap = float(_trapezoid(np.interp(x, mrec, mpre), x))
    return ap, mpre, mrec


def ap_per_class(
    tp: np.ndarray,
    conf: np.ndarray,
    pred_cls: np.ndarray,
    target_cls: np.ndarray,
    plot: bool = False,
    save_dir: str | Path = ".",
    names: dict | list | tuple = (),
    eps: float = 1e-16,
    prefix: str = "",
):
    """Per-class precision, recall, F1 and AP over a whole dataset.

    tp: [n, k] bool, prediction i is a true positive at IoU threshold j (k = 10 for 0.5:0.95).
    conf: [n] prediction confidences; pred_cls: [n] predicted classes; target_cls: [m] classes of all labels.
    P, R and F1 are read at one confidence: the peak of the smoothed class-mean F1 curve sampled at
    1000 confidences in [0, 1]. Only classes that have labels are reported.
    Returns (tp [c], fp [c], p [c], r [c], f1 [c], ap [c, k], unique_classes [c] int), with tp / fp the counts
    implied by P and R at that confidence.
    """
    tp, conf, pred_cls = np.asarray(tp), np.asarray(conf), np.asarray(pred_cls)
    if tp.ndim == 1:
        tp = tp[:, None]
    order = np.argsort(-conf, kind="stable")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    unique_classes, nt = np.unique(np.asarray(target_cls), return_counts=True)
    nc = unique_classes.shape[0]

    px, py = np.linspace(0, 1, 1000), []  # confidence axis; precision at mAP50 on a recall axis for the PR plot
    ap, p, r = np.zeros((nc, tp.shape[1])), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    for ci, c in enumerate(unique_classes):
        i = pred_cls == c
        n_l, n_p = nt[ci], i.sum()
        if n_p == 0 or n_l == 0:
            continue
        fpc = (1 - tp[i]).cumsum(0)
        tpc = tp[i].cumsum(0)
        recall = tpc / (n_l + eps)
        precision = tpc / (tpc + fpc)
        # np.interp needs increasing x: confidences decrease, so negate both axes
        r[ci] = np.interp(-px, -conf[i], recall[:, 0], left=0)
        p[ci] = np.interp(-px, -conf[i], precision[:, 0], left=1)
        for j in range(tp.shape[1]):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if plot and j == 0:
                py.append(np.interp(px, mrec, mpre))

    f1 = 2 * p * r / (p + r + eps)
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else names
    names = dict(enumerate(v for k, v in names.items() if k in unique_classes))  # classes with labels only
    if plot:
        save_dir = Path(save_dir)
        plot_pr_curve(px, py, ap, save_dir / f"{prefix}PR_curve.png", names)
        plot_mc_curve(px, f1, save_dir / f"{prefix}F1_curve.png", names, ylabel="F1")
        plot_mc_curve(px, p, save_dir / f"{prefix}P_curve.png", names, ylabel="Precision")
        plot_mc_curve(px, r, save_dir / f"{prefix}R_curve.png", names, ylabel="Recall")

    i = smooth(f1.mean(0), 0.1).argmax()  # confidence of the best mean F1
    p, r, f1 = p[:, i], r[:, i], f1[:, i]
    tp = (r * nt).round()
    fp = (tp / (p + eps) - tp).round()
    return tp, fp, p, r, f1, ap, unique_classes.astype(int)


def process_batch(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> torch.Tensor:
    """Which detections of one image are true positives at each IoU threshold (YOLOv5's matching).

    detections: [n, 6] (x1, y1, x2, y2, conf, class), best first; labels: [m, 5] (class, x1, y1, x2, y2), in the
    same pixel space; iouv: [k] IoU thresholds. At each threshold the candidate pairs are (label, detection)
    with the same class and IoU >= threshold; each detection keeps its highest-IoU label, then each label keeps
    the lowest-index (most confident) detection left. Returns [n, k] bool on iouv's device.
    """
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    if detections.shape[0] and labels.shape[0]:
        iou = box_iou(labels[:, 1:].float(), detections[:, :4].float()).cpu().numpy()  # [m, n]
        same_class = (labels[:, 0:1] == detections[:, 5]).cpu().numpy()
        for k, thr in enumerate(iouv.tolist()):
            li, di = np.nonzero((iou >= thr) & same_class)
            if not len(li):
                continue
            matches = np.stack((li, di, iou[li, di]), 1)  # [label, detection, iou]
            if len(matches) > 1:
                matches = matches[matches[:, 2].argsort()[::-1]]
                matches = matches[np.unique(matches[:, 1], return_index=True)[1]]  # best label per detection
                matches = matches[np.unique(matches[:, 0], return_index=True)[1]]  # first detection per label
            correct[matches[:, 1].astype(int), k] = True
    return torch.tensor(correct, dtype=torch.bool, device=iouv.device)


# ------------------------------------------------------------------------------------------ confusion matrix


class ConfusionMatrix:
    """Detection confusion matrix [nc + 1, nc + 1]: rows are predicted classes, columns true classes.

    The extra last row/column is background: column nc counts false positives (a confident detection matching
    no label), row nc counts missed labels.
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.matrix = np.zeros((nc + 1, nc + 1))
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres

    def process_batch(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Add one image. detections: [n, 6] (x1, y1, x2, y2, conf, class) or None (then labels is [m] classes
        and all are missed); labels: [m, 5] (class, x1, y1, x2, y2) in the detections' pixel space."""
        if detections is None:
            for gc in labels.int().tolist():
                self.matrix[self.nc, gc] += 1
            return
        detections = detections[detections[:, 4] > self.conf]
        gt_classes = labels[:, 0].int().tolist()
        detection_classes = detections[:, 5].int().tolist()
        iou = box_iou(labels[:, 1:].float(), detections[:, :4].float()).cpu().numpy()  # [m, n]

        li, di = np.nonzero(iou > self.iou_thres)
        matches = np.stack((li, di, iou[li, di]), 1) if len(li) else np.zeros((0, 3))
        if len(matches) > 1:  # one-to-one, keeping the highest IoUs
            matches = matches[matches[:, 2].argsort()[::-1]]
            matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
            matches = matches[matches[:, 2].argsort()[::-1]]
            matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
        m0, m1 = matches[:, 0].astype(int), matches[:, 1].astype(int)

        for i, gc in enumerate(gt_classes):
            j = np.nonzero(m0 == i)[0]
            if len(j) == 1:
                self.matrix[detection_classes[m1[j[0]]], gc] += 1  # matched: right or wrong class
            else:
                self.matrix[self.nc, gc] += 1  # missed
        # YOLOv5 v7.0 skips this when nothing matched; a detection matching nothing is a false positive regardless
        for i, dc in enumerate(detection_classes):
            if not (m1 == i).any():
                self.matrix[dc, self.nc] += 1

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-class true and false positive counts [nc] (background excluded)."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def plot(self, normalize: bool = True, save_dir: str | Path = "", names: list | tuple = ()) -> Path:
        """Save a seaborn heatmap to save_dir/confusion_matrix.png (columns normalized to 1 by default)."""
        import seaborn as sn

        array = self.matrix / ((self.matrix.sum(0).reshape(1, -1) + 1e-9) if normalize else 1)
        array[array < 0.005] = np.nan  # leave near-empty cells blank instead of printing 0.00
        names = list(names)
        ticklabels = (names + ["background"]) if (0 < len(names) < 99 and len(names) == self.nc) else "auto"
        fig = Figure(figsize=(12, 9), tight_layout=True)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an all-NaN matrix warns
            sn.heatmap(
                array,
                ax=ax,
                annot=self.nc < 30,
                annot_kws={"size": 8},
                cmap="Blues",
                fmt=".2f",
                square=True,
                vmin=0.0,
                xticklabels=ticklabels,
                yticklabels=ticklabels,
            ).set_facecolor((1, 1, 1))
        ax.set_xlabel("True")
        ax.set_ylabel("Predicted")
        ax.set_title("Confusion Matrix")
        f = Path(save_dir) / "confusion_matrix.png"
        fig.savefig(f, dpi=250)
        return f

    def print(self) -> None:
        for i in range(self.nc + 1):
            print(" ".join(map(str, self.matrix[i])))


# ------------------------------------------------------------------------------------------ plots


def _figure(figsize=(9, 6)):
    """A standalone Agg figure and its axes: no global matplotlib backend or state is touched."""
    fig = Figure(figsize=figsize, tight_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_pr_curve(px: np.ndarray, py: list, ap: np.ndarray, save_dir: Path = Path("pr_curve.png"), names=()) -> None:
    """Precision (py, one [1000] curve per class) against recall px, with the mAP50 in the legend."""
    fig, ax = _figure()
    py = np.stack(py, axis=1) if len(py) else np.zeros((len(px), 0))
    if 0 < len(names) < 21:
        for i, y in enumerate(py.T):
            ax.plot(px, y, linewidth=1, label=f"{names[i]} {ap[i, 0]:.3f}")
    else:
        ax.plot(px, py, linewidth=1, color="grey")
    if py.shape[1]:
        ax.plot(px, py.mean(1), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title("Precision-Recall Curve")
    fig.savefig(save_dir, dpi=250)


def plot_mc_curve(
    px: np.ndarray,
    py: np.ndarray,
    save_dir: Path = Path("mc_curve.png"),
    names=(),
    xlabel: str = "Confidence",
    ylabel: str = "Metric",
) -> None:
    """A metric (py [c, 1000], one row per class) against confidence px, with the smoothed class mean."""
    fig, ax = _figure()
    if 0 < len(names) < 21:
        for i, y in enumerate(py):
            ax.plot(px, y, linewidth=1, label=f"{names[i]}")
    else:
        ax.plot(px, py.T, linewidth=1, color="grey")
    y = smooth(py.mean(0), 0.05)
    ax.plot(px, y, linewidth=3, color="blue", label=f"all classes {y.max():.2f} at {px[y.argmax()]:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title(f"{ylabel}-Confidence Curve")
    fig.savefig(save_dir, dpi=250)
