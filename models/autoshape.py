"""Inference on ordinary inputs, as YOLOv5's torch.hub models run it: AutoShape wraps a DetectionModel and takes
file paths, PIL images, numpy/OpenCV arrays (HWC, RGB) or lists of them; Detections holds the results.

    model = torch.hub.load("path/to/yolov5-fgfi", "custom", path="best.pt", source="local")
    results = model(["bus.jpg", Image.open("zidane.jpg")], size=640)
    results.print(); results.save(); results.pandas().xyxy[0]  # xmin ymin xmax ymax confidence class name

Each image is letterboxed to one batch shape (the largest image scaled to `size`, rounded up to the stride), the
model runs once on the batch, NMS keeps the boxes above `conf` (model.conf, model.iou, model.classes, model.max_det,
settable), and the boxes are scaled back to each original image. Files are read with OpenCV, as detect.py reads
them, so the two give the same boxes.
"""

from __future__ import annotations

import time
from copy import copy
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from utils.augmentations import letterbox
from utils.general import LOGGER, UserError, increment_path, non_max_suppression, scale_boxes, xyxy2xywh
from utils.plots import Annotator, colors, save_one_box


class AutoShape(nn.Module):
    """A DetectionModel for inference on any image input; forward(ims, size=640) -> Detections."""

    conf = 0.25  # NMS confidence threshold
    iou = 0.45  # NMS IoU threshold
    agnostic = False  # class-agnostic NMS
    multi_label = False  # several labels per box
    classes = None  # keep only these class indices, e.g. [0, 15, 16]
    max_det = 1000  # boxes per image

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.names = dict(enumerate(model.names)) if isinstance(model.names, (list, tuple)) else dict(model.names)
        self.stride = int(max(model.stride.max(), 32))

    @torch.no_grad()
    def forward(self, ims, size: int | tuple[int, int] = 640, augment: bool = False) -> Detections:
        """ims: a path (str/Path), PIL image, HWC RGB uint8 array, or a list of them; a [B, 3, H, W] tensor in 0..1
        runs as it is (raw model output, no NMS), as YOLOv5's AutoShape. size: longest side of the batch, pixels
        (or height, width).

        Each image is letterboxed exactly as detect.py letterboxes it at --imgsz size (same scale, the smallest
        multiple of the stride): a single image gives detect.py's boxes and confidences. In a batch of several, each
        is then centred in the batch's largest shape; the boxes map back the same way, and the confidences can
        differ slightly from detect.py's where the extra padding reaches an object's receptive field."""
        if isinstance(ims, torch.Tensor):
            if ims.dim() != 4:
                raise UserError(f"a tensor input must be [B, 3, H, W] in 0..1, got shape {tuple(ims.shape)}")
            return self.model(ims.to(next(self.model.parameters())), augment=augment)
        sizes = [size] if isinstance(size, int) else list(size)
        if not 1 <= len(sizes) <= 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in sizes):
            raise UserError(f"size={size!r}: give the longest side in pixels (an int >= 1) or (height, width)")
        t0 = time.perf_counter()
        ims = list(ims) if isinstance(ims, (list, tuple)) else [ims]
        if not ims:
            raise UserError("no images given: pass a path, PIL image, HWC uint8 array, or a list of them")
        files, originals = [], []
        for i, im in enumerate(ims):
            name, im = _read(im, i)
            files.append(_unique(name, files))  # two x.jpg from different folders must not overwrite each other
            originals.append(im)
        size = (sizes[0], sizes[0]) if len(sizes) == 1 else tuple(sizes)
        boxed = [letterbox(im, size, stride=self.stride, auto=True)[0] for im in originals]  # detect.py's
        h, w = max(b.shape[0] for b in boxed), max(b.shape[1] for b in boxed)  # multiples of the stride
        batch = np.stack([_centre(b, h, w) for b in boxed])
        x = torch.from_numpy(batch.transpose(0, 3, 1, 2).copy()).to(next(self.model.parameters()))
        x = x / 255
        t1 = time.perf_counter()
        out = self.model(x, augment=augment)[0]
        t2 = time.perf_counter()
        pred = non_max_suppression(
            out, self.conf, self.iou, self.classes, self.agnostic, self.multi_label, max_det=self.max_det
        )
        for det, im in zip(pred, originals):
            scale_boxes(x.shape[2:], det[:, :4], im.shape)
        t3 = time.perf_counter()
        times = [(t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000]
        return Detections(originals, pred, files, times, self.names, tuple(x.shape))


def _unique(name: str, taken: list[str]) -> str:
    """name, or name_2, name_3, ... (before the suffix) when an earlier input of the batch has it."""
    if name not in taken:
        return name
    stem, suffix = Path(name).stem, Path(name).suffix
    return next(f"{stem}_{k}{suffix}" for k in range(2, len(taken) + 2) if f"{stem}_{k}{suffix}" not in taken)


def _centre(im: np.ndarray, h: int, w: int) -> np.ndarray:
    """im padded (grey 114, as letterbox) to h x w with the image centred, as letterbox centres it."""
    top, left = (h - im.shape[0]) // 2, (w - im.shape[1]) // 2
    if (top, left) == (0, 0) and im.shape[:2] == (h, w):
        return im
    bottom, right = h - im.shape[0] - top, w - im.shape[1] - left
    return cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))


def _read(im, i: int) -> tuple[str, np.ndarray]:
    """(file name, HWC RGB uint8 array) of one input."""
    if isinstance(im, (str, Path)):
        file = Path(im)
        data = cv2.imread(str(file)) if file.is_file() else None
        if data is None:
            raise UserError(f"{file}: not an image file that OpenCV can read")
        return file.with_suffix(".jpg").name, np.ascontiguousarray(data[..., ::-1])
    if hasattr(im, "convert") and hasattr(im, "size"):  # PIL image
        from PIL import ImageOps

        name = Path(getattr(im, "filename", "") or f"image{i}").with_suffix(".jpg").name
        return name, np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    if isinstance(im, np.ndarray):
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        if im.ndim != 3 or im.shape[2] not in (3, 4) or 0 in im.shape:
            raise UserError(f"image {i}: a numpy image must be HWC with 3 channels (RGB), got shape {im.shape}")
        if im.dtype != np.uint8:  # uint16 read as 0..255 gives false boxes, 0..1 floats none: refused, not guessed
            raise UserError(
                f"image {i}: numpy dtype {im.dtype}; pass uint8 RGB in 0..255 (e.g. (x * 255).round().astype(np.uint8) "
                "for 0..1 floats)"
            )
        return f"image{i}.jpg", np.ascontiguousarray(im[..., :3])
    raise UserError(f"image {i}: {type(im).__name__} is not an image: pass a path, PIL image or HWC numpy array")


class Detections:
    """Results of AutoShape on a batch: per image, boxes [n, 6] (x1, y1, x2, y2, confidence, class) in its pixels.

    Attributes: ims (HWC RGB arrays), pred / xyxy (the boxes), xywh, xyxyn, xywhn (the same as centre-size and
    normalized to the image), files, names, n (images), t (pre-process, inference, NMS ms per image), s (batch shape).
    """

    def __init__(self, ims, pred, files, times=(0, 0, 0), names=None, shape=None):
        self.ims, self.pred, self.files, self.names, self.s = ims, pred, files, names or {}, shape
        gains = [
            torch.tensor([w, h, w, h, 1.0, 1.0], device=p.device)
            for p, (h, w) in zip(pred, [im.shape[:2] for im in ims])
        ]
        self.xyxy = pred
        self.xywh = [torch.cat((xyxy2xywh(p[:, :4]), p[:, 4:]), 1) for p in pred]
        self.xyxyn = [p / g for p, g in zip(self.xyxy, gains)]
        self.xywhn = [p / g for p, g in zip(self.xywh, gains)]
        self.n = len(pred)
        self.t = tuple(x / max(self.n, 1) for x in times)

    def _summary(self, i: int) -> str:
        det = self.pred[i]
        h, w = self.ims[i].shape[:2]
        s = f"image {i + 1}/{self.n}: {h}x{w} "
        if not len(det):
            return s + "(no detections)"
        counts = det[:, 5].long().bincount(minlength=len(self.names))
        parts = [f"{int(c)} {self.names.get(k, k)}{'s' * (c > 1)}" for k, c in enumerate(counts.tolist()) if c]
        return s + ", ".join(parts)

    def _annotated(self, i: int, labels: bool = True) -> np.ndarray:
        im = np.ascontiguousarray(self.ims[i].copy())
        annotator = Annotator(im)
        for *box, conf, cls in reversed(self.pred[i].tolist()):
            label = f"{self.names.get(int(cls), int(cls))} {conf:.2f}" if labels else ""
            annotator.box_label(box, label, color=colors(int(cls)))
        return annotator.result()

    def print(self) -> None:
        for i in range(self.n):
            LOGGER.info(self._summary(i))
        pre, inference, nms = self.t
        LOGGER.info(
            f"Speed: {pre:.1f}ms pre-process, {inference:.1f}ms inference, {nms:.1f}ms NMS per image at shape {self.s}"
        )

    def render(self, labels: bool = True) -> list[np.ndarray]:
        """Draw the boxes into the images (RGB), which are returned and kept as self.ims."""
        self.ims = [self._annotated(i, labels) for i in range(self.n)]
        return self.ims

    def save(self, labels: bool = True, save_dir: str | Path = "runs/detect/exp", exist_ok: bool = False) -> Path:
        """Annotated images as save_dir/<file name>; returns save_dir (incremented unless exist_ok)."""
        try:
            save_dir = increment_path(save_dir, exist_ok=exist_ok, mkdir=True)
        except OSError as e:
            raise UserError(
                f"results.save: cannot make {save_dir} ({e.strerror or e}); pass a writable save_dir"
            ) from None
        for i, f in enumerate(self.files):
            file = save_dir / f
            if not cv2.imwrite(str(file), self._annotated(i, labels)[..., ::-1]):
                raise UserError(f"results.save: could not write {file} (read-only folder or full disk?)")
        LOGGER.info(f"Saved {self.n} image{'s' * (self.n > 1)} to {save_dir}")
        return save_dir

    def crop(self, save: bool = True, save_dir: str | Path = "runs/detect/exp", exist_ok: bool = False) -> list[dict]:
        """One dict per box (box, conf, cls, label, im: the RGB crop); saved as save_dir/crops/<name>/<file>."""
        save_dir = increment_path(save_dir, exist_ok=exist_ok, mkdir=True) if save else None
        crops = []
        for i, f in enumerate(self.files):
            bgr = np.ascontiguousarray(self.ims[i][..., ::-1])
            for *box, conf, cls in reversed(self.pred[i].tolist()):
                name = self.names.get(int(cls), int(cls))
                file = save_dir / "crops" / str(name) / f if save else Path(f)
                im = save_one_box(box, bgr, file=file, BGR=True, save=save)[..., ::-1]
                crops.append(dict(box=box, conf=conf, cls=int(cls), label=f"{name} {conf:.2f}", im=im))
        return crops

    def pandas(self) -> Detections:
        """A copy whose xyxy, xywh, xyxyn, xywhn are lists of DataFrames (columns as YOLOv5's: xmin ymin xmax ymax
        or xcenter ycenter width height, then confidence class name)."""
        import pandas as pd

        new = copy(self)
        columns = {
            "xyxy": ["xmin", "ymin", "xmax", "ymax"], "xyxyn": ["xmin", "ymin", "xmax", "ymax"],
            "xywh": ["xcenter", "ycenter", "width", "height"], "xywhn": ["xcenter", "ycenter", "width", "height"],
        }  # fmt: skip
        for key, cols in columns.items():
            frames = []
            for p in getattr(self, key):
                rows = [[*x[:5], int(x[5]), self.names.get(int(x[5]), int(x[5]))] for x in p.tolist()]
                frames.append(pd.DataFrame(rows, columns=[*cols, "confidence", "class", "name"]))
            setattr(new, key, frames)
        return new

    def tolist(self) -> list[Detections]:
        """One Detections per image."""
        return [
            Detections([self.ims[i]], [self.pred[i]], [self.files[i]], [t * self.n for t in self.t], self.names, self.s)
            for i in range(self.n)
        ]

    def __len__(self) -> int:
        return self.n

    def __str__(self) -> str:
        return "\n".join(self._summary(i) for i in range(self.n))

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__} of {self.n} images>\n{self}"
