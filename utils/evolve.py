"""Hyperparameter evolution (train.py --evolve): YOLOv5's genetic search over the hyp file's keys."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from utils.general import LOGGER, colorstr, load_hyp
from utils.metrics import fitness
from utils.results import METRIC_KEYS

# (mutation scale 0-1, lower limit, upper limit) per key, YOLOv5's search space
EVOLVE_META = {
    "lr0": (1, 1e-5, 1e-1), "lrf": (1, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98), "weight_decay": (1, 0.0, 0.001),
    "warmup_epochs": (1, 0.0, 5.0), "warmup_momentum": (1, 0.0, 0.95), "warmup_bias_lr": (1, 0.0, 0.2),
    "box": (1, 0.02, 0.2), "cls": (1, 0.2, 4.0), "cls_pw": (1, 0.5, 2.0), "obj": (1, 0.2, 4.0),
    "obj_pw": (1, 0.5, 2.0), "iou_t": (0, 0.1, 0.7), "anchor_t": (1, 2.0, 8.0), "fl_gamma": (0, 0.0, 2.0),
    "hsv_h": (1, 0.0, 0.1), "hsv_s": (1, 0.0, 0.9), "hsv_v": (1, 0.0, 0.9), "degrees": (1, 0.0, 45.0),
    "translate": (1, 0.0, 0.9), "scale": (1, 0.0, 0.9), "shear": (1, 0.0, 10.0), "perspective": (0, 0.0, 0.001),
    "flipud": (1, 0.0, 1.0), "fliplr": (0, 0.0, 1.0), "mosaic": (1, 0.0, 1.0), "mixup": (1, 0.0, 1.0),
    "copy_paste": (1, 0.0, 1.0),
}  # fmt: skip


def evolve(opt: argparse.Namespace, device: torch.device, train: Callable) -> tuple:
    """Genetic hyperparameter search as YOLOv5: mutate the best of evolve.csv, train(hyp, opt, device), append.

    train: train.py's train function (passed in: this module is imported by train.py)."""
    import pandas as pd

    hyp = load_hyp(opt.hyp)
    keys = [k for k in EVOLVE_META if k in hyp]
    opt.noval, opt.nosave = True, True
    save_dir = Path(opt.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    evolve_csv = save_dir / "evolve.csv"
    rng = np.random.default_rng(opt.seed)
    results = ()
    for _ in tqdm(range(opt.evolve), desc="Evolving hyperparameters"):
        if evolve_csv.exists():  # mutate a fitness-weighted parent among the best five
            df = pd.read_csv(evolve_csv, skipinitialspace=True)
            df.columns = [c.strip() for c in df.columns]
            df = df.sort_values("fitness", ascending=False).head(5)
            w = df["fitness"].to_numpy() - df["fitness"].min() + 1e-6
            parent = df.iloc[int(rng.choice(len(df), p=w / w.sum()))]
            scale = np.array([EVOLVE_META[k][0] for k in keys])
            v = np.ones(len(keys))
            while np.all(v == 1):  # mutate until something changes
                v = (rng.random(len(keys)) < 0.8) * rng.standard_normal(len(keys)) * rng.random() * scale * 0.2 + 1
                v = v.clip(0.3, 3.0)
            for k, x in zip(keys, v):
                hyp[k] = float(parent[k] * x)
        for k in keys:
            lo, hi = EVOLVE_META[k][1:]
            hyp[k] = round(min(max(hyp[k], lo), hi), 5)
        results = train(hyp.copy(), opt, device)
        fi = float(fitness(np.array(results[:4]).reshape(1, -1))[0])
        row = pd.DataFrame([{**dict(zip(METRIC_KEYS, results[:4])), "fitness": fi, **{k: hyp[k] for k in keys}}])
        row.to_csv(evolve_csv, mode="a", header=not evolve_csv.exists(), index=False)
    LOGGER.info(f"Hyperparameter evolution finished; results in {colorstr('bold', evolve_csv)}")
    return results
