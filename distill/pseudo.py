"""Pseudo-boxes: the teacher's confident detections on an unlabelled image, in the layout of training targets.

FGFI's imitation mask is built from boxes (distill/mask.py). On an image nobody labelled the teacher supplies them:
its raw head outputs are decoded as YOLOv5's Detect decodes them at inference, kept above a confidence threshold
(--pseudo-conf: objectness x class probability, as detect.py's --conf-thres) and thinned by NMS (torchvision's, via
utils.general.non_max_suppression). The result is [n, 6] (image, class, x, y, w, h normalized), exactly what a label
file gives after the loader, so the mask of a pseudo-box is the mask of the same box given as a label.
"""

from __future__ import annotations

import torch

from utils.general import non_max_suppression, xyxy2xywhn

PSEUDO_IOU = 0.45  # NMS IoU threshold of the pseudo-boxes (detect.py's default --iou-thres)


def decode_outputs(head: torch.nn.Module, raw: list[torch.Tensor]) -> torch.Tensor:
    """A Detect head's raw training outputs (per level [B, na, H, W, 5 + nc] logits) -> its inference tensor
    [B, N, 5 + nc]: xywh in input pixels, sigmoid objectness and class scores (Detect.forward's eval branch)."""
    out = []
    for i, x in enumerate(raw):
        bs, na, ny, nx, no = x.shape
        grid, anchor_grid = head._make_grid(nx, ny, i)
        xy, wh, conf = x.float().sigmoid().split((2, 2, no - 4), 4)
        xy = (xy * 2 + grid.to(x.device)) * head.stride[i].to(x.device)
        wh = (wh * 2) ** 2 * anchor_grid.to(x.device)
        out.append(torch.cat((xy, wh, conf), 4).view(bs, na * nx * ny, no))
    return torch.cat(out, 1)


def pseudo_targets(
    head: torch.nn.Module, raw: list[torch.Tensor], shape: tuple[int, int], conf: float, iou: float = PSEUDO_IOU
) -> torch.Tensor:
    """The teacher's detections above `conf` after NMS, as targets [n, 6] (image index, class, x, y, w, h), xywh
    normalized to the image shape (h, w) and clipped to it. conf 1 (or above every score) gives no boxes."""
    with torch.no_grad():
        dets = non_max_suppression(decode_outputs(head, raw), conf_thres=conf, iou_thres=iou)
    h, w = shape
    rows = []
    for i, d in enumerate(dets):
        if len(d):
            xywh = xyxy2xywhn(d[:, :4].clone(), w=w, h=h, clip=True)
            index = torch.full((len(d), 1), i, dtype=xywh.dtype, device=xywh.device)
            rows.append(torch.cat((index, d[:, 5:6], xywh), 1))
    if not rows:
        return torch.zeros((0, 6), device=raw[0].device)
    return torch.cat(rows).float()
