"""AutoAnchor: check that the model's anchors fit the dataset's boxes, and evolve new ones when they don't.

Fit is measured with YOLOv5's ratio metric: a box and an anchor match when both side ratios lie within
1/thr..thr (thr = hyp['anchor_t']), the same rule the loss uses to assign targets.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from utils.general import LOGGER, check_dataset, colorstr

PREFIX = colorstr("AutoAnchor: ")


def check_anchor_order(m: nn.Module) -> None:
    """Flip Detect m's anchors ([nl, na, 2]) in place if their mean area per level runs against the stride order."""
    a = m.anchors.prod(-1).mean(-1).view(-1)  # mean anchor area per level
    da = a[-1] - a[0]
    ds = m.stride[-1] - m.stride[0]
    if da and (da.sign() != ds.sign()):
        LOGGER.info(f"{PREFIX}Reversing anchor order")
        m.anchors[:] = m.anchors.flip(0)


def _label_wh(dataset, img_size: int) -> np.ndarray:
    """Box sizes [n, 2] in pixels after resizing each image's long side to img_size."""
    shapes = img_size * dataset.shapes / dataset.shapes.max(1, keepdims=True)
    return np.concatenate([lb[:, 3:5] * s for s, lb in zip(shapes, dataset.labels)]).reshape(-1, 2)


def _ratio_metric(k: torch.Tensor, wh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (box, anchor) the worse of the two side ratios min(r, 1/r) [n, K], and the best anchor's value [n]."""
    r = wh[:, None] / k[None]
    x = torch.min(r, 1 / r).min(2)[0]
    return x, x.max(1)[0]


def check_anchors(dataset, model: nn.Module, thr: float = 4.0, imgsz: int = 640) -> None:
    """Measure the best possible recall (BPR) of the model's anchors on the dataset's boxes; below 0.98, evolve
    new anchors with kmean_anchors and keep them if their BPR is higher.

    Args:
        dataset: object with .shapes (np [N, 2] image w, h in pixels) and .labels (list of np [n, 5] class, xywhn).
        model: DetectionModel (or DDP-wrapped); its Detect anchors ([nl, na, 2] in grid cells) are updated in place.
        thr: anchor-target side ratio threshold, hyp['anchor_t'].
        imgsz: training image size in pixels.
    """
    m = model.module.model[-1] if hasattr(model, "module") else model.model[-1]  # Detect
    scale = np.random.uniform(0.9, 1.1, size=(dataset.shapes.shape[0], 1))  # mimic scale augmentation
    shapes = imgsz * dataset.shapes / dataset.shapes.max(1, keepdims=True)
    wh = torch.tensor(np.concatenate([lb[:, 3:5] * s for s, lb in zip(shapes * scale, dataset.labels)])).float()
    wh = wh.reshape(-1, 2)

    def metric(k):  # -> best possible recall, anchors above threshold per target
        x, best = _ratio_metric(k, wh)
        return (best > 1 / thr).float().mean(), (x > 1 / thr).float().sum(1).mean()

    stride = m.stride.to(m.anchors.device).view(-1, 1, 1)
    anchors = m.anchors.clone() * stride  # pixels
    bpr, aat = metric(anchors.cpu().view(-1, 2))
    s = f"\n{PREFIX}{aat:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr > 0.98:
        LOGGER.info(f"{s}Current anchors are a good fit to dataset")
        return
    LOGGER.info(f"{s}Anchors are a poor fit to dataset, attempting to improve...")
    na = m.anchors.numel() // 2
    new = kmean_anchors(dataset, n=na, img_size=imgsz, thr=thr, gen=1000, verbose=False)
    new_bpr = metric(torch.from_numpy(new))[0]
    if new_bpr > bpr:
        new = torch.tensor(new, device=m.anchors.device).type_as(m.anchors)
        m.anchors[:] = new.clone().view_as(m.anchors)
        check_anchor_order(m)  # sorted by area, so ascending: flips only for a model with descending strides
        m.anchors /= stride  # back to grid cells
        LOGGER.info(f"{PREFIX}Done (optional: update the model *.yaml to use these anchors in the future)")
    else:
        LOGGER.info(f"{PREFIX}Done (original anchors better than new anchors, proceeding with original anchors)")


def kmean_anchors(
    dataset="./data/coco128.yaml", n: int = 9, img_size: int = 640, thr: float = 4.0, gen: int = 1000, verbose=True
) -> np.ndarray:
    """Anchors for a dataset: k-means on the box sizes, then a genetic search on the mean matched ratio.

    Args:
        dataset: path to a data YAML (its train split is loaded) or an object with .shapes and .labels
            (see check_anchors).
        n: number of anchors.
        img_size: training image size in pixels.
        thr: anchor-target side ratio threshold, hyp['anchor_t'].
        gen: generations of the genetic search.
        verbose: log the anchors after every improvement.

    Returns:
        np.float32 [n, 2] anchors (w, h) in pixels, sorted by area, small to large.
    """
    from scipy.cluster.vq import kmeans  # scipy is only needed here

    npr = np.random
    thr = 1 / thr

    def anchor_fitness(k):  # mean best ratio over boxes, counting only matches past the threshold
        _, best = _ratio_metric(torch.tensor(k, dtype=torch.float32), wh)
        return (best * (best > thr).float()).mean()

    def print_results(k, verbose=True):
        k = k[np.argsort(k.prod(1))]
        x, best = _ratio_metric(torch.tensor(k, dtype=torch.float32), wh0)
        bpr, aat = (best > thr).float().mean(), (x > thr).float().mean() * n
        s = (
            f"{PREFIX}thr={thr:.2f}: {bpr:.4f} best possible recall, {aat:.2f} anchors past thr\n"
            f"{PREFIX}n={n}, img_size={img_size}, metric_all={x.mean():.3f}/{best.mean():.3f}-mean/best, "
            f"past_thr={x[x > thr].mean():.3f}-mean: "
        )
        s += ", ".join(f"{round(w)},{round(h)}" for w, h in k)
        if verbose:
            LOGGER.info(s)
        return k

    if isinstance(dataset, (str, Path)):  # data YAML
        from utils.dataloaders import LoadImagesAndLabels

        data = check_dataset(dataset)
        dataset = LoadImagesAndLabels(data["train"], img_size=img_size, rect=True)

    wh0 = _label_wh(dataset, img_size)
    i = (wh0 < 3.0).any(1).sum()
    if i:
        LOGGER.warning(
            f"{PREFIX}WARNING: Extremely small objects found: {i} of {len(wh0)} labels are <3 pixels in size"
        )
    wh = wh0[(wh0 >= 2.0).any(1)].astype(np.float32)  # drop boxes under 2 pixels on both sides

    try:
        LOGGER.info(f"{PREFIX}Running kmeans for {n} anchors on {len(wh)} points...")
        assert n <= len(wh), "fewer boxes than anchors"
        s = wh.std(0)  # whiten, so both sides weigh the same in the k-means distance
        k = kmeans(wh / s, n, iter=30)[0] * s
        assert n == len(k), "k-means returned fewer clusters"
    except Exception:
        LOGGER.warning(f"{PREFIX}WARNING: switching strategies from kmeans to random init")
        k = np.sort(npr.rand(n * 2)).reshape(n, 2) * img_size
    wh, wh0 = (torch.tensor(x, dtype=torch.float32) for x in (wh, wh0))
    k = print_results(k, verbose=False)

    # Genetic search: multiply anchors by random factors, keep a mutation when fitness improves
    f, sh, mp, s = anchor_fitness(k), k.shape, 0.9, 0.1  # fitness, shape, mutation probability, sigma
    pbar = tqdm(range(gen), desc=f"{PREFIX}Evolving anchors with Genetic Algorithm")
    for _ in pbar:
        v = np.ones(sh)
        while (v == 1).all():  # mutate until something changes
            v = ((npr.random(sh) < mp) * random.random() * npr.randn(*sh) * s + 1).clip(0.3, 3.0)
        kg = (k.copy() * v).clip(min=2.0)
        fg = anchor_fitness(kg)
        if fg > f:
            f, k = fg, kg.copy()
            pbar.desc = f"{PREFIX}Evolving anchors with Genetic Algorithm: fitness = {f:.4f}"
            if verbose:
                print_results(k, verbose)
    return print_results(k).astype(np.float32)
