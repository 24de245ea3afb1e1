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

The sparse path. The loss reads the adapted feature only where I = 1, typically a quarter of the cells or fewer, but
a dense conv computes it everywhere (on CPU the 3x3 adapter alone cost ~40% of a yolov5n training step). So where the
masked share of a level is below SPARSE_MAX_SHARE, the adapter runs on the masked cells alone: masked_cells lists
them (the step's one host sync, for their count), Adapter(x, cells) -> sparse_conv gathers each cell's k x k
neighbourhood of the student feature (zeros beyond the border, as the conv's padding) as a row of k * k * C_s values
and multiplies the rows by the conv weight as a [C_t, k * k * C_s] matrix, and gather_cells picks the teacher feature
at the same cells; imitation_loss of the two [N, C_t] matrices is the dense value, and the gradients reaching the
student feature, the weight and the bias are the dense path's, to float32 rounding (tests/test_distill_sparse.py).
On CPU (float32) _CellConv does the same in chunks of cells, with the products run by oneDNN; elsewhere (CUDA,
autocast) it is the plain autograd composition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Sparse adapter when a level's masked share is below this, dense conv otherwise. Measured on CPU (2-core AMD EPYC,
# 3x3 adapter 128 -> 256 channels on a [16, 40, 40] map; benchmarks/RESULTS.md, two sweeps): the sparse path costs
# 0.42-0.47 of the dense conv at 30% of the cells, 0.82-0.84 at 60%, and breaks even at 79-85%. Re-measure on other
# hardware with python benchmarks/bench_train_step.py --sweep (no GPU has been measured).
SPARSE_MAX_SHARE = 0.75


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


def masked_cells(masks: list[torch.Tensor], max_share: float = SPARSE_MAX_SHARE) -> list[torch.Tensor | None]:
    """The cells each level imitates, for the sparse path: [N] int64 indices into the flattened [B, H, W] mask
    (b * H * W + y * W + x), in that order; None for a level whose masked share is max_share or more (the dense conv
    is cheaper there). masks: [B, 1, H, W] or [B, H, W] 0/1 per level.

    Reads the levels' masked-cell counts in one host sync (the only one the distillation step adds).
    """
    counts = torch.stack([m.count_nonzero() for m in masks]).tolist() if masks else []
    return [
        torch.nonzero_static(m.flatten(), size=n).squeeze(1) if n < max_share * m.numel() else None
        for m, n in zip(masks, counts)
    ]


def gather_cells(x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] feature at the given cells -> [N, C]; cells: [N] indices into [B, H, W] (masked_cells)."""
    hw = x.shape[2] * x.shape[3]
    return x.flatten(2)[cells // hw, :, cells % hw]


def neighbourhoods(x: torch.Tensor, cells: torch.Tensor, k: int) -> torch.Tensor:
    """Each cell's k x k neighbourhood of a [B, C, H, W] feature as one row: [N, k * k * C], ordered (dy, dx, c).

    Beyond the border it reads zeros, as a conv with padding k // 2 does. Backward scatters into the feature.
    """
    return _gather_rows(_padded_rows(x, k), _neighbour_index(x.shape, cells, k))


def _padded_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, C, H, W] -> [B * (H + 2r) * (W + 2r), C]: channels last, zero-padded by r = k // 2 on every side."""
    r = k // 2
    return F.pad(x.permute(0, 2, 3, 1), (0, 0, r, r, r, r)).reshape(-1, x.shape[1])


def _neighbour_index(shape: torch.Size, cells: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k * k] rows of _padded_rows(x, k) that form each cell's neighbourhood, ordered (dy, dx)."""
    _, _, h, w = shape
    hp, wp = h + k - 1, w + k - 1
    # the neighbourhood's top-left corner in the padded map is the cell itself in unpadded coordinates
    corner = (cells // (h * w) * hp + cells // w % h) * wp + cells % w
    offsets = (torch.arange(k, device=cells.device)[:, None] * wp + torch.arange(k, device=cells.device)).flatten()
    return corner[:, None] + offsets


def _gather_rows(padded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The neighbourhood rows `index` [N, k * k] names in `padded` [*, C], each flattened: [N, k * k * C]."""
    return padded.index_select(0, index.flatten()).view(len(index), index.shape[1] * padded.shape[1])


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight [O, C, k, k] -> [O, k * k * C], ordered (dy, dx, c) as the neighbourhood rows."""
    return weight.permute(0, 2, 3, 1).reshape(len(weight), -1)


def sparse_conv(x: torch.Tensor, cells: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=k // 2) at the given cells only: [B, C, H, W] -> [N, O] (cells: [N] indices
    into [B, H, W]; weight [O, C, k, k]). Gradients reach x, weight and bias as the dense conv's would.

    float32 on CPU runs _CellConv (chunked, matmuls as oneDNN 1x1 convs); anything else (CUDA, autocast, float64)
    the plain autograd composition of neighbourhoods and F.linear.
    """
    if x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and len(cells):
        return _CellConv.apply(x, cells, weight, bias)
    rows = neighbourhoods(x, cells, weight.shape[-1])
    return F.linear(rows, _weight_matrix(weight).to(rows.dtype), None if bias is None else bias.to(rows.dtype))


def _conv_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [O, K]^T (+ bias) as a 1x1 conv over channels_last views of the two row-major matrices: on CPU
    oneDNN runs it, measured 2.4x faster than the BLAS matmul behind F.linear on the AVX-512 AMD EPYC of
    benchmarks/RESULTS.md (a weight gradient, G^T @ rows, was no faster this way and stays a matmul)."""
    m, k = a.shape
    a, b = a.contiguous(), b.contiguous()
    out = F.conv2d(a.view(1, m, 1, k).permute(0, 3, 1, 2), b.view(len(b), 1, 1, k).permute(0, 3, 1, 2), bias)
    return out.permute(0, 2, 3, 1).reshape(m, len(b))


class _CellConv(torch.autograd.Function):
    """sparse_conv for float32 on CPU, in chunks of cells: no [N, k * k * C] matrix is ever held (backward gathers
    the neighbourhoods again, chunk by chunk), so the step allocates no block large enough for the C allocator to
    map it fresh from the OS (and page-fault it in) every step."""

    CHUNK = 2048  # cells per chunk: [2048, 1152] float32 rows = 9.4 MB for the 3x3 adapter of yolov5n

    @staticmethod
    def forward(ctx, x: torch.Tensor, cells: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        k = weight.shape[-1]
        padded, index = _padded_rows(x, k), _neighbour_index(x.shape, cells, k)
        matrix = _weight_matrix(weight)
        out = torch.cat(
            [_conv_matmul(_gather_rows(padded, rows), matrix, bias) for rows in index.split(_CellConv.CHUNK)]
        )
        ctx.save_for_backward(padded, index, matrix)
        ctx.x_shape, ctx.k, ctx.has_bias = x.shape, k, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        padded, index, matrix = ctx.saved_tensors
        (b, c, h, w), k = ctx.x_shape, ctx.k
        grad = grad.contiguous()
        grad_padded, grad_matrix = torch.zeros_like(padded), torch.zeros_like(matrix)
        matrix_t = matrix.t().contiguous()
        for rows, g in zip(index.split(_CellConv.CHUNK), grad.split(_CellConv.CHUNK)):
            grad_matrix.addmm_(g.t(), _gather_rows(padded, rows))
            grad_padded.index_add_(0, rows.flatten(), _conv_matmul(g, matrix_t).view(rows.numel(), c))
        r = k // 2
        grad_x = grad_padded.view(b, h + 2 * r, w + 2 * r, c)[:, r : r + h, r : r + w].permute(0, 3, 1, 2)
        grad_weight = grad_matrix.view(-1, k, k, c).permute(0, 3, 1, 2)
        grad_bias = grad.sum(0) if ctx.has_bias else None
        return grad_x, None, grad_weight, grad_bias


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
