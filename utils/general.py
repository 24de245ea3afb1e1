"""General helpers: logging, paths, dataset YAML checks, box conversions and non-maximum suppression.

Boxes follow YOLOv5's conventions: ``xyxy`` is (x1, y1, x2, y2) in pixels, ``xywh`` is (x centre, y centre,
width, height); an ``n`` suffix means normalized to the image size.
"""

from __future__ import annotations

import glob
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
import yaml

from utils.basics import LOCAL_RANK, LOGGER, RANK, WORLD_SIZE, UserError  # noqa: F401 (re-exported)
from utils.downloads import attempt_download, download_dataset

FILE = Path(__file__).resolve()
ROOT = FILE.parents[1]  # repository root
DATASETS_DIR = Path(os.getenv("YOLOV5_DATASETS_DIR", ROOT / "datasets"))
NUM_THREADS = min(8, max(1, os.cpu_count() - 1))
IMG_FORMATS = "bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm"
VID_FORMATS = "asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv"


def check_range(flag: str, value, low=None, high=None, high_open: bool = False, hint: str = "") -> None:
    """One UserError naming the flag when value is not a number in [low, high] ([low, high) with high_open; a None
    bound is unbounded), e.g. check_range('--conf-thres', 2, 0, 1)."""
    try:
        number = float(value)
        ok = math.isfinite(number) and (low is None or number >= low)  # NaN and inf fail
        ok = ok and (high is None or (number < high if high_open else number <= high))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        where = f"[{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise UserError(f"{flag} {value}: must be in {where}{f' ({hint})' if hint else ''}")


def colorstr(*parts: str) -> str:
    """Wrap a string in ANSI colours, e.g. colorstr('blue', 'bold', 'hello'); the default is blue bold."""
    *args, string = parts if len(parts) > 1 else ("blue", "bold", parts[0])
    codes = {
        "black": "\033[30m", "red": "\033[31m", "green": "\033[32m", "yellow": "\033[33m", "blue": "\033[34m",
        "magenta": "\033[35m", "cyan": "\033[36m", "white": "\033[37m", "bold": "\033[1m", "underline": "\033[4m",
        "end": "\033[0m",
    }  # fmt: skip
    return "".join(codes[x] for x in args) + f"{string}" + codes["end"]


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch RNGs; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


def increment_path(path: str | Path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """runs/exp -> runs/exp2, runs/exp3, ... unless exist_ok; the first free name is returned."""
    path = Path(path)
    if path.exists() and not exist_ok:
        path, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        for n in range(2, 10000):
            candidate = Path(f"{path}{sep}{n}{suffix}")
            if not candidate.exists():
                path = candidate
                break
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(folder: str | Path, what: str) -> None:
    """UserError (one line naming the flag, the folder and the fix) unless files can be written in folder or, where it
    does not exist yet, in its nearest existing parent. Creates nothing: call it before a run writes anything."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {folder}: {probe} is a file, not a folder; pick another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(
            f"{what} {folder}: {probe} is not writable; pick a folder you can write to, or fix its permissions"
        )


def make_divisible(x: float, divisor: int | torch.Tensor) -> int:
    """Smallest multiple of divisor that is >= x."""
    if isinstance(divisor, torch.Tensor):
        divisor = int(divisor.max())
    return math.ceil(x / divisor) * divisor


def check_img_size(imgsz: int | list[int], s: int = 32, floor: int = 0) -> int | list[int]:
    """Round image size(s) up to a multiple of the model stride s, with a warning when changed."""
    if isinstance(imgsz, int):
        new_size = max(make_divisible(imgsz, int(s)), floor)
    else:
        new_size = [max(make_divisible(x, int(s)), floor) for x in list(imgsz)]
    if new_size != imgsz:
        sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
        why = (
            f"must be a multiple of max stride {s}"
            if any(x % int(s) for x in sizes)
            else f"must be at least {floor} (2 x the largest stride, {s})"
        )
        LOGGER.warning(f"WARNING: --img-size {imgsz} {why}, updating to {new_size}")
    return new_size


def one_cycle(y1: float = 0.0, y2: float = 1.0, steps: int = 100):
    """A sinusoidal ramp from y1 to y2 over steps (https://arxiv.org/pdf/1812.01187.pdf)."""
    return lambda x: ((1 - math.cos(x * math.pi / steps)) / 2) * (y2 - y1) + y1


def intersect_dicts(da: dict, db: dict, exclude: tuple = ()) -> dict:
    """Entries of da whose key is in db with the same shape and contains none of the exclude substrings."""
    return {k: v for k, v in da.items() if k in db and all(x not in k for x in exclude) and v.shape == db[k].shape}


def check_file(file: str | Path, what: str = "file") -> str:
    """Return an existing file path (searching the repo's data/ and models/ folders too) or raise UserError."""
    file = str(file)
    if not file or Path(file).is_file():
        return file
    if Path(file).is_dir():
        raise UserError(f"{what} '{file}' is a folder: pass the file in it (e.g. {Path(file) / 'best.pt'})")
    for folder in ("data", "models", "data/hyps"):
        hits = glob.glob(str(ROOT / folder / "**" / Path(file).name), recursive=True)
        if hits:
            return hits[0]
    if attempt_download(file).is_file():  # a missing official YOLOv5 weights name: fetched from the release
        return file
    raise UserError(f"{what} '{file}' not found: check the path")


def check_yaml(file: str | Path, what: str = "YAML") -> str:
    return check_file(file, what)


def yaml_load(file: str | Path) -> dict:
    with open(file, errors="ignore") as f:
        return yaml.safe_load(f) or {}


def yaml_save(file: str | Path, data: dict) -> None:
    with open(file, "w") as f:
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in data.items()}, f, sort_keys=False)


def check_dataset(data: str | Path | dict, autodownload: bool = True) -> dict:
    """Read a data YAML, resolve its paths, and run its `download:` step when the val images are missing.

    The built-in dataset's `download:` generates it locally; a .zip URL (or a list of them) is fetched and unpacked
    into the parent of `path` (utils/downloads.py); a failed download is a UserError that says where to put the data.
    """
    if isinstance(data, (str, Path)):
        data_file = check_yaml(data, "--data")
        data = _read_mapping(data_file, "--data", "a mapping with train:, val: and names:, got a {type}")
        data["yaml_file"] = str(data_file)
    for k in ("train", "val", "names"):
        if k not in data:
            raise UserError(f"data YAML '{data.get('yaml_file', '')}' has no '{k}:' field: see data/coco128.yaml")
    if isinstance(data["names"], (list, tuple)):
        data["names"] = dict(enumerate(data["names"]))
    if not isinstance(data["names"], dict):
        raise UserError(
            f"data YAML '{data.get('yaml_file', '')}': names: {data['names']!r} must list the class names "
            "(a list, or a mapping 0: name, 1: name, ...); see data/coco128.yaml"
        )
    data["nc"] = len(data["names"]) if "nc" not in data else int(data["nc"])
    if len(data["names"]) != data["nc"]:
        raise UserError(f"data YAML: {len(data['names'])} names but nc={data['nc']}; they must agree")

    path = Path(data.get("path") or "")
    if not path.is_absolute():
        path = _resolve_root(path)
    data["path"] = path
    for k in ("train", "val", "test", "unlabeled"):
        if data.get(k):
            if isinstance(data[k], str):
                x = (path / data[k]).resolve()
                if not x.exists() and data[k].startswith("../"):
                    x = (path / data[k][3:]).resolve()
                data[k] = str(x)
            else:
                data[k] = [str((path / x).resolve()) for x in data[k]]

    val = [Path(x).resolve() for x in (data["val"] if isinstance(data["val"], list) else [data["val"]])]
    if not all(x.exists() for x in val):
        missing = ", ".join(str(x) for x in val if not x.exists())
        s = data.get("download")
        if not (s and autodownload):
            raise UserError(f"dataset not found: {missing} is missing and the data YAML has no download step")
        t = time.time()
        urls = [s] if isinstance(s, str) else s
        if isinstance(urls, list) and urls and all(str(u).startswith(("http://", "https://")) for u in urls):
            download_dataset(urls, path.parent)  # as YOLOv5: path ../datasets/coco128 -> unzipped in ../datasets
        elif isinstance(s, str) and s.startswith("bash "):
            LOGGER.info(f"Running {s} ...")
            if os.system(s) != 0:
                raise UserError(f"dataset download script failed: {s}")
        else:
            _run_download_script(s, data, missing)
        if not all(x.exists() for x in val):
            raise UserError(f"dataset not found after its download step: {missing}")
        LOGGER.info(f"Dataset ready in {time.time() - t:.1f}s: {colorstr('bold', path)}")
    return data


def _run_download_script(script, data: dict, missing: str) -> None:
    """A data YAML's Python `download:` step, as YOLOv5's YAMLs define it (run with `yaml` = the data dict). Anything
    that is not one (an ftp:// URL, a number) or that fails is one UserError naming the YAML."""
    where = f"data YAML '{data.get('yaml_file', '')}'"
    fix = f"fetch the dataset by hand so that {missing} exists"
    if not isinstance(script, str) or (script.strip().split(":", 1)[0].isalpha() and "://" in script.split()[0]):
        raise UserError(
            f"{where}: download: {script!r} is neither an http(s) .zip URL, a 'bash ...' command nor a Python "
            f"script; {fix}"
        )
    try:
        code = compile(script, "download", "exec")
    except SyntaxError as e:
        raise UserError(f"{where}: its download: step is not valid Python ({e.msg}, line {e.lineno}); {fix}") from None
    LOGGER.info("Running the data YAML's download step ...")
    try:
        exec(code, {"yaml": data})  # the YAML's own python step, as YOLOv5 data YAMLs define it
    except Exception as e:  # the user's own script: whatever it raises, one line
        raise UserError(f"{where}: its download: step failed ({type(e).__name__}: {e}); {fix}") from None


# The keys train.py reads from a hyp file (YOLOv5's), each a number; the distillation keys are optional
HYP_KEYS = (
    "lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr", "box", "cls",
    "cls_pw", "obj", "obj_pw", "iou_t", "anchor_t", "fl_gamma", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate",
    "scale", "shear", "perspective", "flipud", "fliplr", "mosaic", "mixup", "copy_paste",
)  # fmt: skip
HYP_OPTIONAL_KEYS = ("imitation", "kd", "box_kd", "kd_temperature", "anchors", "label_smoothing")


def _read_mapping(file: str | Path, flag: str, expected: str) -> dict:
    """A YAML file that must hold a mapping: a malformed file or another type is one UserError naming the flag and
    the file (expected may name the type found as {type})."""
    try:
        content = yaml_load(file)
    except yaml.YAMLError as e:
        raise UserError(f"{flag} {file}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(content, dict):
        raise UserError(f"{flag} {file}: expected {expected.replace('{type}', type(content).__name__)}")
    return content


def load_hyp(file: str | Path) -> dict:
    """A hyperparameter YAML (--hyp), checked: a mapping holding every HYP_KEYS entry as a number (and the optional
    keys, where present, too). A malformed file, a missing key or a non-number is one UserError naming the file and
    the key."""
    file = check_yaml(file, "--hyp")
    hyp = _read_mapping(file, "--hyp", "a mapping of hyperparameters (see data/hyps/hyp.scratch-low.yaml)")
    missing = [k for k in HYP_KEYS if k not in hyp]
    if missing:
        raise UserError(f"--hyp {file}: no '{missing[0]}:' key; copy it from data/hyps/hyp.scratch-low.yaml")
    for k in (*HYP_KEYS, *HYP_OPTIONAL_KEYS):
        v = hyp.get(k, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise UserError(f"--hyp {file}: {k}: {v!r} is not a number")
    return hyp


def _resolve_root(path: Path) -> Path:
    """A relative dataset `path:` is taken from the current directory if it exists there, else from DATASETS_DIR."""
    if path.exists() or str(path) in {"", "."}:
        return path.resolve()
    parts = path.parts
    if parts and parts[0] in {"..", "datasets"}:  # YOLOv5's '../datasets/xxx' convention
        parts = parts[2:] if parts[0] == ".." and len(parts) > 1 and parts[1] == "datasets" else parts[1:]
    return (DATASETS_DIR / Path(*parts)).resolve() if parts else DATASETS_DIR


# ---------------------------------------------------------------------------------------------- boxes


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xyxy2xywh(x):
    """[n, 4] (x1, y1, x2, y2) -> (x centre, y centre, w, h)."""
    y = _clone(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x):
    """[n, 4] (x centre, y centre, w, h) -> (x1, y1, x2, y2)."""
    y = _clone(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xywhn2xyxy(x, w: int = 640, h: int = 640, padw: float = 0, padh: float = 0):
    """Normalized xywh -> pixel xyxy in an image of size (w, h), shifted by the padding."""
    y = _clone(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x, w: int = 640, h: int = 640, clip: bool = False, eps: float = 0.0):
    """Pixel xyxy -> normalized xywh; clip first to the image when asked."""
    if clip:
        x = _clone(x)
        clip_boxes(x, (h - eps, w - eps))
    y = _clone(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def xyn2xy(x, w: int = 640, h: int = 640, padw: float = 0, padh: float = 0):
    """Normalized segment points [n, 2] -> pixels."""
    y = _clone(x)
    y[..., 0] = w * x[..., 0] + padw
    y[..., 1] = h * x[..., 1] + padh
    return y


def clip_boxes(boxes, shape: tuple[int, int]) -> None:
    """Clip xyxy boxes in place to an image of shape (height, width)."""
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, shape[1])
        boxes[..., 1].clamp_(0, shape[0])
        boxes[..., 2].clamp_(0, shape[1])
        boxes[..., 3].clamp_(0, shape[0])
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, shape[1])
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, shape[0])


def scale_boxes(img1_shape, boxes, img0_shape, ratio_pad=None):
    """Map xyxy boxes from a letterboxed image (img1_shape, h w) back to the original (img0_shape), in place."""
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = (img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain, pad = ratio_pad[0][0], ratio_pad[1]
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., :4] /= gain
    clip_boxes(boxes, img0_shape)
    return boxes


def non_max_suppression(
    prediction,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: list[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    labels=(),
    max_det: int = 300,
) -> list[torch.Tensor]:
    """Per-image NMS on raw detections.

    prediction: [B, N, 5 + nc] (x, y, w, h in pixels, objectness, class probabilities), or the (inference, ...)
        tuple an eval-mode DetectionModel returns.
    labels: optional per-image [m, 5] (class, x, y, w, h) prepended as certain detections (autolabelling).
    Returns one [n, 6] tensor per image: (x1, y1, x2, y2, confidence, class), at most max_det rows, best first.
    """
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres={conf_thres} must be in [0, 1]")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres={iou_thres} must be in [0, 1]")
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    device = prediction.device
    mps = "mps" in device.type
    if mps:
        prediction = prediction.cpu()
    bs, nc = prediction.shape[0], prediction.shape[2] - 5
    max_nms = 30000  # most boxes into torchvision.ops.batched_nms
    multi_label &= nc > 1
    output = [torch.zeros((0, 6), device=prediction.device)] * bs
    candidates = prediction[..., 4] > conf_thres
    for xi, x in enumerate(prediction):
        x = x[candidates[xi]]
        if labels and len(labels[xi]):
            lb = labels[xi]
            v = torch.zeros((len(lb), nc + 5), device=x.device)
            v[:, :4] = lb[:, 1:5]
            v[:, 4] = 1.0
            v[range(len(lb)), lb[:, 0].long() + 5] = 1.0
            x = torch.cat((x, v), 0)
        if not x.shape[0]:
            continue
        x = x.clone()
        x[:, 5:] *= x[:, 4:5]  # confidence = objectness * class probability
        box = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (x[:, 5:] > conf_thres).nonzero(as_tuple=False).T
            x = torch.cat((box[i], x[i, j + 5, None], j[:, None].float()), 1)
        else:
            conf, j = x[:, 5:].max(1, keepdim=True)
            x = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
        if classes is not None:
            x = x[(x[:, 5:6] == torch.tensor(classes, device=x.device)).any(1)]
        if not x.shape[0]:
            continue
        x = x[x[:, 4].argsort(descending=True)[:max_nms]]
        # Boxes of different classes never suppress each other. batched_nms keeps the boxes of YOLOv5's class-offset
        # trick (exactly so in float64; in float32 the trick's shifted coordinates round, so a box whose IoU sits at
        # the threshold may differ), but on CPU with many boxes it runs NMS class by class, O(sum n_c^2) instead of
        # O(n^2): 2-3x faster validation of a barely trained model (tens of thousands of candidates per image).
        groups = torch.zeros_like(x[:, 5], dtype=torch.long) if agnostic else x[:, 5].long()
        keep = torchvision.ops.batched_nms(x[:, :4], x[:, 4], groups, iou_thres)[:max_det]
        output[xi] = x[keep]
        if mps:
            output[xi] = output[xi].to(device)
    return output


def labels_to_class_weights(labels: list[np.ndarray], nc: int = 80) -> torch.Tensor:
    """Inverse class frequency from per-image label arrays [n, 5] (class first), normalized to sum 1."""
    if not labels or labels[0] is None:
        return torch.Tensor()
    classes = np.concatenate(labels, 0)[:, 0].astype(int)
    weights = np.bincount(classes, minlength=nc).astype(float)
    weights[weights == 0] = 1
    weights = 1 / weights
    weights /= weights.sum()
    return torch.from_numpy(weights).float()


def labels_to_image_weights(labels: list[np.ndarray], nc: int = 80, class_weights=None) -> np.ndarray:
    """Per-image sampling weight: the sum of its boxes' class weights (YOLOv5 --image-weights)."""
    class_weights = np.ones(nc) if class_weights is None else np.asarray(class_weights)
    counts = np.array([np.bincount(x[:, 0].astype(int), minlength=nc) for x in labels])
    return (class_weights.reshape(1, nc) * counts).sum(1)


def clean_str(s: str) -> str:
    return re.sub(pattern="[|@#!¡·$€%&()=?¿^*;:,¨´><+]", repl="_", string=s)


def print_args(args: dict[str, Any], name: str = "") -> None:
    LOGGER.info(colorstr(f"{name}: " if name else "") + ", ".join(f"{k}={v}" for k, v in args.items()))
