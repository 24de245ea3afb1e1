"""train.py's option handling beyond argparse: range checks, and the option merge of --resume."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from utils.checkpoint import load_checkpoint, remove_stale_tmp
from utils.general import LOGGER, ROOT, WORLD_SIZE, UserError, check_file, check_range, yaml_load

RESUME_OVERRIDES = ("ft_weights", "device", "workers")  # flags a --resume may change; the rest are the run's
CACHES = ("ram", "disk", "val")  # --cache: images in RAM, as .npy beside them, or the val set's alone (in RAM)


def check_train_options(opt: argparse.Namespace) -> None:
    """Flags out of range: one line naming the flag and what it allows, before any data or model is loaded."""
    if opt.epochs < 1:
        raise UserError(f"--epochs {opt.epochs}: train for at least 1 epoch")
    if opt.batch_size < 1:
        auto = " (-1, YOLOv5's AutoBatch, is not supported: pick the size yourself)" if opt.batch_size == -1 else ""
        raise UserError(f"--batch-size {opt.batch_size}: must be >= 1{auto}")
    if opt.imgsz < 1:
        raise UserError(f"--imgsz {opt.imgsz}: must be >= 1 pixel (rounded up to a multiple of the model stride)")
    check_range("--label-smoothing", opt.label_smoothing, 0, 1, high_open=True, hint="YOLOv5 uses 0.0 or 0.1")
    check_range("--workers", opt.workers, 0, hint="0 loads data in the main process")
    check_range("--seed", opt.seed, 0, 2**32 - 1)
    if opt.evolve is not None:
        check_range("--evolve", opt.evolve, 1, hint="the number of generations, e.g. 300")
    ub = getattr(opt, "unlabeled_batch_size", None)
    if ub is not None and (ub < 1 or ub % WORLD_SIZE):
        raise UserError(f"--unlabeled-batch-size {ub}: must be >= 1 and a multiple of WORLD_SIZE {WORLD_SIZE}")
    if opt.cache is not None and opt.cache not in CACHES:
        raise UserError(f"--cache {opt.cache}: use {', '.join(CACHES)} (or --cache alone: ram)")


def resume_options(
    opt: argparse.Namespace, defaults: argparse.Namespace, state_options: Callable[[dict], dict] | None = None
) -> argparse.Namespace:
    """--resume: the run's own options, except the RESUME_OVERRIDES given on this command line.

    The run's options come from its opt.yaml (or the checkpoint's 'opt'), then whatever state_options(checkpoint)
    returns (train.py: distill.options.resume_distill_options, the imitation settings from the checkpoint's 'distill'
    state, their one source, as trained); an override is an option that differs from `defaults` (train.parse_opt's),
    e.g. --ft_weights new/place.pt for a teacher that moved.
    """
    last = Path(opt.resume if isinstance(opt.resume, str) else get_latest_run())
    if last.parent.is_dir():
        remove_stale_tmp(last.parent)  # what a kill during a checkpoint write left behind
    last, ckpt = (last, load_checkpoint(last)) if last.is_file() else _resume_fallback(last)
    opt_yaml = last.parent.parent / "opt.yaml"
    if not _resumable(ckpt):  # before anything is written
        raise UserError(
            f"--resume {last}: a finished or stripped checkpoint (no optimizer state), nothing to resume; to train it "
            f"further, start a new run with --weights {last}"
        )
    if opt.ft_weights != defaults.ft_weights and not ckpt.get("distill"):
        raise UserError(
            f"--resume {last}: this run had no teacher, so --ft_weights cannot join it; start a new run from it: "
            f"python train.py --weights {last} --ft_weights {opt.ft_weights} ..."
        )
    saved, source = (yaml_load(opt_yaml), opt_yaml) if opt_yaml.is_file() else (ckpt["opt"] or {}, last)
    given = {k: getattr(opt, k) for k in RESUME_OVERRIDES if getattr(opt, k) != getattr(defaults, k)}
    ignored = [
        f"--{k.replace('_', '-')}"
        for k, v in vars(opt).items()
        if k not in (*RESUME_OVERRIDES, "resume") and hasattr(defaults, k) and v != getattr(defaults, k)
    ]
    if ignored:
        allowed = ", ".join(f"--{k}" for k in RESUME_OVERRIDES)
        LOGGER.warning(
            f"WARNING: --resume {last}: ignoring {', '.join(ignored)} (a resumed run keeps its own options; only "
            f"{allowed} may be given again)"
        )
    extra = state_options(ckpt) if state_options else {}
    if extra:
        saved, source = {**saved, **extra}, last
    resumed = argparse.Namespace(**{**vars(defaults), **saved, **given})
    if "ft_weights" in given:
        resumed.ft_weights = str(Path(check_file(resumed.ft_weights, "--ft_weights")).resolve())
    elif resumed.ft_weights and not Path(resumed.ft_weights).is_file():
        raise UserError(
            f"--resume {last}: the teacher {resumed.ft_weights} (from {source}) is not found; "
            "pass --ft_weights with its new path"
        )
    resumed.cfg, resumed.weights, resumed.resume, resumed.save_dir = "", str(last), True, str(last.parent.parent)
    return resumed


def _resumable(ckpt: dict) -> bool:
    """A checkpoint of a run in progress: optimizer state and a finished epoch (stripped ones have neither)."""
    return ckpt.get("optimizer") is not None and int(ckpt.get("epoch", -1)) >= 0


def _resume_fallback(last: Path) -> tuple[Path, dict]:
    """--resume of a last.pt that is missing: the run was killed while writing its first last.pt, after best.pt of
    that epoch (train.py writes best.pt first). best.pt then holds the same epoch: resume from it, saying so.
    Returns (best.pt, its checkpoint)."""
    best = last.with_name("best.pt")
    if last.name == "last.pt" and best.is_file():
        ckpt = load_checkpoint(best)
        if _resumable(ckpt):
            LOGGER.info(f"--resume: {last} was never completed; resuming from {best} (epoch {ckpt['epoch']})")
            return best, ckpt
    raise UserError(f"--resume {last}: checkpoint not found; pass the run's weights/last.pt")


def get_latest_run(search_dir: str | Path = ROOT / "runs") -> str:
    """The most recent last*.pt under search_dir (bare --resume)."""
    runs = sorted(Path(search_dir).glob("**/last*.pt"), key=os.path.getctime)
    if not runs:
        raise UserError(f"--resume: no last.pt found under {search_dir}; pass the checkpoint path")
    return str(runs[-1])
