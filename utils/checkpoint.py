"""Loading and saving YOLOv5 checkpoints safely.

A YOLOv5 v7.0 checkpoint is a dict {'epoch', 'best_fitness', 'model' (whole fp16 DetectionModel), 'ema', 'updates',
'optimizer', 'opt', 'git', 'date'} (ours adds 'distill'). Whole models are pickles, and unpickling arbitrary
classes runs arbitrary code, so we load with torch.load(weights_only=True) and allow exactly the classes such a
checkpoint needs. Every compatibility fix for older checkpoints lives in attempt_load, nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import os
import pathlib
import pickle
import random
import struct
import zipfile
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.downloads import RELEASE_ASSETS, attempt_download, remove_stale
from utils.general import LOGGER, UserError, check_file, check_yaml, intersect_dicts

# torch.nn layers that YOLOv5 models (and their older versions) are built from
_TORCH_MODULES = (
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.SiLU, nn.ReLU,
    nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Sigmoid, nn.Identity, nn.Upsample, nn.MaxPool2d, nn.Linear,
    nn.MultiheadAttention, nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Dropout,
)  # fmt: skip


def allowed_globals() -> list:
    """The classes/functions a YOLOv5 checkpoint may reference, as torch.serialization.safe_globals expects them."""
    import models.common
    import models.yolo

    ours = [
        obj
        for module in (models.common, models.yolo)
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__
    ]
    ours.append((models.yolo.DetectionModel, "models.yolo.Model"))  # YOLOv5 <= v6.1 pickles this name

    np_core = np._core if hasattr(np, "_core") else np.core
    numpy_globals = [
        np.dtype,
        np.ndarray,
        *(v for v in vars(np.dtypes).values() if inspect.isclass(v) and issubclass(v, np.dtype)),
    ]
    for name in ("scalar", "_reconstruct"):  # numpy scalars (best_fitness) and arrays, under numpy 1 and 2 names
        fn = getattr(np_core.multiarray, name)
        numpy_globals += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]

    paths = [pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    return ours + list(_TORCH_MODULES) + numpy_globals + paths + [argparse.Namespace]


def _global_name(g) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a YOLOv5 checkpoint dict without executing code from it.

    A missing official YOLOv5 v7.0 name (yolov5s.pt, weights/yolov5l6.pt, ...) is downloaded first
    (utils.downloads.attempt_download). Raises UserError (one line naming the file) when the file is missing (or its
    download failed), truncated, not a torch checkpoint, not a dict with a 'model' entry, or references a global
    that is not an allowed YOLOv5 class.
    """
    path = attempt_download(path)  # an official name (yolov5s.pt, ...) that is missing: fetched from the release
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: check the --weights path")
    allowed = allowed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        forbidden = _forbidden_globals(path, allowed)
        if forbidden:
            raise UserError(
                f"checkpoint {path} needs {forbidden[0]}, which is not an allowed YOLOv5 class; refusing to unpickle it"
            ) from None
        raise UserError(
            f"checkpoint {path} is not a readable PyTorch checkpoint ({_first_line(e)}){_refetch(path)}"
        ) from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        KeyError,
        AttributeError,
        struct.error,
    ) as e:
        raise UserError(
            f"checkpoint {path} is truncated or not a PyTorch checkpoint ({_first_line(e)}){_refetch(path)}"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"checkpoint {path} is not a YOLOv5 checkpoint: expected a dict with a 'model' entry")
    return ckpt


def _forbidden_globals(path: Path, allowed: list) -> list[str]:
    """Globals the pickle references beyond torch's defaults and our allow-list (read without unpickling)."""
    names = {_global_name(g) for g in allowed}
    try:
        with torch.serialization.safe_globals(allowed):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: nothing more to say than the load error
        return []
    return [g for g in unsafe if g not in names]


def _first_line(e: Exception) -> str:
    """The first sentence of an error message, short enough for a one-line UserError."""
    text = str(e).strip().splitlines()
    text = text[0].split(". ")[0] if text else ""
    return text[:120] if len(text) > 3 else type(e).__name__


def attempt_load(weights: str | Path | list, device=None, inplace: bool = True, fuse: bool = True) -> nn.Module:
    """Load a YOLOv5 checkpoint's model (EMA if present) as an FP32 eval-mode DetectionModel on device.

    names always becomes a dict {class index: name}; fuse folds BatchNorms into convs. All fixes for checkpoints
    from older YOLOv5 / torch versions are here.
    """
    from models.yolo import Detect, DetectionModel

    if isinstance(weights, (list, tuple)):
        if len(weights) != 1:
            raise UserError(f"--weights {weights}: model ensembles are not supported, give one checkpoint")
        weights = weights[0]
    ckpt = load_checkpoint(weights)
    model = ckpt.get("ema") or ckpt["model"]
    if not isinstance(model, nn.Module):
        raise UserError(f"checkpoint {weights} holds no whole model under 'ema' or 'model' (a state_dict?)")
    model = model.to(device if device is not None else "cpu").float()

    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    if isinstance(getattr(model, "names", None), (list, tuple)):
        model.names = dict(enumerate(model.names))

    for m in model.modules():
        t = type(m)
        if t in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU, Detect, DetectionModel):
            m.inplace = inplace  # absent before torch 1.7 / YOLOv5 v5.0
            if t is Detect and not isinstance(m.anchor_grid, list):  # a registered buffer before YOLOv5 v6.0
                delattr(m, "anchor_grid")
                m.anchor_grid = [torch.empty(0) for _ in range(m.nl)]
            if t is Detect and not isinstance(m.grid, list):
                m.grid = [torch.empty(0) for _ in range(m.nl)]
        elif t is nn.Upsample and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None  # torch 1.11 compatibility

    model = model.fuse().eval() if fuse and hasattr(model, "fuse") else model.eval()
    return model


def load_student(
    weights: str | Path, cfg: str | Path, nc: int, anchors, resume: bool, device: torch.device
) -> tuple[nn.Module, dict | None, bool]:
    """train.py's student: (DetectionModel on device, its checkpoint or None, whether its Detect head came
    pretrained from the checkpoint with its anchors).

    weights (a .pt): its weights transferred into a fresh model built from cfg or the checkpoint's own YAML (nc may
    differ; anchors are re-fitted unless resuming); a resume takes the raw 'model', whose weights the saved optimizer
    state belongs to, a fine-tune the 'ema'. No weights: a model from the cfg YAML, from scratch.
    """
    from models.yolo import DetectionModel

    if not str(weights).endswith(".pt"):
        return DetectionModel(check_yaml(cfg, "--cfg"), ch=3, nc=nc, anchors=anchors).to(device), None, False
    ckpt = load_checkpoint(check_file(weights, "--weights"))
    src = ckpt["model"] if resume else ckpt.get("ema") or ckpt["model"]
    model = DetectionModel(cfg or src.yaml, ch=3, nc=nc, anchors=anchors).to(device)
    exclude = ["anchor"] if (cfg or anchors) and not resume else []
    csd = intersect_dicts(src.float().state_dict(), model.state_dict(), exclude=exclude)
    model.load_state_dict(csd, strict=False)
    LOGGER.info(f"Transferred {len(csd)}/{len(model.state_dict())} items from {weights}")
    head = f"model.{len(model.model) - 1}."  # Detect: its output convs and anchors both transferred
    pretrained_head = any(k.startswith(head + "m.") for k in csd) and f"{head}anchors" in csd
    return model, ckpt, pretrained_head


def training_checkpoint(
    epoch: int,
    best_fitness: float,
    model: nn.Module,
    ema,
    optimizer,
    opt: argparse.Namespace,
    distill: dict | None,
    train_state: dict | None = None,
) -> dict:
    """A training run's checkpoint, in YOLOv5 v7.0's layout: the raw model (the optimizer's weights, resumed from)
    and the EMA (validated, kept after training), the optimizer state, the options, plus 'distill' (adapters and
    imitation settings of a run with a teacher, None without) and 'train_state' (what else an exact resume needs:
    RNG states, AMP scaler, optimizer-step phase; see train_state()).

    model and ema stay in float32 while training, so that a resume continues from the very same weights (YOLOv5
    saves fp16 copies, and a resumed run then drifts from the uninterrupted one); strip_optimizer makes the finished
    checkpoint YOLOv5's fp16 file.
    """
    return {
        "epoch": epoch,
        "best_fitness": best_fitness,
        "model": deepcopy(getattr(model, "module", model)).float(),  # DDP -> the model
        "ema": deepcopy(ema.ema).float(),
        "updates": ema.updates,
        "optimizer": optimizer.state_dict(),
        "opt": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opt).items()},
        "git": None,
        "date": datetime.now().isoformat(),
        "distill": distill,
        "train_state": train_state,
    }


def train_state(scaler=None, **extra) -> dict:
    """The random number generators' states (python, numpy, torch CPU and CUDA), the AMP scaler's state and the
    caller's extra items (plain values: train.py's optimizer-step phase, EarlyStopping, per-class mAPs), for an exact
    resume. Only plain containers, ints, floats, strings and tensors: it loads under weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python_rng": random.getstate(),
        "numpy_rng": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "scaler": scaler.state_dict() if scaler is not None else {},
        **extra,
    }


def restore_train_state(state: dict, scaler=None) -> dict:
    """Set the generators (and the scaler) to a train_state(); returns it for the caller's extra items."""
    random.setstate(_as_tuples(state["python_rng"]))
    kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


def _as_tuples(x):
    """random.setstate needs the tuples that a save may have turned into lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _refetch(path: str | Path) -> str:
    """For an official release name: how to get a good copy (a bad earlier download stays until deleted)."""
    name = Path(path).name
    return f"; delete it and run again to download {name} anew" if name in RELEASE_ASSETS else ""


def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    """torch.save atomically: serialize in memory, write a temporary file in the same folder, fsync, then os.replace
    it into place.

    Serializing first keeps the two failures apart: a checkpoint that cannot be serialized is a bug and raises as it
    is; any failed write (folder deleted or read-only, disk full: torch's own writer reported that as a RuntimeError
    "unexpected pos") is one UserError naming the file, and the old file is kept."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        why = e.strerror or " ".join(str(e).split())[:120]
        raise UserError(
            f"could not write checkpoint {path} ({why}): is its folder {path.parent} still there and writable, "
            "with free space?"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    LOGGER.debug(f"saved {path}")


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete the temporary files save_checkpoint leaves when its process is killed mid-write (its pid is gone)."""
    removed = remove_stale(Path(folder), ".*.*.tmp")
    if removed:
        LOGGER.info(f"Removed {len(removed)} unfinished checkpoint file(s) of killed runs from {folder}")
    return removed


def strip_optimizer(f: str | Path) -> None:
    """Make a finished checkpoint small: EMA becomes the model, optimizer dropped, epoch -1 (as YOLOv5).

    The distillation state (adapters, imitation settings) only serves --resume and is dropped too: what is left is a
    plain YOLOv5 checkpoint of about the size of a run without a teacher.
    """
    x = load_checkpoint(f)
    if x.get("ema") is not None:
        x["model"] = x["ema"]
    for k in "optimizer", "best_fitness", "ema", "updates":
        x[k] = None
    x.pop("distill", None)
    x.pop("train_state", None)
    x["epoch"] = -1
    x["model"].half()
    for p in x["model"].parameters():
        p.requires_grad = False
    save_checkpoint(x, f)
    LOGGER.info(f"Optimizer stripped from {f}, {os.path.getsize(f) / 1e6:.1f}MB")
