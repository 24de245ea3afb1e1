"""results.csv: one fixed-width row per finished epoch, as YOLOv5 writes it, kept consistent across --resume.

A run writes an epoch's row before its checkpoint (last.pt), and the checkpoint is what counts: on --resume the rows
of epochs after the checkpoint's (written by a run killed before it could save) are dropped, so every epoch appears
exactly once however the run was interrupted.
"""

from __future__ import annotations

import os
from pathlib import Path

METRIC_KEYS = ["metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"]


NOT_LOSSES = ("gate",)  # logged beside the loss items, not losses: train/gate (ComputeLoss(gated=True))


def results_row(loss_names, train_losses, results, lrs) -> dict:
    """One epoch's columns: train/{name}_loss, the four metrics, val/{name}_loss (detection terms only: validation has no teacher), x/lr{group}.

    train_losses: mean training loss terms in loss_names order; results: (P, R, mAP50, mAP50-95, *val losses) from
    val.run; lrs: the learning rate of each optimizer group (x/lr0-2 YOLOv5's, x/lr3-4 the FGFI adapters').
    """
    row = {f"train/{k}" if k in NOT_LOSSES else f"train/{k}_loss": float(v) for k, v in zip(loss_names, train_losses)}
    row.update(dict(zip(METRIC_KEYS, (float(x) for x in results[:4]))))
    # validation reports the detection terms alone (no teacher there), the first names of the loss dict
    row.update({f"val/{k}_loss": float(v) for k, v in zip(loss_names, results[4:])})
    row.update({f"x/lr{j}": float(x) for j, x in enumerate(lrs)})
    return row


def append_results(file: str | Path, epoch: int, row: dict) -> None:
    """Append one epoch's row; the header (from the row's keys) is written with the first row."""
    file = Path(file)
    keys = ["epoch", *row]
    n = len(keys)
    header = "" if file.exists() else ("%20s," * n % tuple(keys)).rstrip(",") + "\n"
    with open(file, "a") as f:
        f.write(header + ("%20.5g," * n % (epoch, *row.values())).rstrip(",") + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before the checkpoint that commits this epoch


def truncate_results(file: str | Path, last_epoch: int) -> int:
    """Keep the header and the rows of epochs <= last_epoch (atomic rewrite); returns how many rows were dropped."""
    file = Path(file)
    if not file.is_file():
        return 0
    header, *rows = file.read_text().splitlines(keepends=True)
    keep = [r for r in rows if r.endswith("\n") and _epoch(r) <= last_epoch]  # a half-written row is dropped
    dropped = len(rows) - len(keep)
    if dropped:
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(header + "".join(keep))
        os.replace(tmp, file)
    return dropped


def _epoch(row: str) -> float:
    try:
        return float(row.split(",")[0])
    except ValueError:
        return float("inf")
