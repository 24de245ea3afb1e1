"""The sparse adapter + imitation loss (distill.sparse: masked_cells, gather_cells, neighbourhoods, Adapter(x, cells))
against the dense conv path: the same loss value and the same gradients for the student feature, the adapter weight
and its bias; and the Distiller taking the sparse path by default with the dense path's losses and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill import Distiller
from distill.loss import Adapter, FeatureAdapters, imitation_loss
from distill.sparse import (
    SPARSE_MAX_SHARE,
    SPARSE_MAX_SHARE_BF16,
    _CellConv,
    default_max_share,
    gather_cells,
    masked_cells,
    neighbourhoods,
)
from distill.terms import imitation_term
from models.yolo import DetectionModel
from utils.general import yaml_load
from utils.loss import ComputeLoss

ALWAYS = float("inf")  # sparse_max_share that always takes the sparse path


def _both_paths(x: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, adapter: Adapter):
    """(loss, [grad x, grad weight, grad bias]) of the dense conv path and of the sparse path."""
    results = []
    for sparse in (False, True):
        adapter.zero_grad(set_to_none=True)
        leaf = x.detach().clone().requires_grad_(True)
        if sparse:
            (cells,) = masked_cells([mask], ALWAYS)
            loss = imitation_loss(adapter(leaf, cells), gather_cells(teacher, cells))
        else:
            loss = imitation_loss(adapter(leaf), teacher, mask)
        loss.backward()
        results.append((loss.detach(), [leaf.grad, adapter.conv.weight.grad, adapter.conv.bias.grad]))
    return results


@pytest.mark.parametrize(
    "shape, k",
    [((2, 5, 6, 9), 3), ((3, 4, 7, 4), 1), ((1, 6, 5, 5), 3), ((2, 3, 1, 8), 3), ((2, 3, 9, 2), 5), ((4, 8, 3, 11), 1)],
)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # CPU float32: _CellConv; else neighbourhoods @ W
def test_sparse_equals_dense_value_and_gradients(shape, k, density, dtype, monkeypatch):
    monkeypatch.setattr(_CellConv, "CHUNK", 7)  # several chunks of cells, the last one short
    torch.manual_seed(hash((shape, k, density)) % 2**31)
    b, c, h, w = shape
    c_out = c + 3
    adapter = Adapter(c, c_out, k).to(dtype)
    x, teacher = torch.randn(shape, dtype=dtype), torch.randn(b, c_out, h, w, dtype=dtype)
    mask = (torch.rand(b, 1, h, w) < density).float()
    (dense_loss, dense_grads), (sparse_loss, sparse_grads) = _both_paths(x, teacher, mask, adapter)
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)
    for name, s, d in zip(("feature", "weight", "bias"), sparse_grads, dense_grads):
        assert s is not None and s.shape == d.shape, name
        torch.testing.assert_close(s, d, rtol=1e-5, atol=1e-6, msg=name)
    if density == 0.0:  # no cell imitated: exactly 0, zero (not missing) gradients, no NaN
        assert sparse_loss.item() == 0.0
        assert all(torch.count_nonzero(g) == 0 for g in sparse_grads)


def test_one_chunk_equals_many(monkeypatch):
    """_CellConv's chunking of the cells changes nothing but rounding."""
    torch.manual_seed(5)
    adapter = Adapter(6, 10, 3)
    x, teacher = torch.randn(3, 6, 9, 13), torch.randn(3, 10, 9, 13)
    mask = (torch.rand(3, 1, 9, 13) < 0.4).float()
    results = []
    for chunk in (10_000, 16, 1):
        monkeypatch.setattr(_CellConv, "CHUNK", chunk)
        results.append(_both_paths(x, teacher, mask, adapter)[1])
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0)
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6)


def test_mask_on_the_border_reads_zero_padding():
    """Every masked cell is on the map's edge: the neighbourhoods run off the map on one or two sides."""
    torch.manual_seed(3)
    adapter = Adapter(4, 6, 3)
    x, teacher = torch.randn(2, 4, 5, 7), torch.randn(2, 6, 5, 7)
    mask = torch.zeros(2, 1, 5, 7)
    mask[0, 0, 0, :] = 1  # top row, corners included
    mask[0, 0, :, -1] = 1  # right column
    mask[1, 0, -1, 0] = 1  # bottom-left corner of the second image
    mask[1, 0, 2, 0] = 1  # left edge
    (dense_loss, dense_grads), (sparse_loss, sparse_grads) = _both_paths(x, teacher, mask, adapter)
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)
    for s, d in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(s, d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_neighbourhoods_equal_unfold(k):
    """Independent im2col: F.unfold orders each column (c, dy, dx); neighbourhoods orders each row (dy, dx, c)."""
    torch.manual_seed(k)
    b, c, h, w = 2, 3, 4, 6
    x = torch.randn(b, c, h, w)
    cells = torch.tensor([0, 5, 6, 17, 23, 24, 30, 47])  # [B * H * W] indices, corners and edges included
    columns = F.unfold(x, k, padding=k // 2)  # [B, C * k * k, H * W]
    expected = columns.permute(0, 2, 1).reshape(b * h * w, c, k * k)[cells].transpose(1, 2).reshape(len(cells), -1)
    torch.testing.assert_close(neighbourhoods(x, cells, k), expected, rtol=0, atol=0)


def test_gather_cells_and_masked_cells():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 3, 4)
    mask = torch.zeros(2, 1, 3, 4)
    mask[0, 0, 1, 2] = mask[1, 0, 0, 0] = mask[1, 0, 2, 3] = 1
    (cells,) = masked_cells([mask], ALWAYS)
    assert cells.dtype == torch.int64
    assert cells.tolist() == [0 * 12 + 1 * 4 + 2, 1 * 12 + 0, 1 * 12 + 2 * 4 + 3]
    expected = torch.stack([t[0, :, 1, 2], t[1, :, 0, 0], t[1, :, 2, 3]])
    torch.testing.assert_close(gather_cells(t, cells), expected, rtol=0, atol=0)
    # a channels_last map gathers the same values
    torch.testing.assert_close(gather_cells(t.contiguous(memory_format=torch.channels_last), cells), expected)
    # the dense path from the share on: 3 of 24 cells = 0.125
    assert masked_cells([mask], 0.125) == [None]
    assert masked_cells([mask], 0.13)[0].tolist() == cells.tolist()
    assert masked_cells([mask], 0.0) == [None]
    # levels decide on their own; [B, H, W] masks are accepted
    full = torch.ones(2, 3, 4)
    both = masked_cells([mask, full], 0.5)
    assert both[0].tolist() == cells.tolist() and both[1] is None
    assert masked_cells([], 0.5) == []


def test_feature_adapters_mix_sparse_and_dense_levels():
    torch.manual_seed(1)
    adapters = FeatureAdapters([3, 4], [5, 6], k=3)
    features = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)]
    cells = [torch.tensor([1, 7, 30]), None]
    sparse, dense = adapters(features, cells)
    assert sparse.shape == (3, 5) and dense.shape == (2, 6, 2, 2)
    full = adapters(features)[0]
    expected = full.permute(0, 2, 3, 1).reshape(-1, 5)[cells[0]]
    torch.testing.assert_close(sparse, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense, adapters(features)[1])


def test_gathered_loss_needs_no_mask_and_never_divides_by_zero():
    student, teacher = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # (1 + 4 + 1 + 4) / (2 * 2 cells)
    assert imitation_loss(student, teacher).item() == pytest.approx(2.5)
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = imitation_loss(empty, torch.zeros(0, 2))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 2)


def test_default_share_by_device_and_no_sync_when_dense(monkeypatch):
    """The measured crossover on CPU, the dense conv elsewhere (not measured there); with max_share <= 0 masked_cells
    never reads the masks' counts (no host sync on CUDA)."""
    assert default_max_share("cpu") == default_max_share(torch.device("cpu")) == SPARSE_MAX_SHARE
    assert default_max_share("cpu", bf16=True) == SPARSE_MAX_SHARE_BF16 < SPARSE_MAX_SHARE  # measured lower in bf16
    assert default_max_share("cuda", bf16=True) == 0.0
    for device in ("cuda", "cuda:1", torch.device("cuda", 0), "mps"):  # a device string needs no GPU to be read
        assert default_max_share(device) == 0.0, device
    masks = [torch.zeros(2, 1, 4, 4), torch.ones(2, 4, 4)]
    masks[0][0, 0, 1, 1] = 1  # 1 of 32 cells: the sparse path at any share > 1/32
    assert masked_cells(masks, 0.5)[0].tolist() == [5]

    def no_sync(*args, **kwargs):
        raise AssertionError("masked_cells read the masks' counts")

    for name in ("count_nonzero", "tolist", "item", "nonzero", "sum", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    monkeypatch.setattr(torch, "nonzero_static", no_sync)
    monkeypatch.setattr(torch, "count_nonzero", no_sync)
    with pytest.raises(AssertionError, match="read the masks' counts"):  # the patches do catch a count
        masked_cells(masks, 0.5)
    for max_share in (0.0, -1.0):
        assert masked_cells(masks, max_share) == [None, None]
    assert masked_cells([], 0.0) == []


@pytest.mark.parametrize("precision, share", [("fp32", SPARSE_MAX_SHARE), ("bf16", SPARSE_MAX_SHARE_BF16)])
def test_distiller_on_cpu_goes_sparse_just_below_the_crossover(teacher_pt, precision, share):
    """A Distiller on CPU defaults to SPARSE_MAX_SHARE (SPARSE_MAX_SHARE_BF16 in bf16) and takes the sparse path for
    a level whose masked share is below it, the dense conv from it on: masks of the first share at or above the
    crossover and one cell fewer."""
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    distiller = Distiller(student, teacher_pt, "cpu", precision=precision)  # layer 16: 8 x 8 cells at 64 x 64
    assert distiller.sparse_max_share == share == default_max_share("cpu", bf16=precision == "bf16")
    imgs, targets = torch.rand(1, 3, 64, 64), torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.4]])
    cells = 8 * 8
    at = math.ceil(share * cells)  # the fewest masked cells with a share >= the crossover
    assert 0 < at <= cells and (at - 1) / cells < share <= at / cells

    def student_with_mask(n: int):
        """The student, its imitation mask replaced by one with the first n cells set."""

        def forward(x, **kwargs):
            preds, features, masks = student(x, **kwargs)
            mask = torch.zeros_like(masks[0])
            mask.view(-1)[:n] = 1
            return preds, features, [mask]

        return forward

    for n, sparse in ((at - 1, True), (at, False), (cells, False), (1, True)):
        _, inputs = distiller(student_with_mask(n), imgs, targets)
        s, t = inputs["student"][0], inputs["teacher"][0]
        if sparse:
            assert s.shape == t.shape == (n, 256), (n, s.shape)
        else:
            assert s.shape == t.shape == (1, 256, 8, 8), (n, s.shape)
        assert inputs["mask"][0].shape == (1, 1, 8, 8) and int(inputs["mask"][0].sum()) == n


@pytest.mark.parametrize("layers", [None, [17, 20, 23]])
def test_distiller_sparse_by_default_with_the_dense_losses_and_gradients(teacher_pt, layers):
    """One fixed batch through the Distiller and ComputeLoss, default (sparse) vs always-dense: the same loss items and
    the same gradients for every student and adapter parameter (float32; bf16: tests/test_distill_precision.py)."""
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    distiller = Distiller(student, teacher_pt, "cpu", layers, precision="fp32")
    assert distiller.sparse_max_share == SPARSE_MAX_SHARE
    compute_loss = ComputeLoss(
        student, yaml_load("data/hyps/hyp.scratch-low.yaml"), terms={"imitation": (0.01, imitation_term)}
    )
    imgs = torch.rand(2, 3, 128, 96)  # non-square
    targets = torch.tensor(
        [[0, 1, 0.30, 0.40, 0.20, 0.30], [0, 2, 0.70, 0.25, 0.10, 0.10], [1, 0, 0.55, 0.60, 0.25, 0.35]]
    )
    params = list(student.parameters()) + distiller.parameters()
    runs = []
    for max_share in (SPARSE_MAX_SHARE, 0.0):
        distiller.sparse_max_share = max_share
        for p in params:
            p.grad = None
        pred, imitation = distiller(student, imgs, targets)
        loss, items = compute_loss(pred, targets, **imitation)
        loss.backward()
        runs.append((imitation, items, [p.grad.clone() for p in params]))
    (sparse_in, sparse_items, sparse_grads), (dense_in, dense_items, dense_grads) = runs
    # each level takes the sparse path below the crossover share (here the small maps of P4/P5 are mostly masked)
    shares = [float(m.mean()) for m in sparse_in["mask"]]
    assert [s.dim() for s in sparse_in["student"]] == [2 if x < SPARSE_MAX_SHARE else 4 for x in shares]
    assert sparse_in["student"][0].dim() == 2, "the default took the dense path"
    assert all(s.dim() == 4 for s in dense_in["student"])
    assert all(m.dim() == 4 for m in sparse_in["mask"])  # the masks stay whole maps (plots, records)
    assert sparse_items["imitation"] > 0
    for k in dense_items:
        torch.testing.assert_close(sparse_items[k], dense_items[k], rtol=1e-5, atol=1e-7, msg=k)
    for s, d in zip(sparse_grads, dense_grads):  # float32 rounding, carried back through the whole network
        torch.testing.assert_close(s, d, rtol=1e-4, atol=1e-5 * float(d.abs().max()))


def test_distiller_full_region_takes_the_dense_path(teacher_pt):
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    distiller = Distiller(student, teacher_pt, "cpu", imitation_region="full")
    _, imitation = distiller(student, torch.rand(1, 3, 64, 64), torch.zeros(0, 6))
    assert imitation["student"][0].dim() == 4


def test_empty_batch_sparse_step_is_zero_without_nan(teacher_pt):
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    distiller = Distiller(student, teacher_pt, "cpu")
    _, imitation = distiller(student, torch.rand(2, 3, 64, 96), torch.zeros(0, 6))
    assert imitation["student"][0].shape == (0, 256)
    loss = imitation_loss(imitation["student"][0], imitation["teacher"][0])
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in distiller.parameters())


def test_sparse_conv_under_cpu_autocast_takes_the_generic_path():
    """Under CPU autocast (bf16 products) the sparse adapter runs the autograd composition: forward and backward work
    and agree with the dense conv under the same autocast to bf16 precision."""
    torch.manual_seed(0)
    adapter = Adapter(8, 16)
    x = torch.randn(2, 8, 6, 5, requires_grad=True)
    mask = torch.rand(2, 1, 6, 5) > 0.6
    (cells,) = masked_cells([mask.float()], ALWAYS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sparse = adapter(x, cells)
        dense = gather_cells(adapter(x), cells)
    assert sparse.dtype == torch.bfloat16
    sparse.float().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    dense.float().sum().backward()
    torch.testing.assert_close(sparse.float(), dense.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, x.grad, rtol=2e-2, atol=2e-2)
