"""Plotting: the colour palette, OpenCV box annotation, image mosaics, training curves and label statistics.

Images drawn with OpenCV are numpy uint8 HWC arrays; mosaics of training batches are built in RGB and converted to
BGR only when written. Charts use standalone matplotlib ``Figure`` objects (never pyplot), so importing this module
changes no backend, rc setting or other global state.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure

from utils.general import LOGGER, UserError, clip_boxes, increment_path, xywh2xyxy, xyxy2xywh


class Colors:
    """YOLOv5's 20-colour palette (Ultralytics hex codes): colors(i) -> (r, g, b), colors(i, bgr=True) -> (b, g, r)."""

    HEX = (
        "FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
        "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7",
    )  # fmt: skip

    def __init__(self):
        self.palette = [self.hex2rgb(f"#{c}") for c in self.HEX]
        self.n = len(self.palette)

    def __call__(self, i: int, bgr: bool = False) -> tuple[int, int, int]:
        c = self.palette[int(i) % self.n]
        return (c[2], c[1], c[0]) if bgr else c

    @staticmethod
    def hex2rgb(h: str) -> tuple[int, int, int]:
        """'#RRGGBB' -> (r, g, b) integers."""
        return tuple(int(h[1 + i : 1 + i + 2], 16) for i in (0, 2, 4))


colors = Colors()  # for 'from utils.plots import colors'


class Annotator:
    """Draw boxes, labels and text onto an image with OpenCV, in place.

    im: HWC uint8 array (BGR or RGB: colours are passed in the image's own channel order).
    line_width: box line width in pixels; default ~0.3% of the mean image side, at least 2.
    font_size: label text height in pixels (roughly); default derived from line_width.
    example: ignored (YOLOv5 uses it to pick a unicode font; OpenCV draws ASCII only, others become '?').
    """

    def __init__(self, im: np.ndarray, line_width: int | None = None, font_size: float | None = None, example="abc"):
        if not im.flags.c_contiguous or not im.flags.writeable:
            raise ValueError("Annotator needs a writeable contiguous image: pass np.ascontiguousarray(im)")
        self.im = im
        self.lw = line_width or max(round(sum(im.shape) / 2 * 0.003), 2)
        self.tf = max(self.lw - 1, 1)  # text thickness
        self.font_scale = max(font_size / 30, 0.25) if font_size else self.lw / 3

    def box_label(self, box, label: str = "", color=(128, 128, 128), txt_color=(255, 255, 255)) -> None:
        """Draw an xyxy pixel box and, when label is given, a filled tag above it (inside if no room above)."""
        p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
        cv2.rectangle(self.im, p1, p2, color, thickness=self.lw, lineType=cv2.LINE_AA)
        if label:
            label = _ascii(label)
            w, h = cv2.getTextSize(label, 0, fontScale=self.font_scale, thickness=self.tf)[0]
            outside = p1[1] - h >= 3
            p2 = p1[0] + w, p1[1] - h - 3 if outside else p1[1] + h + 3
            cv2.rectangle(self.im, p1, p2, color, -1, cv2.LINE_AA)  # filled tag
            org = (p1[0], p1[1] - 2 if outside else p1[1] + h + 2)
            cv2.putText(self.im, label, org, 0, self.font_scale, txt_color, thickness=self.tf, lineType=cv2.LINE_AA)

    def rectangle(self, xy, fill=None, outline=None, width: int = 1) -> None:
        """Draw an xyxy rectangle: filled with `fill` and/or outlined with `outline` (colours or None)."""
        p1, p2 = (int(xy[0]), int(xy[1])), (int(xy[2]), int(xy[3]))
        if fill is not None:
            cv2.rectangle(self.im, p1, p2, fill, -1)
        if outline is not None:
            cv2.rectangle(self.im, p1, p2, outline, width)

    def text(self, xy, text: str, txt_color=(255, 255, 255), anchor: str = "top") -> None:
        """Write text with its top-left corner at xy (anchor='top') or its bottom-left at xy (anchor='bottom')."""
        text = _ascii(text)
        h = cv2.getTextSize(text, 0, fontScale=self.font_scale, thickness=self.tf)[0][1]
        org = (int(xy[0]), int(xy[1]) + (h if anchor == "top" else 0))
        cv2.putText(self.im, text, org, 0, self.font_scale, txt_color, thickness=self.tf, lineType=cv2.LINE_AA)

    def result(self) -> np.ndarray:
        return np.asarray(self.im)


def _ascii(s: str) -> str:
    return s.encode("ascii", "replace").decode()


def save_one_box(xyxy, im: np.ndarray, file=Path("im.jpg"), gain=1.02, pad=10, square=False, BGR=False, save=True):
    """Crop box xyxy (pixels) out of BGR image im, enlarged to wh * gain + pad, and write it to an unused file name.

    square: make the crop square (side = the longer box side) before enlarging. Returns the crop, BGR if BGR else
    RGB. The file is written from the BGR crop, so its colours are right either way.
    """
    xyxy = torch.as_tensor(xyxy, dtype=torch.float32).view(-1, 4)
    b = xyxy2xywh(xyxy)
    if square:
        b[:, 2:] = b[:, 2:].max(1)[0].unsqueeze(1)
    b[:, 2:] = b[:, 2:] * gain + pad
    xyxy = xywh2xyxy(b).long()
    clip_boxes(xyxy, im.shape)
    crop = im[int(xyxy[0, 1]) : int(xyxy[0, 3]), int(xyxy[0, 0]) : int(xyxy[0, 2])]
    if save:
        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        f = str(increment_path(file).with_suffix(".jpg"))
        cv2.imwrite(f, crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return crop if BGR else crop[..., ::-1]


def output_to_target(output: list[torch.Tensor], max_det: int = 300) -> np.ndarray:
    """NMS output (per image [n, 6] xyxy, conf, class) -> [m, 7] (image index, class, x, y, w, h, conf) for plotting."""
    targets = [np.zeros((0, 7), dtype=np.float32)]
    for i, o in enumerate(output):
        box, conf, cls = o[:max_det, :6].detach().cpu().float().split((4, 1, 1), 1)
        j = torch.full((conf.shape[0], 1), float(i))
        targets.append(torch.cat((j, cls, xyxy2xywh(box), conf), 1).numpy())
    return np.concatenate(targets, 0)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _build_mosaic(images: np.ndarray, max_subplots: int, max_size: int = 1920):
    """Tile up to max_subplots CHW images column-major into a square grid (RGB uint8, white background).

    Returns (mosaic, bs, ns, tile h, tile w, scale): scale < 1 when the mosaic was shrunk to max_size.
    """
    bs, _, h, w = images.shape
    bs = min(bs, max_subplots)
    ns = int(np.ceil(bs**0.5))
    if images.dtype != np.uint8:
        images = images[:bs] * (255 if bs and images[0].max() <= 1 else 1)  # [0, 1] floats -> [0, 255]
    mosaic = np.full((ns * h, ns * w, 3), 255, dtype=np.uint8)
    for i in range(bs):
        x, y = w * (i // ns), h * (i % ns)
        mosaic[y : y + h, x : x + w] = images[i].transpose(1, 2, 0).clip(0, 255).astype(np.uint8)
    scale = max_size / ns / max(h, w)
    if scale < 1:
        h, w = math.ceil(scale * h), math.ceil(scale * w)
        mosaic = cv2.resize(mosaic, (w * ns, h * ns))
    return np.ascontiguousarray(mosaic), bs, ns, h, w, min(scale, 1.0)


def _annotate_mosaic(mosaic, bs, ns, h, w, scale, targets, paths, names) -> Annotator:
    """Draw tile borders, file names and the targets' boxes (labels, or predictions with conf > 0.25) on a mosaic."""
    fs = int((h + w) * ns * 0.01)  # font size
    annotator = Annotator(mosaic, line_width=round(fs / 10), font_size=fs, example=names)
    targets = _to_numpy(targets) if targets is not None and len(targets) else np.zeros((0, 6))
    for i in range(bs):
        x, y = w * (i // ns), h * (i % ns)
        annotator.rectangle([x, y, x + w, y + h], None, (255, 255, 255), width=2)
        if paths:
            annotator.text([x + 5, y + 5], Path(paths[i]).name[:40], txt_color=(220, 220, 220))
        ti = targets[targets[:, 0] == i]
        if not len(ti):
            continue
        boxes = xywh2xyxy(ti[:, 2:6].astype(np.float64)).T
        classes = ti[:, 1].astype(int)
        is_label = ti.shape[1] == 6  # predictions carry a conf column
        if boxes.max() <= 1.01:  # normalized
            boxes[[0, 2]] *= w
            boxes[[1, 3]] *= h
        elif scale < 1:  # pixels of the unscaled tile
            boxes *= scale
        boxes[[0, 2]] += x
        boxes[[1, 3]] += y
        for j, box in enumerate(boxes.T.tolist()):
            cls = classes[j]
            name = _class_name(names, cls)
            if is_label or ti[j, 6] > 0.25:
                annotator.box_label(box, name if is_label else f"{name} {ti[j, 6]:.1f}", color=colors(cls))
    return annotator


def _class_name(names, cls: int) -> str:
    if names is None or len(names) == 0:
        return str(cls)
    try:
        return str(names[cls])
    except (KeyError, IndexError):
        return str(cls)


def plot_images(images, targets, paths=None, fname="images.jpg", names=None, max_subplots: int = 16) -> np.ndarray:
    """Save a grid of up to 16 images with their boxes (the train_batch*.jpg / val_batch*.jpg pictures).

    images: [B, 3, H, W] RGB, uint8 or float (0-1 or 0-255), tensor or array.
    targets: [n, 6] (image index, class, x, y, w, h) labels, or [n, 7] predictions with a final conf column;
        xywh normalized (all <= 1.01) or in pixels of the H x W images.
    Returns the RGB mosaic that was written (as BGR) to fname.
    """
    images = _to_numpy(images)
    mosaic, bs, ns, h, w, scale = _build_mosaic(images, max_subplots)
    annotator = _annotate_mosaic(mosaic, bs, ns, h, w, scale, targets, paths, names)
    cv2.imwrite(str(fname), cv2.cvtColor(annotator.result(), cv2.COLOR_RGB2BGR))
    return annotator.result()


MASK_COLORS = (colors(0), colors(11), colors(3), colors(5), colors(15))  # red, blue, orange, green, purple


def plot_imitation_masks(
    images,
    masks,
    targets,
    fname="imitation_masks.jpg",
    names=None,
    max_subplots: int = 16,
    alpha: float = 0.5,
    paths=None,
) -> np.ndarray:
    """Save a train_batch-style mosaic with each image's FGFI imitation mask tinted in, plus its GT boxes.

    images: [B, 3, H, W] RGB, uint8 or float (0-1 or 0-255).
    masks: [B, 1, h, w] or [B, h, w] 0/1 mask at feature resolution (h = H / stride), or a list of such, one per
        imitated level; each is upsampled (nearest) to H x W and blended with weight alpha in its own colour
        (red, blue, orange, green, purple for levels 0, 1, 2, ...).
    targets: [n, 6] (image index, class, x, y, w, h) as for plot_images.
    Returns the RGB mosaic that was written (as BGR) to fname.
    """
    images = _to_numpy(images).astype(np.float32)
    if images.shape[0] and images[0].max() <= 1:
        images = images * 255
    levels = masks if isinstance(masks, (list, tuple)) else [masks]
    B, _, H, W = images.shape
    for k, m in enumerate(levels):
        m = _to_numpy(m).astype(np.float32)
        m = m[:, 0] if m.ndim == 4 else m  # [B, h, w]
        if m.shape[0] != B:
            raise ValueError(f"mask {k} has batch size {m.shape[0]}, images have {B}")
        rows = np.arange(H) * m.shape[1] // H  # nearest-neighbour source index, as torch's 'nearest'
        cols = np.arange(W) * m.shape[2] // W
        up = m[:, rows][:, :, cols][:, None] * alpha  # [B, 1, H, W] blend weight
        tint = np.array(MASK_COLORS[k % len(MASK_COLORS)], dtype=np.float32).reshape(1, 3, 1, 1)
        images = images * (1 - up) + tint * up
    mosaic, bs, ns, h, w, scale = _build_mosaic(images, max_subplots)
    annotator = _annotate_mosaic(mosaic, bs, ns, h, w, scale, targets, paths, names)
    if len(levels) > 1:  # legend: one line per level in its colour, bottom-left of the mosaic
        for k in range(len(levels)):
            y = mosaic.shape[0] - 5 - 20 * (len(levels) - 1 - k)
            annotator.text([5, y], f"level {k}", txt_color=MASK_COLORS[k % len(MASK_COLORS)], anchor="bottom")
    cv2.imwrite(str(fname), cv2.cvtColor(annotator.result(), cv2.COLOR_RGB2BGR))
    return annotator.result()


def _smooth(y: np.ndarray, sigma: float = 3) -> np.ndarray:
    """Gaussian smoothing with reflected edges (scipy.ndimage.gaussian_filter1d's default, truncate=4)."""
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    return np.convolve(np.pad(y, radius, mode="symmetric"), kernel, mode="valid")


def _results_panels(columns: list[str]) -> list[list[str]]:
    """Lay results.csv columns out in rows: train losses + P/R, val losses + mAPs, then everything else."""
    top = [c for c in columns if c.startswith("train/")]
    top += [c for c in columns if c.startswith("metrics/") and "mAP" not in c]
    bottom = [c for c in columns if c.startswith("val/")] + [c for c in columns if "mAP" in c]
    rest = [c for c in columns if c not in top + bottom and c != "epoch"]
    return [row for row in (top, bottom, rest) if row]


def plot_results(file="path/to/results.csv", dir="") -> Path:
    """Plot every column of the results*.csv files in file's folder (or dir) against epoch into results.png.

    Columns are whatever training logged (loss names follow the loss dict, e.g. 'train/imitation_loss'); they
    are laid out as train losses + precision/recall, val losses + mAPs, then other columns (learning rates).
    """
    import pandas as pd

    save_dir = Path(file).parent if file else Path(dir)
    files = sorted(save_dir.glob("results*.csv"))
    if not files:
        raise UserError(f"no results*.csv files found in {save_dir.resolve()}: nothing to plot")
    tables = []
    for f in files:
        data = pd.read_csv(f)
        data.columns = [c.strip() for c in data.columns]
        tables.append((f, data))
    rows = _results_panels(list(tables[0][1].columns))
    ncols = max(len(r) for r in rows)
    fig = Figure(figsize=(2.4 * ncols, 3 * len(rows)), tight_layout=True)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for r, row in enumerate(rows):
        for c, col in enumerate(row):
            ax = axes[r, c]
            ax.set_visible(True)
            ax.set_title(col, fontsize=10)
            for f, data in tables:
                if col not in data:
                    continue
                x = data["epoch"].to_numpy() if "epoch" in data else np.arange(len(data))
                y = pd.to_numeric(data[col], errors="coerce").to_numpy(dtype=float)
                ax.plot(x, y, marker=".", label=f.stem, linewidth=2, markersize=8)
                if len(y) > 1 and np.isfinite(y).all():
                    ax.plot(x, _smooth(y), ":", label="smooth", linewidth=2)
    axes[0, min(1, ncols - 1)].legend()
    out = save_dir / "results.png"
    fig.savefig(out, dpi=200)
    return out


def plot_labels(labels, names=(), save_dir=Path("")) -> None:
    """Save labels.jpg (class histogram, box shapes, centre and size distributions) and labels_correlogram.jpg.

    labels: [n, 5] (class, x, y, w, h) with xywh normalized, all images concatenated. names: dict or list.
    """
    import pandas as pd

    save_dir = Path(save_dir)
    LOGGER.info(f"Plotting labels to {save_dir / 'labels.jpg'}... ")
    labels = np.asarray(labels, dtype=np.float64).reshape(-1, 5)
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names or {})
    c = labels[:, 0].astype(int)
    nc = max(int(c.max()) + 1 if len(c) else 0, len(names), 1)
    x = pd.DataFrame(labels[:, 1:], columns=["x", "y", "width", "height"])

    _plot_correlogram(x, save_dir / "labels_correlogram.jpg")

    fig = Figure(figsize=(8, 8), tight_layout=True)
    ax = fig.subplots(2, 2).ravel()
    counts = np.bincount(c, minlength=nc)
    ax[0].bar(np.arange(nc), counts, width=0.8, color=[[v / 255 for v in colors(i)] for i in range(nc)])
    ax[0].set_ylabel("instances")
    if 0 < len(names) < 30:
        ax[0].set_xticks(range(len(names)))
        ax[0].set_xticklabels(list(names.values()), rotation=90, fontsize=10)
    else:
        ax[0].set_xlabel("classes")
    _hist2d_panel(ax[2], x["x"], x["y"], "x", "y")
    _hist2d_panel(ax[3], x["width"], x["height"], "width", "height")

    # every box drawn centred, to show the spread of shapes (first 1000)
    side = 2000
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    boxes = labels[:1000].copy()
    boxes[:, 1:3] = 0.5
    boxes[:, 1:] = xywh2xyxy(boxes[:, 1:]) * side
    for cls, *box in boxes:
        cv2.rectangle(canvas, (int(box[0]), int(box[1])), (int(box[2]), int(box[3])), colors(int(cls)), 1)
    ax[1].imshow(canvas)
    ax[1].axis("off")
    for a in ax:
        for s in ("top", "right", "left", "bottom"):
            a.spines[s].set_visible(False)
    fig.savefig(save_dir / "labels.jpg", dpi=200)


def _hist2d_panel(ax, x, y, xlabel: str = "", ylabel: str = "", bins: int = 50) -> None:
    """2-D histogram, empty bins blank, colours saturating at the 90th percentile of the filled bins (seaborn's pmax)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if not len(x):
        return
    counts, xedges, yedges = np.histogram2d(np.asarray(x), np.asarray(y), bins=bins)
    vmax = np.quantile(counts[counts > 0], 0.9)
    ax.pcolormesh(xedges, yedges, np.ma.masked_equal(counts.T, 0), cmap="Blues", vmin=0, vmax=max(vmax, 1))


def _plot_correlogram(x, file: Path) -> None:
    """Lower-triangle grid of 2-D histograms of the box columns, 1-D histograms on the diagonal."""
    cols = list(x.columns)
    n = len(cols)
    fig = Figure(figsize=(2 * n, 2 * n), tight_layout=True)
    axes = fig.subplots(n, n, squeeze=False)
    for i in range(n):
        for j in range(n):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            if len(x):
                if i == j:
                    ax.hist(x[cols[i]], bins=50)
                else:
                    _hist2d_panel(ax, x[cols[j]], x[cols[i]])
            ax.set_xlabel(cols[j] if i == n - 1 else "")
            ax.set_ylabel(cols[i] if j == 0 else "")
    fig.savefig(file, dpi=200)


def feature_visualization(x: torch.Tensor, module_type: str, stage: int, n: int = 32, save_dir=Path("runs/detect/exp")):
    """Save up to n channels of feature map x [B, C, H, W] (first image) as stage{stage}_{type}_features.png."""
    if "Detect" in module_type:
        return
    _, channels, height, width = x.shape
    if height > 1 and width > 1:
        f = Path(save_dir) / f"stage{stage}_{module_type.split('.')[-1]}_features.png"
        n = min(n, channels)
        fig = Figure(tight_layout=True)
        ax = fig.subplots(math.ceil(n / 8), 8, squeeze=False).ravel()
        for i in range(len(ax)):
            if i < n:
                ax[i].imshow(x[0, i].detach().cpu().float().numpy())
            ax[i].axis("off")
        LOGGER.info(f"Saving {f}... ({n}/{channels})")
        fig.savefig(f, dpi=300, bbox_inches="tight")
        np.save(str(f.with_suffix(".npy")), x[0].detach().cpu().numpy())


def hist2d(x: np.ndarray, y: np.ndarray, n: int = 100) -> np.ndarray:
    """Log of the 2-D histogram count of the bin each (x, y) point falls in (point colours for scatter plots)."""
    xedges, yedges = np.linspace(x.min(), x.max(), n), np.linspace(y.min(), y.max(), n)
    hist, xedges, yedges = np.histogram2d(x, y, (xedges, yedges))
    xidx = np.clip(np.digitize(x, xedges) - 1, 0, hist.shape[0] - 1)
    yidx = np.clip(np.digitize(y, yedges) - 1, 0, hist.shape[1] - 1)
    return np.log(hist[xidx, yidx])


def plot_evolve(evolve_csv="path/to/evolve.csv", n_metrics: int = 7) -> Path:
    """Scatter each evolved hyperparameter of evolve.csv against fitness; saves evolve.png beside it.

    The first n_metrics columns are results (P, R, mAP@.5, mAP@.5:.95, val losses); the rest are hyperparameters.
    """
    import pandas as pd

    from utils.metrics import fitness

    evolve_csv = Path(evolve_csv)
    data = pd.read_csv(evolve_csv)
    keys = [k.strip() for k in data.columns]
    values = data.to_numpy(dtype=float)
    f = fitness(values)
    j = int(np.argmax(f))
    hyp_keys = keys[n_metrics:]
    ncols = 5
    fig = Figure(figsize=(10, 2 * math.ceil(len(hyp_keys) / ncols) + 0.5), tight_layout=True)
    axes = fig.subplots(max(math.ceil(len(hyp_keys) / ncols), 1), ncols, squeeze=False).ravel()
    LOGGER.info(f"Best results from row {j} of {evolve_csv}:")
    for i, k in enumerate(hyp_keys):
        v = values[:, n_metrics + i]
        mu = v[j]
        axes[i].scatter(v, f, c=hist2d(v, f, 20), cmap="viridis", alpha=0.8, edgecolors="none")
        axes[i].plot(mu, f.max(), "k+", markersize=15)
        axes[i].set_title(f"{k} = {mu:.3g}", fontdict={"size": 9})
        LOGGER.info(f"{k:>15}: {mu:.3g}")
    for a in axes[len(hyp_keys) :]:
        a.set_visible(False)
    out = evolve_csv.with_suffix(".png")
    fig.savefig(out, dpi=200)
    LOGGER.info(f"Saved {out}")
    return out
