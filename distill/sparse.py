"""The sparse adapter: FGFI's adapter conv evaluated at the masked cells only.

The loss (distill/loss.py imitation_loss) reads the adapted feature only where I = 1, typically a quarter of the cells or fewer, but
a dense conv computes it everywhere (on CPU the 3x3 adapter alone cost ~40% of a yolov5n training step). So where the
masked share of a level is below SPARSE_MAX_SHARE, the adapter runs on the masked cells alone: masked_cells lists
them (the step's one host sync, for their count), Adapter(x, cells) -> sparse_conv gathers each cell's k x k
neighbourhood of the student feature (zeros beyond the border, as the conv's padding) as a row of k * k * C_s values
and multiplies the rows by the conv weight as a [C_t, k * k * C_s] matrix, and gather_cells picks the teacher feature
at the same cells; imitation_loss of the two [N, C_t] matrices is the dense value, and the gradients reaching the
student feature, the weight and the bias are the dense path's, to float32 rounding (tests/test_distill_sparse.py).
On CPU _CellConv does the same, with the products in float32 (run by oneDNN, in chunks of cells) or, under CPU
autocast (the Distiller's bf16 precision on CPUs with AMX matrix units), in bfloat16 with float32 sums of the
gradients; elsewhere (CUDA when asked for: by default CUDA runs the dense conv, default_max_share; float64) it is the
plain autograd composition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.fast import use_fast_kernels

# Sparse adapter when a level's masked share is below this, dense conv otherwise. Measured on CPU (2-core AMD EPYC,
# 3x3 adapter 128 -> 256 channels on a [16, 40, 40] map; benchmarks/RESULTS.md, two sweeps): the sparse path costs
# 0.42-0.47 of the dense conv at 30% of the cells, 0.82-0.84 at 60%, and breaks even at 79-85%. Re-measure on other
# hardware with python benchmarks/bench_train_step.py --sweep (no GPU has been measured). The 2-core Xeon of 2026-12
# gave 0.82 in float32.
SPARSE_MAX_SHARE = 0.75
# The same under the bf16 precision (CPUs with AMX: the Distiller's precision 'bf16'), where the dense conv gains more
# from bf16 than the gathers do: the crossover was 0.58 and 0.60 in two sweeps on the 2-core Xeon (sparse 0.59 of the
# dense conv at 30% of the cells, 0.85 at 50%).
SPARSE_MAX_SHARE_BF16 = 0.55


def default_max_share(device: torch.device | str, bf16: bool = False) -> float:
    """SPARSE_MAX_SHARE on CPU (SPARSE_MAX_SHARE_BF16 with the adapter's products in bf16), where they were measured;
    0 (always the dense conv) elsewhere until measured there.

    On CUDA the generic sparse path keeps the whole [N, k * k * C_s] neighbourhood matrix for backward, which under
    bf16 autocast can exceed the dense conv's memory (read from the code: 84-124 MiB vs 65 MiB at 50-74% masked cells
    for yolov5s layer 16 -> 512 channels at 4 x 80 x 80), and the crossover was never measured on a GPU. The dense
    path also needs no host sync. Re-measure with benchmarks/bench_train_step.py --sweep and pass
    Distiller(sparse_max_share=...) to use it there.
    """
    if torch.device(device).type != "cpu":
        return 0.0
    return SPARSE_MAX_SHARE_BF16 if bf16 else SPARSE_MAX_SHARE


def masked_cells(masks: list[torch.Tensor], max_share: float = SPARSE_MAX_SHARE) -> list[torch.Tensor | None]:
    """The cells each level imitates, for the sparse path: [N] int64 indices into the flattened [B, H, W] mask
    (b * H * W + y * W + x), in that order; None for a level whose masked share is max_share or more (the dense conv
    is cheaper there). masks: [B, 1, H, W] or [B, H, W] 0/1 per level.

    Reads the levels' masked-cell counts in one host sync (the only one the distillation step adds); none when
    max_share <= 0 (the dense conv everywhere, default_max_share off the CPU).
    """
    if max_share <= 0:
        return [None] * len(masks)
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


def _padded_rows(x: torch.Tensor, k: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, C, H, W] -> [B * (H + 2r) * (W + 2r), C]: channels last, zero-padded by r = k // 2 on every side, in dtype
    (default x's; converted in the same pass)."""
    (b, c, h, w), r = x.shape, k // 2
    padded = x.new_zeros((b, h + 2 * r, w + 2 * r, c), dtype=dtype or x.dtype)
    padded[:, r : r + h, r : r + w] = x.permute(0, 2, 3, 1)
    return padded.view(-1, c)


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

    float32 on CPU runs _CellConv (chunked), its products in float32 or, under CPU autocast, in the autocast dtype
    (the output is then of that dtype, as autocast's F.linear would give); anything else (CUDA, float64) the plain
    autograd composition of neighbourhoods and F.linear, which CUDA autocast handles.
    """
    cpu_fp32 = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    if cpu_fp32 and len(cells) and use_fast_kernels():
        return _CellConv.apply(x, cells, weight, bias, _cpu_autocast_dtype() or torch.float32)
    rows = neighbourhoods(x, cells, weight.shape[-1])
    return F.linear(rows, _weight_matrix(weight).to(rows.dtype), None if bias is None else bias.to(rows.dtype))


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast runs products in (bfloat16 by default), None when it is off."""
    try:
        on = torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: no device argument
        on = torch.is_autocast_cpu_enabled()
    if not on:
        return None
    try:
        return torch.get_autocast_dtype("cpu")
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype()


def _conv_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [O, K]^T (+ bias) as a 1x1 conv over channels_last views of the two row-major matrices: on CPU
    oneDNN runs it, measured 2.4x faster than the BLAS matmul behind F.linear on the AVX-512 AMD EPYC of
    benchmarks/RESULTS.md (a weight gradient, G^T @ rows, was no faster this way and stays a matmul)."""
    m, k = a.shape
    a, b = a.contiguous(), b.contiguous()
    out = F.conv2d(a.view(1, m, 1, k).permute(0, 3, 1, 2), b.view(len(b), 1, 1, k).permute(0, 3, 1, 2), bias)
    return out.permute(0, 2, 3, 1).reshape(m, len(b))


class _CellConv(torch.autograd.Function):
    """sparse_conv on CPU. dtype: what the products run in.

    float32: in chunks of cells, the products as oneDNN 1x1 convs (_conv_matmul); no [N, k * k * C] matrix is ever
    held (backward gathers the neighbourhoods again, chunk by chunk), so the step allocates no block large enough for
    the C allocator to map it fresh from the OS (and page-fault it in) every step.
    bfloat16 (or float16): the feature and the weight rounded to it once, every neighbourhood gathered in it at once
    (half the bytes; kept for backward) and multiplied by plain matmuls (on CPUs with AMX, 9x faster than float32:
    benchmarks/RESULTS.md). The output is in that dtype (as autocast's F.linear); the gradients of the feature, weight
    and bias are summed in float32 over the neighbours, as under CUDA AMP, and returned in float32.
    """

    CHUNK = 2048  # cells per chunk: [2048, 1152] float32 rows = 9.4 MB for the 3x3 adapter of yolov5n

    @staticmethod
    def forward(ctx, x: torch.Tensor, cells: torch.Tensor, weight: torch.Tensor, bias, dtype: torch.dtype):
        wide = dtype == torch.float32
        with torch.autocast("cpu", enabled=False):
            k = weight.shape[-1]
            padded, index = _padded_rows(x, k, dtype), _neighbour_index(x.shape, cells, k)
            matrix = _weight_matrix(weight).to(dtype)
            bias = None if bias is None else bias.to(dtype)
            if wide:
                chunks = index.split(_CellConv.CHUNK)
                out, rows = torch.cat([_conv_matmul(_gather_rows(padded, c), matrix, bias) for c in chunks]), None
            else:  # half the bytes: every neighbourhood at once, kept for backward (15.6 MB for yolov5n's 6,769)
                rows = _gather_rows(padded, index)
                out = F.linear(rows, matrix, bias)
        ctx.save_for_backward(padded, index, matrix, rows)
        ctx.x_shape, ctx.x_dtype, ctx.k, ctx.has_bias = x.shape, x.dtype, k, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        padded, index, matrix, rows = ctx.saved_tensors
        (b, c, h, w), k, dtype = ctx.x_shape, ctx.k, padded.dtype
        grad = grad.to(dtype).contiguous()
        grad_padded = torch.zeros(padded.shape, dtype=torch.float32)
        with torch.autocast("cpu", enabled=False):
            if rows is None:  # float32, chunk by chunk
                grad_matrix = torch.zeros(matrix.shape, dtype=torch.float32)
                matrix_t = matrix.t().contiguous()
                for chunk, g in zip(index.split(_CellConv.CHUNK), grad.split(_CellConv.CHUNK)):
                    grad_matrix.addmm_(g.t(), _gather_rows(padded, chunk))
                    grad_padded.index_add_(0, chunk.flatten(), _conv_matmul(g, matrix_t).view(chunk.numel(), c))
            else:  # narrow products, float32 sums over the neighbours
                grad_matrix = (grad.t() @ rows).float()
                grad_padded.index_add_(0, index.flatten(), (grad @ matrix).float().view(index.numel(), c))
        r = k // 2
        grad_x = grad_padded.view(b, h + 2 * r, w + 2 * r, c)[:, r : r + h, r : r + w].permute(0, 3, 1, 2)
        grad_weight = grad_matrix.view(-1, k, k, c).permute(0, 3, 1, 2)
        grad_bias = grad.float().sum(0) if ctx.has_bias else None
        return grad_x.to(ctx.x_dtype), None, grad_weight, grad_bias, None
