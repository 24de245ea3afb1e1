"""distill.mask.imitation_mask against an independent per-box numpy reference, plus its properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.mask import imitation_mask, matched_boxes

P3_ANCHORS = np.array([[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]])  # YOLOv5 P3 anchors in grid cells


def reference_mask(targets: np.ndarray, anchors: np.ndarray, shape, iou_factor: float = 0.5) -> np.ndarray:
    """FGFI mask straight from the paper: every anchor at every cell centre, IoU in xyxy, box by box."""
    batch_size, height, width = shape
    mask = np.zeros(shape, dtype=np.float32)
    rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")  # [H, W] centres
    for image, _, x, y, w, h in np.asarray(targets, dtype=np.float64):
        bx1, bx2 = (x - w / 2) * width, (x + w / 2) * width
        by1, by2 = (y - h / 2) * height, (y + h / 2) * height
        ious = np.zeros((height, width, len(anchors)))
        for k, (aw, ah) in enumerate(anchors):
            ix = np.clip(np.minimum(bx2, cols + aw / 2) - np.maximum(bx1, cols - aw / 2), 0, None)
            iy = np.clip(np.minimum(by2, rows + ah / 2) - np.maximum(by1, rows - ah / 2), 0, None)
            inter = ix * iy
            ious[:, :, k] = inter / ((bx2 - bx1) * (by2 - by1) + aw * ah - inter)
        best = ious.max()
        if best > 0:
            keep = (ious > iou_factor * best).any(axis=2)
            mask[int(image)][keep] = 1
    return mask


def random_targets(rng: np.random.Generator, n: int, batch_size: int, max_side: float = 0.6) -> np.ndarray:
    targets = np.zeros((n, 6))
    targets[:, 0] = rng.integers(0, batch_size, n)
    targets[:, 1] = rng.integers(0, 3, n)
    targets[:, 2:4] = rng.random((n, 2))
    targets[:, 4:6] = 0.01 + max_side * rng.random((n, 2))
    return targets


def run_mask(targets, anchors, shape, iou_factor=0.5) -> np.ndarray:
    return imitation_mask(torch.tensor(targets), torch.tensor(anchors), shape, iou_factor).numpy()


@pytest.mark.parametrize("shape", [(3, 8, 12), (3, 12, 5), (2, 16, 16), (4, 1, 7), (2, 20, 10)])
@pytest.mark.parametrize("iou_factor", [0.0, 0.3, 0.5, 0.8])
def test_matches_reference(shape, iou_factor):
    rng = np.random.default_rng(hash((shape, iou_factor)) % 2**32)
    for max_side, anchor_scale in ((0.05, 1.0), (0.3, 1.0), (1.0, 0.5), (0.5, 3.0)):
        targets = random_targets(rng, 9, shape[0] - 1, max_side)  # the last image has no boxes
        anchors = P3_ANCHORS * anchor_scale
        mask = run_mask(targets, anchors, shape, iou_factor)
        np.testing.assert_array_equal(mask, reference_mask(targets, anchors, shape, iou_factor))
        assert not mask[-1].any()


def test_boxes_on_edges_and_overhanging_match_reference():
    rng = np.random.default_rng(1)
    targets = random_targets(rng, 40, 4, 1.0)
    targets[:, 2:4] = rng.choice([0.0, 0.01, 0.5, 0.99, 1.0], (40, 2))  # centres on and next to the borders
    shape = (4, 9, 14)
    np.testing.assert_array_equal(run_mask(targets, P3_ANCHORS, shape), reference_mask(targets, P3_ANCHORS, shape))


def test_output_type_and_no_boxes():
    mask = imitation_mask(torch.zeros(0, 6), torch.tensor(P3_ANCHORS), (3, 6, 9))
    assert mask.shape == (3, 6, 9) and mask.dtype == torch.float32
    assert mask.sum() == 0
    targets = torch.tensor([[1, 0, 0.5, 0.5, 0.3, 0.3]], dtype=torch.float16)  # half targets, float64 anchors
    mask = imitation_mask(targets, torch.tensor(P3_ANCHORS), (3, 6, 9))
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0].sum() == 0 and mask[2].sum() == 0 and mask[1].sum() > 0
    assert imitation_mask(targets, torch.tensor(P3_ANCHORS), torch.Size((3, 6, 9))).equal(mask)
    with pytest.raises(ValueError):
        imitation_mask(targets, torch.tensor(P3_ANCHORS), (3, 6, 9), iou_factor=-0.1)


def test_asymmetric_box_not_transposed():
    """A box at x=0.8, y=0.2 on a 10 (rows) x 20 (cols) map lands at rows ~2, columns ~16."""
    height, width = 10, 20
    targets = torch.tensor([[0, 0, 0.8, 0.2, 0.1, 0.2]])  # 2 x 2 cells, centre (x=16, y=2) in grid cells
    mask = imitation_mask(targets, torch.tensor([[1.0, 1.0], [2.0, 2.0]]), (1, height, width))
    assert mask.shape == (1, height, width)
    ys, xs = torch.nonzero(mask[0], as_tuple=True)
    assert len(ys) > 0
    assert ys.min() >= 0 and ys.max() <= 4  # rows around y = 0.2 * 10 = 2
    assert xs.min() >= 13 and xs.max() <= 19  # columns around x = 0.8 * 20 = 16
    assert mask[0, 1:3, 15:17].all()  # the 2x2 cells the box covers; the exact 2x2 anchor has IoU 1 there


def test_best_cell_always_kept():
    rng = np.random.default_rng(2)
    shape = (1, 11, 7)
    for iou_factor in (0.0, 0.5, 0.99):
        targets = random_targets(rng, 30, 1)
        for t in targets:
            mask = run_mask(t[None], P3_ANCHORS, shape, iou_factor)
            row = min(int(t[3] * shape[1]), shape[1] - 1)
            col = min(int(t[2] * shape[2]), shape[2] - 1)
            assert mask[0, row, col] == 1


def test_higher_iou_factor_gives_subset():
    rng = np.random.default_rng(3)
    targets = random_targets(rng, 20, 4)
    shape = (4, 13, 9)
    previous = run_mask(targets, P3_ANCHORS, shape, 0.0)
    for iou_factor in (0.2, 0.4, 0.6, 0.8, 0.95):
        mask = run_mask(targets, P3_ANCHORS, shape, iou_factor)
        assert (mask <= previous).all()
        previous = mask
    assert run_mask(targets, P3_ANCHORS, shape, 1.0).sum() == 0  # nothing beats its own max strictly


def test_union_over_boxes_and_batched_equals_one_at_a_time():
    rng = np.random.default_rng(4)
    shape = (3, 10, 15)
    targets = random_targets(rng, 12, 3)
    batched = run_mask(targets, P3_ANCHORS, shape)
    for b in range(shape[0]):
        own = targets[targets[:, 0] == b].copy()
        own[:, 0] = 0
        alone = run_mask(own, P3_ANCHORS, (1, *shape[1:]))
        np.testing.assert_array_equal(batched[b], alone[0])
        union = np.zeros(shape[1:], dtype=np.float32)
        for t in own:
            union = np.maximum(union, run_mask(t[None], P3_ANCHORS, (1, *shape[1:]))[0])
        np.testing.assert_array_equal(batched[b], union)


def test_degenerate_boxes_add_nothing():
    good = np.array([[0, 0, 0.3, 0.6, 0.2, 0.1]])
    degenerate = np.array([[0, 0, 0.5, 0.5, 0.0, 0.3], [0, 0, 0.5, 0.5, 0.3, 0.0], [1, 0, 0.2, 0.2, 0.0, 0.0]])
    mask = imitation_mask(torch.tensor(np.concatenate((good, degenerate))), torch.tensor(P3_ANCHORS), (2, 8, 8))
    assert torch.isfinite(mask).all()
    np.testing.assert_array_equal(mask.numpy(), run_mask(good, P3_ANCHORS, (2, 8, 8)))


def reference_gtbox_mask(targets: np.ndarray, shape) -> np.ndarray:
    """The "inside GT box" region cell by cell: the cell centre strictly inside a box of its image."""
    batch_size, height, width = shape
    mask = np.zeros(shape, dtype=np.float32)
    for b in range(batch_size):
        for row in range(height):
            for col in range(width):
                for image, _, x, y, w, h in np.asarray(targets, dtype=np.float64):
                    px, py = (col + 0.5) / width, (row + 0.5) / height  # centre, normalized
                    if int(image) == b and x - w / 2 < px < x + w / 2 and y - h / 2 < py < y + h / 2:
                        mask[b, row, col] = 1
    return mask


@pytest.mark.parametrize("shape", [(3, 8, 12), (3, 12, 5), (4, 1, 7), (2, 20, 10)])
def test_gtbox_matches_reference(shape):
    rng = np.random.default_rng(sum(shape))
    for max_side in (0.05, 0.3, 1.0):
        targets = random_targets(rng, 9, shape[0] - 1, max_side)  # the last image has no boxes
        mask = imitation_mask(torch.tensor(targets), torch.tensor(P3_ANCHORS), shape, region="gtbox")
        assert mask.shape == shape and mask.dtype == torch.float32
        np.testing.assert_array_equal(mask.numpy(), reference_gtbox_mask(targets, shape))
        assert not mask[-1].any()


def test_gtbox_boxes_touching_the_border_and_cell_edges():
    shape = (2, 6, 10)
    targets = np.array(
        [
            [0, 0, 0.1, 0.5, 0.2, 1.0],  # touches left, top and bottom borders
            [0, 1, 0.95, 0.05, 0.1, 0.1],  # top-right corner, one cell exactly
            [1, 2, 0.5, 0.5, 0.1, 1 / 6],  # edges exactly on cell centres: strictly inside excludes them
            [1, 2, 0.25, 0.75, 0.3, 0.2],
            [1, 0, 0.9, 0.1, 0.0, 0.5],  # zero width: nothing
        ]
    )
    mask = imitation_mask(torch.tensor(targets), torch.tensor(P3_ANCHORS), shape, region="gtbox").numpy()
    np.testing.assert_array_equal(mask, reference_gtbox_mask(targets, shape))
    assert mask[0, :, :2].all() and mask[0, 0, 9] == 1 and mask[0].sum() == 6 * 2 + 1
    assert mask[1, :, 5].sum() == 0  # the box whose x-edges sit on column centres 4.5 and 5.5 covers no centre


def test_gtbox_ignores_anchors_and_iou_factor():
    rng = np.random.default_rng(3)
    targets = torch.tensor(random_targets(rng, 12, 3))
    a = imitation_mask(targets, torch.tensor(P3_ANCHORS), (3, 9, 13), iou_factor=0.1, region="gtbox")
    b = imitation_mask(targets, torch.tensor(P3_ANCHORS * 4), (3, 9, 13), iou_factor=0.9, region="gtbox")
    assert a.equal(b) and a.sum() > 0


def test_full_region_is_all_ones_even_without_boxes():
    for targets in (torch.zeros(0, 6), torch.tensor(random_targets(np.random.default_rng(0), 5, 2))):
        mask = imitation_mask(targets, torch.tensor(P3_ANCHORS), (2, 7, 11), region="full")
        assert mask.shape == (2, 7, 11) and mask.dtype == torch.float32 and (mask == 1).all()


def test_fgfi_region_is_the_default():
    rng = np.random.default_rng(4)
    targets = torch.tensor(random_targets(rng, 10, 3))
    anchors = torch.tensor(P3_ANCHORS)
    default = imitation_mask(targets, anchors, (3, 8, 12), 0.4)
    assert imitation_mask(targets, anchors, (3, 8, 12), 0.4, region="fgfi").equal(default)
    np.testing.assert_array_equal(default.numpy(), reference_mask(targets.numpy(), P3_ANCHORS, (3, 8, 12), 0.4))
    gtbox = imitation_mask(targets, anchors, (3, 8, 12), region="gtbox")
    assert not gtbox.equal(default)  # the regions are really different rules


def test_unknown_region_is_refused():
    with pytest.raises(ValueError, match="region"):
        imitation_mask(torch.zeros(0, 6), torch.tensor(P3_ANCHORS), (1, 4, 4), region="box")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    targets = torch.tensor(random_targets(rng, 50, 6), dtype=torch.float32)
    anchors = torch.tensor(P3_ANCHORS, dtype=torch.float32)
    cpu = imitation_mask(targets, anchors, (6, 24, 40))
    gpu = imitation_mask(targets.cuda(), anchors.cuda(), (6, 24, 40))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


def test_matched_boxes_are_those_the_loss_assigns_to_the_level():
    """matched_boxes keeps (unchanged) exactly the boxes YOLOv5's build_targets assigns to some anchor of the level,
    found from the loss itself (one class per box, read back from tcls), and zeroes the others' width and height."""
    from tests.test_loss import HYP, FakeModel, preds
    from utils.loss import ComputeLoss

    rng = np.random.default_rng(7)
    levels = ((1.25, 1.625, 2.0, 3.75, 4.125, 2.875), (1.875, 3.8125, 3.875, 2.8125, 3.6875, 7.4375))
    shapes = ((16, 24), (8, 12))  # non-square maps: width and height scale the box sides differently
    n = 40
    targets = torch.tensor(random_targets(rng, n, 2, max_side=0.9))
    targets[:, 1] = torch.arange(n, dtype=targets.dtype)  # class = box id
    compute = ComputeLoss(FakeModel(nc=n, anchors=levels, strides=(8, 16)), HYP)
    tcls, *_ = compute.build_targets(preds(shapes, n), targets)
    for level, (anchors, shape) in enumerate(zip(compute.anchors, shapes)):
        out = matched_boxes(targets, anchors, shape, HYP["anchor_t"])
        kept = set(out[:, 4].nonzero().flatten().tolist())
        assert kept == set(tcls[level].tolist()) and 0 < len(kept) < n  # some boxes on each side of the rule
        torch.testing.assert_close(out[:, :4], targets[:, :4], rtol=0, atol=0)
        for i in range(n):
            expected = targets[i, 4:6] if i in kept else torch.zeros(2, dtype=targets.dtype)
            torch.testing.assert_close(out[i, 4:6], expected, rtol=0, atol=0)


def test_matched_level_mask_is_the_mask_of_the_assigned_boxes_alone():
    """forward_imitation(anchor_t=...): each level's mask equals imitation_mask of only the boxes assigned there, and
    without anchor_t every level's mask is the paper's (all boxes)."""
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=3).eval()
    rng = np.random.default_rng(3)
    targets = torch.tensor(random_targets(rng, 12, 2, max_side=0.9), dtype=torch.float32)
    x = torch.rand(2, 3, 128, 192)
    anchors = model.model[-1].anchors
    _, feats, masks = model(x, target=targets, imitation_layers="neck", anchor_t=4.0)
    _, _, masks_all = model(x, target=targets, imitation_layers="neck")
    differs = 0
    for level, (f, m, m_all) in enumerate(zip(feats, masks, masks_all)):
        shape = (f.shape[0], f.shape[2], f.shape[3])
        wh = targets[:, 4:6] * torch.tensor([f.shape[3], f.shape[2]])
        r = wh[:, None] / anchors[level][None]
        assigned = (torch.max(r, 1 / r).amax(2) < 4.0).any(1)  # independent of matched_boxes: the rule itself
        torch.testing.assert_close(m[:, 0], imitation_mask(targets[assigned], anchors[level], shape))
        torch.testing.assert_close(m_all[:, 0], imitation_mask(targets, anchors[level], shape))
        differs += int(not torch.equal(m, m_all))
    assert differs >= 1  # the case is one where the rule drops boxes somewhere
