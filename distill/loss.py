"""FGFI imitation loss and the adaptation layers that map student features to the teacher's channels.

Wang et al. (CVPR 2019), eq. 2-3: with s = adapt(student feature), t = teacher feature, both [B, C, H, W], and the
imitation mask I [B, 1, H, W] (distill.mask.imitation_mask, 0/1 per location),

    L_imitation = sum_{b, c, y, x} I[b, y, x] * (s[b, c, y, x] - t[b, c, y, x]) ** 2 / (2 * N_p),

N_p = sum(I), the number of imitated locations (not multiplied by C). N_p is floored at 1, so a batch without boxes
gives exactly 0 with zero gradients, never NaN. The loss is added to the detection loss with a small gain
(hyp 'imitation', 0.01).

The adaptation layer is a 3x3 convolution (stride 1, padding 1; k x k with FeatureAdapters(k=...), e.g. a cheaper
1x1) from the student's C_s channels to the teacher's C_t,
one per imitated layer (FeatureAdapters). It is trained with the student, lives beside it (its own module in the
optimizer, saved under the checkpoint's 'distill' key) and is dropped after training: the saved student is a plain
YOLOv5 model.

The adapter may run on the masked cells alone (distill/sparse.py): Adapter(x, cells).
"""

from __future__ import annotations

import torch
from torch import nn

from distill.sparse import sparse_conv


def imitation_loss(
    student: torch.Tensor | None, teacher: torch.Tensor | None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked L2 between the adapted student feature and the teacher feature, halved, per imitated location.

    Args:
        student: [B, C, H, W] adapted student feature (any float dtype; gradients flow to it), or [N, C]: its values
            at N imitated cells already picked out by the mask (the sparse path: Adapter(x, cells)).
        teacher: the teacher feature, of the student's shape (detached here: no gradient ever reaches the teacher).
        mask: [B, 1, H, W] or [B, H, W] imitation mask (0/1); None imitates every location. Not read for [N, C]
            inputs, which are the mask's cells already (so N_p = N).

    Returns:
        0-dim float32 loss, computed in float32 even under autocast; 0 when student or teacher is None.
    """
    if student is None or teacher is None:
        ref = next((x for x in (student, teacher, mask) if x is not None), None)
        return torch.zeros((), device=None if ref is None else ref.device)
    if student.shape != teacher.shape:
        raise ValueError(
            f"imitation_loss: student feature {tuple(student.shape)} and teacher feature {tuple(teacher.shape)} "
            "differ; adapt the student to the teacher's channels (FeatureAdapters) and imitate layers of equal stride"
        )
    with torch.autocast(device_type=student.device.type, enabled=False):
        student, teacher = student.float(), teacher.detach().float()
        if student.dim() == 2:  # gathered cells
            return ((student - teacher) ** 2).sum() / (2 * max(student.shape[0], 1))
        mask = torch.ones_like(student[:, :1]) if mask is None else mask.float()
        if mask.dim() == 3:
            mask = mask[:, None]
        positives = mask.sum().clamp(min=1)
        return (mask * (student - teacher) ** 2).sum() / (2 * positives)


class Adapter(nn.Module):
    """FGFI adaptation layer: k x k conv (the paper's 3x3 by default), stride 1, 'same' padding, c1 -> c2 channels.

    [B, c1, H, W] -> [B, c2, H, W]; bias but no BN or activation, so it can match any teacher feature range.
    With cells ([N] indices from masked_cells), the conv's output at those cells only: [N, c2], computed from their
    neighbourhoods (the sparse path; the same values and gradients as the dense conv there).
    """

    def __init__(self, c1: int, c2: int, k: int = 3):
        super().__init__()
        if k % 2 == 0:
            raise ValueError(f"Adapter: kernel size {k} must be odd to keep the feature map's size")
        self.conv = nn.Conv2d(c1, c2, k, 1, k // 2)

    def forward(self, x: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        if cells is None:
            return self.conv(x)
        return sparse_conv(x, cells, self.conv.weight, self.conv.bias)


class FeatureAdapters(nn.Module):
    """One Adapter per imitated layer: forward([B, C_s_i, H_i, W_i] ...) -> [[B, C_t_i, H_i, W_i] ...].

    Kept outside the student: added to the optimizer as its own parameter group, saved under ckpt['distill'].
    A single tensor is accepted (and returned) when there is one imitated layer. With cells (masked_cells' list, one
    entry per layer), a layer with cells gets the sparse [N_i, C_t_i] output, one with None the dense map.
    """

    def __init__(self, student_channels: list[int], teacher_channels: list[int], k: int = 3):
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"FeatureAdapters: {len(student_channels)} student and {len(teacher_channels)} teacher layers"
            )
        self.m = nn.ModuleList(Adapter(cs, ct, k) for cs, ct in zip(student_channels, teacher_channels))

    def forward(
        self, features: torch.Tensor | list[torch.Tensor], cells: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(features, torch.Tensor):
            if len(self.m) != 1:
                raise ValueError(f"FeatureAdapters: one feature given for {len(self.m)} imitated layers")
            return self.m[0](features, None if cells is None else cells[0])
        if len(features) != len(self.m):
            raise ValueError(f"FeatureAdapters: {len(features)} features given for {len(self.m)} imitated layers")
        cells = [None] * len(features) if cells is None else cells
        return [adapter(x, c) for adapter, x, c in zip(self.m, features, cells)]


def feature_channels(model: nn.Module, layers: list[int], imgsz: int = 64) -> list[int]:
    """Channels of the outputs of `layers`, found by running a zero [1, ch, imgsz, imgsz] image through
    model.extract_features (a DetectionModel). imgsz must be a multiple of the model's largest stride.

    Runs without grad and with every module in eval mode for the call (so BN statistics do not move), then puts
    each module's train/eval flag back.
    """
    model = getattr(model, "module", model)  # DDP -> the model
    param = next(model.parameters())
    cfg = getattr(model, "yaml", None)
    channels_in = cfg.get("ch", 3) if isinstance(cfg, dict) else 3
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            image = torch.zeros(1, channels_in, imgsz, imgsz, device=param.device, dtype=param.dtype)
            features = model.extract_features(image, list(layers))
    finally:
        for module, training in modes.items():
            module.training = training
    return [int(f.shape[1]) for f in features]
