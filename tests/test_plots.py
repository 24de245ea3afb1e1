"""utils/plots.py: palette, annotation, crops, mosaics, imitation-mask overlays, results and label charts."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from utils.general import UserError
from utils.plots import (
    MASK_COLORS,
    Annotator,
    Colors,
    colors,
    feature_visualization,
    output_to_target,
    plot_images,
    plot_imitation_masks,
    plot_labels,
    plot_results,
    save_one_box,
)


def test_colors_palette():
    assert colors(0) == (0xFF, 0x38, 0x38)  # first YOLOv5 colour, FF3838
    assert colors(0, bgr=True) == (0x38, 0x38, 0xFF)
    assert colors(20) == colors(0) and colors(21) == Colors()(1)  # wraps around 20 colours, same for every instance
    assert len({colors(i) for i in range(20)}) == 20
    assert all(0 <= v <= 255 for i in range(20) for v in colors(i))


def test_annotator_draws_box_and_label():
    im = np.zeros((100, 120, 3), dtype=np.uint8)
    annotator = Annotator(im, line_width=2)
    annotator.box_label([20, 40, 80, 90], "cat 0.91", color=(0, 0, 255))
    out = annotator.result()
    assert (out[40:90, 20:22] == (0, 0, 255)).all(axis=-1).mean() > 0.8  # left border in the box colour
    assert (out[50:80, 30:70] == 0).all()  # the inside is untouched
    assert (out[25:38, 20:40] != 0).any()  # the label tag sits above the box
    assert (out[:, 100:] == 0).all()


def test_annotator_label_moves_inside_at_top_edge():
    im = np.zeros((60, 60, 3), dtype=np.uint8)
    Annotator(im, line_width=1).box_label([5, 1, 50, 50], "x", color=(255, 255, 255))
    assert (im[3:10, 8:12] != 0).any()  # no room above: the tag is drawn inside the box


def test_annotator_needs_contiguous_image():
    with pytest.raises(ValueError):
        Annotator(np.zeros((10, 10, 3), dtype=np.uint8)[:, ::-1])


def test_output_to_target():
    out = [
        torch.tensor([[10.0, 20.0, 30.0, 60.0, 0.9, 2.0], [0.0, 0.0, 4.0, 4.0, 0.5, 0.0]]),
        torch.zeros((0, 6)),
        torch.tensor([[5.0, 5.0, 15.0, 25.0, 0.3, 1.0]]),
    ]
    t = output_to_target(out)
    assert isinstance(t, np.ndarray) and t.shape == (3, 7)
    np.testing.assert_allclose(t[0], [0, 2, 20, 40, 20, 40, 0.9], rtol=1e-6)
    np.testing.assert_allclose(t[2], [2, 1, 10, 15, 10, 20, 0.3], rtol=1e-6)
    assert output_to_target(out, max_det=1).shape == (2, 7)
    assert output_to_target([torch.zeros((0, 6))]).shape == (0, 7)


def test_save_one_box(tmp_path):
    im = np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)
    file = tmp_path / "crops" / "a.jpg"
    crop = save_one_box([50, 20, 90, 60], im, file=file, gain=1.0, pad=0, BGR=True)
    np.testing.assert_array_equal(crop, im[20:60, 50:90])
    assert cv2.imread(str(file)).shape == (40, 40, 3)
    rgb = save_one_box([50, 20, 90, 60], im, file=file, gain=1.0, pad=0)  # second crop: a new file name
    np.testing.assert_array_equal(rgb, im[20:60, 50:90, ::-1])
    assert (tmp_path / "crops" / "a2.jpg").is_file()
    # enlarged by gain and pad, square, clipped at the image border
    crop = save_one_box([180, 10, 200, 30], im, save=False, gain=2.0, pad=10, square=True)
    assert crop.shape[:2] == (45, 35)  # 20 * 2 + 10 = 50 px around centre (190, 20) -> y 0..45, x 165..200


def test_plot_images_labels_and_predictions(tmp_path):
    images = torch.rand(5, 3, 64, 96)
    labels = np.array([[0, 1, 0.5, 0.5, 0.4, 0.4], [3, 0, 0.3, 0.3, 0.2, 0.2]])  # normalized
    f = tmp_path / "train_batch0.jpg"
    mosaic = plot_images(images, labels, paths=[f"im{i}.jpg" for i in range(5)], fname=f, names={0: "a", 1: "b"})
    written = cv2.imread(str(f))
    assert written.shape == (3 * 64, 3 * 96, 3)  # 5 images -> 3 x 3 grid
    assert mosaic.shape == written.shape
    assert (mosaic[128:, 96:] == 255).all()  # unused tiles stay white (image 5 is column 2, row 0)
    assert np.median(written[128:, 96:]) > 250  # and survive JPEG encoding (which rings near tile edges)

    preds = np.array([[1, 0, 48.0, 32.0, 30.0, 20.0, 0.9], [1, 0, 20.0, 20.0, 10.0, 10.0, 0.1]])  # pixels + conf
    out = plot_images(images[:2].numpy() * 255, preds, fname=tmp_path / "val_pred.jpg")
    assert out.shape == (2 * 64, 2 * 96, 3)
    empty = plot_images(images[:1], np.zeros((0, 6)), fname=tmp_path / "empty.jpg")
    assert cv2.imread(str(tmp_path / "empty.jpg")).shape == empty.shape == (64, 96, 3)


def test_plot_images_box_position(tmp_path):
    """A label box is drawn where its normalized coordinates say, in the image's own tile."""
    images = np.zeros((4, 3, 64, 64), dtype=np.uint8)
    target = np.array([[2, 0, 0.5, 0.5, 0.5, 0.5]])  # image 2 -> tile column 1, row 0 (column-major)
    mosaic = plot_images(images, target, fname=tmp_path / "pos.jpg")
    x0, y0 = 64, 0
    assert (mosaic[y0 + 24 : y0 + 40, x0 + 16] == colors(0)).all(axis=-1).any()  # left edge at x = 16
    assert (mosaic[y0 + 28 : y0 + 36, x0 + 28 : x0 + 36] == 0).all()  # centre untouched
    assert (mosaic[64 + 16 : 64 + 48, 16:48] == 0).all()  # image 1 (row 1, column 0) has no boxes


def test_plot_imitation_masks_tints_masked_cells(tmp_path):
    images = torch.full((2, 3, 64, 64), 0.5)
    mask = torch.zeros(2, 1, 8, 8)  # stride 8
    mask[0, 0, 1:3, 5:7] = 1  # image 0, pixels y 8..24, x 40..56
    targets = np.array([[0, 0, 0.25, 0.75, 0.2, 0.2]])  # a box far from the masked cells
    f = tmp_path / "imitation.jpg"
    mosaic = plot_imitation_masks(images, mask, targets, fname=f)
    assert cv2.imread(str(f)).shape == mosaic.shape == (128, 128, 3)  # 2 images -> 2 x 2 grid, one column used
    grey = np.array([127.5] * 3)
    tinted = grey * 0.5 + np.array(MASK_COLORS[0]) * 0.5
    np.testing.assert_allclose(mosaic[16, 48], tinted, atol=1.5)
    np.testing.assert_allclose(mosaic[16, 20], grey, atol=1.5)  # unmasked cell keeps its colour
    np.testing.assert_allclose(mosaic[64 + 16, 48], grey, atol=1.5)  # image 1 (below image 0) has an empty mask
    assert (mosaic[16:48, 80:112] == 255).all()  # the unused tile stays white


def test_plot_imitation_masks_levels_and_shapes(tmp_path):
    images = np.zeros((1, 3, 64, 64), dtype=np.uint8)
    p3 = np.zeros((1, 8, 8))
    p3[0, 0, 0] = 1  # pixels 0..8
    p4 = torch.zeros(1, 1, 4, 4)
    p4[0, 0, 3, 3] = 1  # pixels 48..64
    mosaic = plot_imitation_masks(images, [p3, p4], np.zeros((0, 6)), fname=tmp_path / "m.jpg", alpha=1.0)
    np.testing.assert_array_equal(mosaic[4, 4], MASK_COLORS[0])
    np.testing.assert_array_equal(mosaic[52, 52], MASK_COLORS[1])
    assert (mosaic[20:30, 30:40] == 0).all()
    with pytest.raises(ValueError):
        plot_imitation_masks(images, torch.zeros(2, 8, 8), np.zeros((0, 6)), fname=tmp_path / "bad.jpg")


def write_results_csv(file: Path, epochs: int = 4) -> list[str]:
    columns = ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "train/imitation_loss",
               "metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
               "val/box_loss", "val/obj_loss", "val/cls_loss", "x/lr0", "x/lr1", "x/lr2"]  # fmt: skip
    data = np.random.default_rng(0).random((epochs, len(columns)))
    data[:, 0] = np.arange(epochs)
    pd.DataFrame(data, columns=[f"{c:>20}" for c in columns]).to_csv(file, index=False)  # YOLOv5 pads names
    return columns


def test_plot_results_with_imitation_column(tmp_path):
    from utils.plots import _results_panels

    columns = write_results_csv(tmp_path / "results.csv")
    out = plot_results(file=tmp_path / "results.csv")
    assert out == tmp_path / "results.png"
    im = cv2.imread(str(out))
    assert im is not None and im.shape[0] > 100 and im.shape[1] > 100
    panels = sum(_results_panels(columns), [])
    assert sorted(panels) == sorted(columns[1:])  # every column but epoch gets a panel
    assert _results_panels(columns)[0][:4] == ["train/box_loss", "train/obj_loss", "train/cls_loss",
                                               "train/imitation_loss"]  # fmt: skip


def test_plot_results_one_epoch_and_missing(tmp_path):
    write_results_csv(tmp_path / "results.csv", epochs=1)
    assert plot_results(file="", dir=tmp_path).is_file()
    with pytest.raises(UserError):
        plot_results(file=tmp_path / "empty" / "results.csv")


def test_plot_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.c_[rng.integers(0, 3, 40), rng.random((40, 4)) * 0.5 + 0.1]
    plot_labels(labels, names={0: "circle", 1: "square", 2: "triangle"}, save_dir=tmp_path)
    for name in ("labels.jpg", "labels_correlogram.jpg"):
        im = cv2.imread(str(tmp_path / name))
        assert im is not None and im.shape[0] > 100
    plot_labels(np.zeros((0, 5)), names=["only"], save_dir=tmp_path / "")  # a dataset without boxes
    assert cv2.imread(str(tmp_path / "labels.jpg")) is not None


def test_feature_visualization(tmp_path):
    x = torch.rand(1, 10, 8, 6)
    feature_visualization(x, "models.common.C3", 4, n=4, save_dir=tmp_path)
    assert cv2.imread(str(tmp_path / "stage4_C3_features.png")) is not None
    np.testing.assert_allclose(np.load(tmp_path / "stage4_C3_features.npy"), x[0].numpy())
    feature_visualization(x, "models.yolo.Detect", 5, save_dir=tmp_path)  # Detect outputs are skipped
    assert not list(tmp_path.glob("stage5*"))
