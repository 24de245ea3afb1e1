"""Where a model is imitated: its imitated layers (by index, as the model YAML numbers them), the Detect level each
layer's mask comes from, and the patched forward that returns (preds, feature, mask).

DetectionModel.forward(x, target=...) and its imitation_points / imitation_levels methods call into here, so the
model file stays plain YOLOv5 and the whole method is readable in distill/.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from models.yolo import _as_number  # the stride formatting of the model's own messages
from utils.general import UserError

LayerSpec = Union[None, int, str, list]  # None: the default point, 'detect': Detect's inputs, or layer indices


def imitation_points(model: nn.Module, imitation_layers: LayerSpec = None) -> list[int]:
    """Resolve imitation_layers to layer indices of a DetectionModel.

    None: the default FGFI point, the input of the layer that feeds Detect's first (highest resolution) input:
    layer 16 (the stride-8 Concat) in yolov5s.yaml, layer 22 in the P6 models. 'neck': the same point at every
    Detect level (16, 19, 22 in yolov5s.yaml: the Concats before each level's C3). 'detect': Detect's inputs
    (17, 20, 23). An int or a list of ints: those layers.
    """
    detect_i = len(model.model) - 1
    detect_from = [j % detect_i if j < 0 else j for j in _as_list(model.model[-1].f)]  # -1 -> detect_i - 1
    if imitation_layers is None:
        return [_input_of(model, detect_from[0])]
    if isinstance(imitation_layers, str):
        kind = imitation_layers.strip().lower()
        if kind == "neck":
            return [_input_of(model, j) for j in detect_from]
        if kind != "detect":
            raise UserError(
                f"--imitation-layers '{imitation_layers}' is not valid: use 'detect', 'neck' or layer indices"
            )
        return detect_from
    layers = _as_list(imitation_layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < detect_i:
            raise UserError(f"imitation layer {i!r} is not valid: use layer indices 0..{detect_i - 1}")
    if not layers:
        raise UserError("--imitation-layers is empty: give at least one layer index, or 'detect'")
    return layers


def imitation_levels(model: nn.Module, points: list[int]) -> list[int]:
    """For each layer index, the Detect level with the same stride (whose anchors make its mask)."""
    strides = model.get_layer_strides()
    detect_strides = [float(s) for s in model.model[-1].stride]
    levels = []
    for i in points:
        hits = [k for k, s in enumerate(detect_strides) if strides[i] is not None and abs(s - strides[i]) < 1e-6]
        if not hits:
            raise UserError(
                f"imitation layer {i} has stride {strides[i]}, but the Detect levels have strides "
                f"{[_as_number(s) for s in detect_strides]}: pick layers at one of those strides"
            )
        levels.append(hits[0])
    return levels


def forward_imitation(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    imitation_layers: LayerSpec = None,
    iou_factor: float = 0.5,
    region: str = "fgfi",
    anchor_t: float | None = None,
):
    """DetectionModel.forward(x, target=...): (preds, feature, mask) for FGFI.

    preds: the model's usual output for its mode; feature: the imitated layer's output [B, C, h, w]; mask:
    distill.mask.imitation_mask of the targets ([n, 6] (image, class, x, y, w, h), xywh normalized) with the anchors
    of the Detect level of that layer's stride, [B, 1, h, w] 0/1 float. One tensor each for imitation_layers None
    (the default point) or an int, lists (one entry per layer) for a list of ints or 'detect'. anchor_t: each
    level's mask from the boxes YOLOv5's loss assigns to that level only (distill.mask.matched_boxes); None: from
    every box (the paper).
    """
    from distill.mask import imitation_mask, matched_boxes

    points = imitation_points(model, imitation_layers)
    levels = imitation_levels(model, points)
    preds, feats = model._run(x, keep=set(points))
    anchors = model.model[-1].anchors
    features, masks = [], []
    for i, level in zip(points, levels):
        f = feats[i]
        boxes = target if anchor_t is None else matched_boxes(target, anchors[level], f.shape[2:], anchor_t)
        mask = imitation_mask(boxes, anchors[level], (f.shape[0], f.shape[2], f.shape[3]), iou_factor, region)
        features.append(f)
        masks.append(mask.to(f.device).unsqueeze(1))
    if imitation_layers is None or isinstance(imitation_layers, int):
        return preds, features[0], masks[0]
    return preds, features, masks


def _input_of(model: nn.Module, feeder: int) -> int:
    """The layer whose output feeds layer `feeder` (its single input), or feeder itself when it merges several."""
    src = model.model[feeder].f
    if not isinstance(src, int):
        return feeder
    return src % feeder if src < 0 else src


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]
