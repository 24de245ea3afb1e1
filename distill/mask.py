"""Fine-grained imitation mask of FGFI (Wang et al., "Distilling Object Detectors with Fine-grained Feature
Imitation", CVPR 2019): where on a feature map the student should imitate the teacher.

For one ground-truth box and one feature level (an H x W map with K anchors):

1. put each of the K anchors at the centre of every cell, (x + 0.5, y + 0.5) in grid cells: H * W * K anchor boxes;
2. take the IoU of the box with each of them, and M = the largest of these H * W * K IoUs;
3. keep cell (y, x) when any of its K anchors has IoU > iou_factor * M (psi = 0.5 in the paper).

The mask of an image is the union of its boxes' cells; an image without boxes gets an all-zero mask.

How it is computed (one pass over all boxes of the batch, no loop, no host sync). A box and an anchor are
axis-aligned, so their intersection factorizes into two 1-D overlaps, inter = overlap_x(x) * overlap_y(y), where two
intervals of lengths a and b whose centres are d apart overlap by clamp(min(a, b, (a + b) / 2 - d), 0):

- M: each overlap only shrinks as the anchor centre moves away from the box centre, so every anchor's best IoU sits
  in the cell whose centre is nearest the box centre; M is read there.
- The threshold: with union = box area + anchor area - inter =: S - inter, IoU > t  <=>  inter > t * S / (1 + t).
  In a column x where overlap_x(x) = ox > 0, anchor k is kept in the rows where overlap_y > r = t * S_k / (1 + t) / ox,
  i.e. |y + 0.5 - cy| < (h + ah_k) / 2 - r, provided min(h, ah_k) > r: a run of rows around the box centre.
  All K runs of a column share that centre, so their union is one run, of the largest half-length.
- Each box thus paints one run of rows per column ([n, W] starts and ends), drawn into a [B, H + 1, W] difference
  buffer (+1 at the first row, -1 after the last) and summed down the rows with cumsum.

The work is O(n * K * W + B * H * W) instead of the O(n * K * H * W) of a dense IoU map. Decisions are those of exact
arithmetic; a cell whose IoU equals iou_factor * M to within float64 rounding may go either way.

Two simpler imitation regions, the baselines FGFI was designed to beat, share the same painting (region=...):

- "gtbox": cells whose centre (x + 0.5, y + 0.5) lies strictly inside a ground-truth box ("inside GT box" imitation);
- "full": every cell, with or without boxes (FitNets-style whole-map imitation).
"""

from __future__ import annotations

import torch


def _overlap(length_a: torch.Tensor, length_b: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Overlap of two 1-D intervals of the given lengths whose centres are `distance` apart (broadcasts)."""
    return torch.minimum(torch.minimum(length_a, length_b), (length_a + length_b) / 2 - distance).clamp(min=0)


REGIONS = ("fgfi", "gtbox", "full")
# which boxes make a level's mask: every box (the paper), those the loss assigns to the level, or auto: matched when
# several levels are imitated (all-box masks there cover most of the coarse maps and collapse training), else all
BOXES = ("auto", "all", "matched")


def imitation_mask(
    targets: torch.Tensor,
    anchors: torch.Tensor,
    shape: tuple[int, int, int],
    iou_factor: float = 0.5,
    region: str = "fgfi",
) -> torch.Tensor:
    """Imitation mask of one feature level: FGFI's (default) or one of the baseline regions.

    Args:
        targets: [n, 6] (image index, class, x, y, w, h), xywh normalized to the input image (0-1).
        anchors: [K, 2] anchor (w, h) in grid cells of this level (YOLOv5's Detect.anchors[i]).
        shape: (B, H, W) batch size and feature map height and width in cells.
        iou_factor: psi in [0, 1]; a cell is kept when one of its anchors has IoU > iou_factor * (the box's best IoU).
        region: "fgfi" (the anchor-IoU rule above), "gtbox" (cell centres strictly inside a box; anchors and
            iou_factor unused) or "full" (all ones).

    Returns:
        [B, H, W] float32 0/1 on targets' device, indexed [b, y, x]. Boxes of zero width or height add nothing.
    """
    batch_size, height, width = (int(s) for s in shape)
    device = targets.device
    if region not in REGIONS:
        raise ValueError(f"imitation_mask: region {region!r} must be one of {', '.join(REGIONS)}")
    if region == "full":
        return torch.ones(batch_size, height, width, device=device)
    if region == "gtbox":
        return _gtbox_mask(targets, (batch_size, height, width))
    if iou_factor < 0:
        raise ValueError(f"imitation_mask: iou_factor {iou_factor} must be in [0, 1]")
    if iou_factor >= 1:  # no anchor beats its box's best IoU; said here, as rounding could keep the best cell
        return torch.zeros(batch_size, height, width, device=device)
    dtype = torch.float32 if device.type == "mps" else torch.float64  # float64 keeps threshold ties rare
    x, y, w, h = targets[:, 2:6].to(dtype).unbind(1)
    cx, cy, w, h = x * width, y * height, w * width, h * height  # [n] each, grid cells (scalars: no host copy)
    aw, ah = anchors.to(device, dtype).unbind(1)  # [K] each, grid cells

    # Best IoU M of each box: in the cell whose centre is nearest the box centre, over the K anchors
    best_x = cx.floor().clamp(0, width - 1) + 0.5
    best_y = cy.floor().clamp(0, height - 1) + 0.5
    best_inter = _overlap(w[:, None], aw, (best_x - cx).abs()[:, None]) * _overlap(
        h[:, None], ah, (best_y - cy).abs()[:, None]
    )  # [n, K]
    areas = w[:, None] * h[:, None] + aw * ah  # [n, K] box area + anchor area = union + inter
    tiny = torch.finfo(dtype).tiny
    max_iou = (best_inter / (areas - best_inter).clamp(min=tiny)).amax(1)  # [n]; 0 for degenerate boxes

    # Anchor k of a cell is kept when inter > min_inter[k]; in column x that needs overlap_y > min_overlap_y
    threshold = iou_factor * max_iou[:, None]  # [n, 1]
    min_inter = threshold * areas / (1 + threshold)  # [n, K]
    columns = torch.arange(width, device=device, dtype=dtype) + 0.5
    overlap_x = _overlap(w[:, None, None], aw[:, None], (columns - cx[:, None, None]).abs())  # [n, K, W]
    min_overlap_y = min_inter[..., None] / overlap_x.clamp(min=tiny)  # [n, K, W]
    kept = (overlap_x > 0) & (torch.minimum(h[:, None], ah)[..., None] > min_overlap_y) & (max_iou > 0)[:, None, None]
    half_run = (h[:, None, None] + ah[:, None]) / 2 - min_overlap_y  # rows with |y + 0.5 - cy| < half_run
    half_run = torch.where(kept, half_run, torch.zeros_like(half_run)).amax(1)  # [n, W] union over anchors

    # Rows first..last of each box and column: smallest/largest integer y with |y + 0.5 - cy| < half_run
    first = ((cy[:, None] - half_run - 0.5).floor() + 1).clamp(min=0)
    last = ((cy[:, None] + half_run - 0.5).ceil() - 1).clamp(max=height - 1)
    return _paint(targets[:, 0], first, last, (half_run > 0) & (first <= last), (batch_size, height, width))


def matched_boxes(
    targets: torch.Tensor, anchors: torch.Tensor, shape: tuple[int, int], anchor_t: float
) -> torch.Tensor:
    """targets with the boxes that YOLOv5's loss does not assign to this level given zero width and height (so
    imitation_mask paints nothing for them); the others unchanged.

    A box is assigned to a level when one of its K anchors is within anchor_t of it in both sides' ratios,
    max(w / aw, aw / w, h / ah, ah / h) < anchor_t (utils.loss.ComputeLoss.build_targets, hyp 'anchor_t', 4.0).
    targets: [n, 6] (image, class, x, y, w, h) normalized; anchors: [K, 2] in grid cells; shape: (H, W) of the level.
    Same shape as targets, no host sync.
    """
    height, width = shape
    wh = targets[:, 4:6] * torch.tensor([width, height], device=targets.device, dtype=targets.dtype)  # grid cells
    ratio = wh[:, None] / anchors.to(targets)[None]  # [n, K, 2]
    assigned = (torch.max(ratio, 1 / ratio).amax(2) < anchor_t).any(1)  # [n]
    out = targets.clone()
    out[:, 4:6] *= assigned[:, None]
    return out


def _gtbox_mask(targets: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Cells (y, x) with x0 < x + 0.5 < x1 and y0 < y + 0.5 < y1 for some box of the image: one run of rows in
    each column whose centre is inside the box's x-range."""
    batch_size, height, width = shape
    dtype = torch.float32 if targets.device.type == "mps" else torch.float64
    x, y, w, h = targets[:, 2:6].to(dtype).unbind(1)
    x0, x1 = (x - w / 2) * width, (x + w / 2) * width  # [n] grid cells
    y0, y1 = (y - h / 2) * height, (y + h / 2) * height
    columns = torch.arange(width, device=targets.device, dtype=dtype) + 0.5
    inside_x = (columns > x0[:, None]) & (columns < x1[:, None])  # [n, W]
    first = ((y0 - 0.5).floor() + 1).clamp(min=0)[:, None].expand_as(inside_x)  # smallest y with y + 0.5 > y0
    last = ((y1 - 0.5).ceil() - 1).clamp(max=height - 1)[:, None].expand_as(inside_x)  # largest with y + 0.5 < y1
    return _paint(targets[:, 0], first, last, inside_x & (first <= last), shape)


def _paint(
    image: torch.Tensor, first: torch.Tensor, last: torch.Tensor, painted: torch.Tensor, shape: tuple[int, int, int]
) -> torch.Tensor:
    """Union of runs of rows first..last (inclusive) in each column where painted, per box: [n] image indices,
    [n, W] first / last / painted -> [B, H, W] 0/1. Drawn into a [B, H + 1, W] difference buffer (+1 at the first
    row, -1 after the last) and summed down the rows."""
    batch_size, height, width = shape
    device = painted.device
    first = torch.where(painted, first, torch.zeros_like(first)).long()
    stop = torch.where(painted, last + 1, torch.zeros_like(last)).long()
    image = image.long()[:, None]  # [n, 1]
    column = torch.arange(width, device=device)
    index = torch.cat(
        (((image * (height + 1) + first) * width + column), ((image * (height + 1) + stop) * width + column))
    )
    weight = painted.float()
    diff = torch.zeros(batch_size * (height + 1) * width, device=device)
    diff.index_add_(0, index.view(-1), torch.cat((weight, -weight)).view(-1))
    return (diff.view(batch_size, height + 1, width).cumsum(1)[:, :height] > 0).float()
