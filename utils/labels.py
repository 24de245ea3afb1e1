"""YOLO-format label files: where they live, how they are parsed and checked, and the cache hash.

A label file mirrors its image path with `/images/` -> `/labels/` and a `.txt` suffix; each row is
`class x_center y_center width height`, normalized to the image (0-1). Rows with more than 6 numbers are polygons
`class x1 y1 x2 y2 ...` (normalized), turned into their bounding boxes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from utils.general import IMG_FORMATS

_EXIF_ORIENTATION = 0x0112
CACHE_META_KEYS = ("hash", "results", "msgs", "version", "nc")


def get_hash(paths: list[str]) -> str:
    """One md5 over every path with its size and modification time (ns): changes when a file is added, removed or
    rewritten, also in place to the same size (YOLOv5 hashes the total size only, and keeps stale labels then)."""
    h = hashlib.md5()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # missing: the path alone
            h.update(f"{p}\0-\n".encode())
    return h.hexdigest()


def exif_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of a PIL image after its EXIF rotation (cv2.imread applies it too)."""
    s = img.size
    with contextlib.suppress(Exception):
        if img.getexif().get(_EXIF_ORIENTATION) in (6, 8):  # rotated 90 or 270 degrees
            s = (s[1], s[0])
    return s


def img2label_paths(img_paths: list[str]) -> list[str]:
    """/a/images/b/c.jpg -> /a/labels/b/c.txt (the last /images/ in the path is replaced)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [sb.join(x.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt" for x in img_paths]


def segments2boxes(segments: list[np.ndarray]) -> np.ndarray:
    """Polygons, each [m, 2] (x, y), -> boxes [n, 4] (x center, y center, w, h) in the same units."""
    boxes = []
    for s in segments:
        x, y = s.T
        boxes.append([x.min(), y.min(), x.max(), y.max()])
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    return np.stack(
        ((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, *(boxes[:, 2:] - boxes[:, :2]).T), 1
    )


def _parse_labels(lb_file: str, nc: int | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Read one label file -> ([n, 5] float32 (class, xywhn), polygons). Raises ValueError naming the problem."""
    with open(lb_file) as f:
        rows = [x.split() for x in f.read().strip().splitlines() if x.strip()]
    segments = []
    try:
        if any(len(x) > 6 for x in rows):  # polygon labels
            bad = [i + 1 for i, x in enumerate(rows) if len(x) < 7 or len(x) % 2 == 0]
            if bad:
                raise ValueError(
                    f"polygon rows need a class and >= 3 x y pairs; line {bad[0]} has {len(rows[bad[0] - 1])} values"
                )
            classes = np.array([x[0] for x in rows], dtype=np.float32)
            segments = [np.array(x[1:], dtype=np.float32).reshape(-1, 2) for x in rows]
            lb = np.concatenate((classes.reshape(-1, 1), segments2boxes(segments)), 1)
            coords = np.concatenate(segments, 0) if segments else np.zeros((0, 2), np.float32)
        else:
            bad = [i + 1 for i, x in enumerate(rows) if len(x) != 5]
            if bad:
                raise ValueError(f"labels require 5 columns, line {bad[0]} has {len(rows[bad[0] - 1])}")
            lb = np.array(rows, dtype=np.float32).reshape(-1, 5)
            coords = lb[:, 1:]
    except ValueError as e:
        if "could not convert" in str(e):
            raise ValueError(f"non-numeric value ({str(e).split(': ')[-1]})") from None
        raise
    if not np.isfinite(lb).all() or not np.isfinite(coords).all():
        raise ValueError("non-finite values (nan/inf)")
    if (lb < 0).any() or (coords < 0).any():
        raise ValueError(f"negative label values {np.concatenate((lb[lb < 0], coords[coords < 0]))}")
    if (coords > 1).any():
        raise ValueError(f"non-normalized or out of bounds coordinates {coords[coords > 1]} (must be 0-1)")
    if (lb[:, 0] != lb[:, 0].round()).any():
        raise ValueError(f"class ids must be integers, got {lb[:, 0][lb[:, 0] != lb[:, 0].round()]}")
    if nc is not None and len(lb) and lb[:, 0].max() >= nc:
        raise ValueError(f"class id {int(lb[:, 0].max())} >= nc={nc} (valid ids are 0..{nc - 1})")
    return lb, segments


def verify_image_label(args: tuple) -> list:
    """Check one (image, label file, prefix[, nc]) pair; run in a process pool when the label cache is built.

    Returns [im_file, labels [n, 5], (w, h), segments, missing, found, empty, corrupt, message]; im_file and
    labels are None for a corrupt image or label file, which is then left out of the dataset. A class id >= nc is
    not corruption (the file is fine, the data YAML has too few names): the labels are kept, with a warning, and
    LoadImagesAndLabels stops on them.
    """
    im_file, lb_file, prefix, *rest = args
    nc = rest[0] if rest else None
    nm, nf, ne, nc_bad, msg, segments = 0, 0, 0, 0, "", []
    try:
        try:
            im = Image.open(im_file)
            im.verify()
            shape = exif_size(im)
            fmt = (im.format or "").lower()
        except Exception as e:
            raise ValueError(f"unreadable image ({e})") from None
        if shape[0] < 10 or shape[1] < 10:
            raise ValueError(f"image size {shape} < 10 pixels")
        if fmt not in IMG_FORMATS:
            raise ValueError(f"invalid image format {fmt}")
        if fmt in ("jpg", "jpeg"):
            with open(im_file, "rb") as f:
                f.seek(-2, 2)
                if f.read() != b"\xff\xd9":  # no end-of-image marker: re-save what PIL can decode, as YOLOv5
                    try:
                        ImageOps.exif_transpose(Image.open(im_file)).save(im_file, "JPEG", subsampling=0, quality=100)
                    except Exception as e:
                        raise ValueError(f"truncated JPEG that cannot be restored ({e})") from None
                    msg = f"{prefix}WARNING ⚠️ {im_file}: corrupt JPEG restored and saved"

        if os.path.isfile(lb_file):
            nf = 1
            try:
                lb, segments = _parse_labels(lb_file, None)
            except (ValueError, OSError, UnicodeDecodeError) as e:
                raise ValueError(f"bad label file {lb_file}: {e}") from None
            if nc is not None and len(lb) and lb[:, 0].max() >= nc:  # not corrupt: the data YAML lacks names
                msg = f"{prefix}WARNING ⚠️ {im_file}: class id {int(lb[:, 0].max())} >= nc={nc} in {lb_file}"
            n = len(lb)
            if n:
                _, i = np.unique(lb, axis=0, return_index=True)
                if len(i) < n:
                    i = np.sort(i)  # keep the file's order
                    lb = lb[i]
                    if segments:
                        segments = [segments[x] for x in i]
                    msg = f"{prefix}WARNING ⚠️ {im_file}: {n - len(i)} duplicate labels removed from {lb_file}"
            else:
                ne = 1
                lb = np.zeros((0, 5), dtype=np.float32)
        else:
            nm = 1
            lb = np.zeros((0, 5), dtype=np.float32)
        return [im_file, lb, shape, segments, nm, nf, ne, nc_bad, msg]
    except Exception as e:
        msg = f"{prefix}WARNING ⚠️ {im_file}: ignoring corrupt image/label: {e}"
        return [None, None, None, None, nm, nf, ne, 1, msg]


def save_label_cache(path: Path, cache: dict) -> None:
    """Write a label cache atomically as JSON (no pickle: a cache file found on disk can never run code).

    cache: {image path: [labels [n, 5] np, shape (w, h), segments list of [m, 2] np], plus the metadata keys
    'hash', 'results', 'msgs', 'version', 'nc'}.
    """
    meta = {k: v for k, v in cache.items() if k in CACHE_META_KEYS}
    entries = {
        k: [np.asarray(lb).tolist(), list(shape), [np.asarray(s).tolist() for s in segments]]
        for k, (lb, shape, segments) in ((k, v) for k, v in cache.items() if k not in CACHE_META_KEYS)
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "entries": entries}, f)
        os.replace(tmp, path)  # a concurrent reader never sees half a file
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_label_cache(path: Path) -> dict:
    """Read a cache written by save_label_cache back into the same in-memory layout (numpy arrays)."""
    with open(path) as f:
        raw = json.load(f)
    cache = {
        k: [np.array(lb, dtype=np.float32).reshape(-1, 5), tuple(shape), [np.array(s, dtype=np.float32) for s in segs]]
        for k, (lb, shape, segs) in raw["entries"].items()
    }
    meta = raw["meta"]
    meta["results"] = tuple(meta["results"])
    cache.update(meta)
    return cache
