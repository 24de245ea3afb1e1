"""The FGFI teacher: a trained (usually larger) YOLOv5 detector whose features the student imitates.

The teacher stays outside the student: it is loaded on its own, frozen (requires_grad False), in eval mode (BN
statistics never move), fp16 on CUDA (bf16 on a CPU with AMX matrix units: the Distiller's precision), and is never
part of the student's EMA, optimizer, DDP wrapper or checkpoint; only its path is saved (ckpt['distill']['teacher']).

Imitated layers are chosen by layer index in the model YAML (DetectionModel.imitation_points), the teacher's either
resolved from the same spec or given on their own (another architecture: --imitation-layers 17,20,23:23,26,29), and
paired one by one (match_layers): each pair must have the same stride so the maps line up cell for cell, and shared
explicit indices must name the same kind of layer in both. The channel counts may differ (a wider teacher):
FeatureAdapters bridge them. The class count may differ too, since neck features are imitated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from utils.checkpoint import attempt_load
from utils.general import LOGGER, UserError


def load_teacher(
    weights: str | Path,
    student: nn.Module,
    device: torch.device | str,
    imitation_layers: None | str | list[int] = None,
    half: bool | None = None,
    fuse: bool = True,
    teacher_layers: None | str | list[int] = None,
    dtype: torch.dtype | None = None,
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
        teacher_layers: the teacher's own layer indices, paired one by one with the student's (another
            architecture); None resolves imitation_layers on the teacher too (see match_layers).
        dtype: the teacher's dtype, e.g. torch.bfloat16 on a CPU with AMX (Distiller's precision 'bf16'); None: fp16
            where half (by default on CUDA), float32 otherwise. Detect's anchors stay float32 whatever the dtype
            (bfloat16 would round some, e.g. 373 / 32, and a student adopting the teacher's anchors copies them).

    Returns:
        The teacher DetectionModel. Its features: teacher_features(teacher, imgs, teacher.imitation_points(layers)).

    Raises:
        UserError: the imitated layers' strides differ between teacher and student, or their counts differ.
    """
    device = torch.device(device)
    student = getattr(student, "module", student)  # DDP -> the model
    teacher = attempt_load(weights, device=device, inplace=True, fuse=False)  # fused after the checks pass

    match_layers(teacher, student, imitation_layers, teacher_layers, weights)

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
    if dtype is None and (device.type == "cuda" if half is None else half):
        dtype = torch.float16
    if dtype is not None and dtype != torch.float32:
        head = teacher.model[-1]
        anchors = head.anchors.clone()
        teacher.to(dtype)
        head.anchors = anchors
    return teacher


def match_layers(
    teacher: nn.Module,
    student: nn.Module,
    imitation_layers: None | str | list[int] = None,
    teacher_layers: None | str | list[int] = None,
    weights: str | Path = "teacher",
) -> tuple[list[int], list[int]]:
    """Pair the student's imitated layers with the teacher's: ([student layer indices], [teacher layer indices]).

    imitation_layers is resolved on the student (None: its default point, 'detect': its Detect inputs, or indices);
    teacher_layers on the teacher, by default the same spec. Shared explicit indices must name the same kind of layer
    in both models (same module type, same inputs), or a teacher of another architecture would imitate an unrelated
    layer. Each pair must have the same stride (the maps line up cell for cell); channels may differ (adapters).

    Raises:
        UserError naming the flag and which model (student or teacher) lacks or mismatches a layer.
    """
    student = getattr(student, "module", student)  # DDP -> the model
    s_layers = _resolve(student, imitation_layers, "student")
    t_layers = _resolve(teacher, imitation_layers if teacher_layers is None else teacher_layers, f"teacher {weights}")
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
        if teacher_layers is None and isinstance(imitation_layers, (list, tuple)):
            t_kind, s_kind = _layer_kind(teacher.model[t]), _layer_kind(student.model[s])
            if t_kind != s_kind:
                raise UserError(
                    f"--imitation-layers {s}: the teacher's layer {t} is {t_kind} but the student's is {s_kind} "
                    f"(another architecture); give the teacher's indices after a colon, e.g. 17,20,23:23,26,29"
                )
    return s_layers, t_layers


def _resolve(model: nn.Module, layers: None | str | list[int], who: str) -> list[int]:
    """model.imitation_points(layers), its error prefixed with whose layers they are."""
    try:
        return model.imitation_points(layers)
    except UserError as e:
        raise UserError(f"--imitation-layers: the {who} has no such layer: {e}") from None


def _layer_kind(m: nn.Module) -> str:
    """A layer's module type and inputs, e.g. 'a C3 of layer -1'."""
    return f"a {type(m).__name__} of layer {m.f}"


def _num_classes(model: nn.Module) -> int | None:
    """Classes predicted by a DetectionModel's Detect head (last layer)."""
    return getattr(model.model[-1], "nc", None) if hasattr(model, "model") else getattr(model, "nc", None)


def teacher_features(
    teacher: nn.Module, imgs: torch.Tensor, layers: list[int], float32: bool = True
) -> list[torch.Tensor]:
    """Teacher features at `layers` for a batch, without grad: [B, 3, H, W] images (0-1) -> list of float32
    [B, C_t, H / stride, W / stride] tensors (float32=False: the teacher's own dtype, fp16 on CUDA, for a caller that
    reads only some cells and converts those). The teacher is put back in eval mode if something switched it."""
    if teacher.training:
        teacher.eval()
    param = next(teacher.parameters())
    with torch.no_grad(), torch.autocast(device_type=param.device.type, enabled=param.device.type == "cuda"):
        features = teacher.extract_features(imgs.to(param.device, param.dtype), list(layers))
    return [f.float() for f in features] if float32 else features


def teacher_outputs(
    teacher: nn.Module, imgs: torch.Tensor, layers: list[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's whole forward without grad, for the output terms: (features at `layers` in the teacher's dtype,
    as teacher_features(float32=False); raw head outputs, per level [B, na, h, w, 5 + nc] logits, as the student's
    training output). The head is read raw (no decoding into boxes: the terms decode what they need)."""
    if teacher.training:
        teacher.eval()
    param = next(teacher.parameters())
    head = teacher.model[-1]
    with torch.no_grad(), torch.autocast(device_type=param.device.type, enabled=param.device.type == "cuda"):
        head.training = True  # only the head: raw outputs; the rest stays in eval mode (BN statistics frozen)
        try:
            preds, features = teacher.forward_intermediates(imgs.to(param.device, param.dtype), list(layers))
        finally:
            head.training = False
    return features, preds


def check_heads(teacher: nn.Module, student: nn.Module, weights: str | Path = "teacher", same_anchors: bool = True):
    """Output distillation compares the two heads anchor by anchor: refuse (one UserError naming what differs and
    the fix) a teacher with other classes, levels, anchors per level or strides, and, when same_anchors (the
    objectness/class term: an anchor's scores mean "an object of this anchor's shape"), other anchor sizes. Box
    distillation alone compares decoded boxes, so other anchor sizes are fine for it."""
    t, s = teacher.model[-1], student.model[-1]
    fix = (
        "use a teacher trained on the same classes with the same head, or FGFI alone (--kd-weight 0 --box-kd-weight 0)"
    )
    for what, tv, sv in (
        ("classes", t.nc, s.nc),
        ("detection levels", t.nl, s.nl),
        ("anchors per level", t.na, s.na),
        ("strides", [float(x) for x in t.stride], [float(x) for x in s.stride]),
    ):
        if tv != sv:
            raise UserError(f"--ft_weights {weights}: output distillation needs the student's head, but the teacher "
                            f"has {what} {tv} and the student {sv}; {fix}")  # fmt: skip
    if same_anchors:
        ta, sa = (
            t.anchors.float().cpu() * t.stride.view(-1, 1, 1).cpu(),
            s.anchors.float().cpu() * s.stride.view(-1, 1, 1).cpu(),
        )
        if not torch.allclose(ta, sa, rtol=1e-2, atol=0.5):
            raise UserError(
                f"--ft_weights {weights}: --kd-weight compares objectness and class scores anchor by anchor, but the "
                f"teacher's anchors (pixels) {ta.round().int().view(t.nl, -1).tolist()} differ from the student's "
                f"{sa.round().int().view(s.nl, -1).tolist()} (AutoAnchor?); train the student with the teacher's "
                "anchors (--noautoanchor and a model YAML with them), or use --box-kd-weight alone"
            )
