"""The FGFI teacher: a trained (usually larger) YOLOv5 detector whose features the student imitates.

The teacher stays outside the student: it is loaded on its own, frozen (requires_grad False), in eval mode (BN
statistics never move), fp16 on CUDA, and is never part of the student's EMA, optimizer, DDP wrapper or checkpoint;
only its path is saved (ckpt['distill']['teacher']).

Imitated layers are chosen by layer index in the model YAML (DetectionModel.imitation_points); the teacher and the
student must produce them at the same stride so the maps line up cell for cell. The channel counts may differ (a
wider teacher): FeatureAdapters bridge them. The class count may differ too, since neck features are imitated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from utils.general import LOGGER, UserError


def load_teacher(
    weights: str | Path,
    student: nn.Module,
    device: torch.device | str,
    imitation_layers: None | str | list[int] = None,
    half: bool | None = None,
    fuse: bool = True,
) -> nn.Module:
    """Load a frozen eval teacher DetectionModel for distilling `student`, checking the two are compatible.

    Args:
        weights: teacher checkpoint (.pt, YOLOv5 layout), e.g. --ft_weights.
        student: the student DetectionModel (possibly DDP-wrapped); only read.
        device: where the teacher runs (the student's device).
        imitation_layers: as DetectionModel.imitation_points: None (default point), 'detect' or layer indices;
            resolved on each model separately.
        half: fp16 teacher; default: on CUDA only.
        fuse: fold BN into the convolutions (faster; the teacher is frozen anyway).

    Returns:
        The teacher DetectionModel. Its features: teacher_features(teacher, imgs, teacher.imitation_points(layers)).

    Raises:
        UserError: the imitated layers' strides differ between teacher and student, or their counts differ.
    """
    from utils.checkpoint import attempt_load  # here, not at import: models.yolo imports distill.mask

    device = torch.device(device)
    student = getattr(student, "module", student)  # DDP -> the model
    teacher = attempt_load(weights, device=device, inplace=True, fuse=False)  # fused after the checks pass

    t_layers, s_layers = teacher.imitation_points(imitation_layers), student.imitation_points(imitation_layers)
    if len(t_layers) != len(s_layers):
        raise UserError(
            f"--ft_weights {weights}: the teacher has {len(t_layers)} imitation points {t_layers} but the student has "
            f"{len(s_layers)} {s_layers}; pick --imitation-layers that exist in both"
        )
    t_strides, s_strides = teacher.get_layer_strides(), student.get_layer_strides()
    for t, s in zip(t_layers, s_layers):
        t_stride, s_stride = t_strides[t], s_strides[s]
        if t_stride != s_stride:
            raise UserError(
                f"--ft_weights {weights}: imitated teacher layer {t} has stride {t_stride} but the student's layer {s} "
                f"has stride {s_stride}; pick --imitation-layers that match"
            )

    t_nc, s_nc = _num_classes(teacher), _num_classes(student)
    if t_nc != s_nc:
        LOGGER.warning(
            f"WARNING: --ft_weights {weights}: teacher has {t_nc} classes, student {s_nc}; distilling anyway "
            "(only neck features are imitated), but a teacher trained on the same data works best"
        )

    if fuse:
        teacher.fuse()
    teacher.requires_grad_(False)
    teacher.eval()
    if device.type == "cuda" if half is None else half:
        teacher.half()
    return teacher


def _num_classes(model: nn.Module) -> int | None:
    """Classes predicted by a DetectionModel's Detect head (last layer)."""
    return getattr(model.model[-1], "nc", None) if hasattr(model, "model") else getattr(model, "nc", None)


def teacher_features(teacher: nn.Module, imgs: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """Teacher features at `layers` for a batch, without grad: [B, 3, H, W] images (0-1) -> list of float32
    [B, C_t, H / stride, W / stride] tensors. The teacher is put back in eval mode if something switched it."""
    if teacher.training:
        teacher.eval()
    param = next(teacher.parameters())
    with torch.no_grad(), torch.autocast(device_type=param.device.type, enabled=param.device.type == "cuda"):
        features = teacher.extract_features(imgs.to(param.device, param.dtype), list(layers))
    return [f.float() for f in features]
