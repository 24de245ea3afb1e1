"""Training-sample cost of the data pipeline, and what exact resume's per-item seeding adds to it.

Times LoadImagesAndLabels.__getitem__ on the built-in dataset (mosaic + the hyp file's augmentations, as train.py
loads it) two ways, in interleaved rounds so drift on a shared machine hits both alike:
  plain     dataset[i]            (YOLOv5's way: the process-wide random state, not reproducible across a resume)
  seeded    dataset[(epoch, i)]   (what EpochSampler hands out: random and numpy reseeded from (seed, epoch, i))
and the seeding alone (utils.dataloaders.item_seed + random.seed + np.random.seed), per item.

    python benchmarks/bench_dataloader.py                   # 192 px (the cpu preset) and 640 px, 200 items each
    python benchmarks/bench_dataloader.py --imgsz 320 --items 500
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from utils.dataloaders import LoadImagesAndLabels, item_seed  # noqa: E402
from utils.general import check_dataset, check_yaml, yaml_load  # noqa: E402


def per_item_ms(fn, items: int) -> float:
    t = time.perf_counter()
    for i in range(items):
        fn(i)
    return (time.perf_counter() - t) / items * 1e3


def _loaders(dataset):
    """dataset[i] and dataset[(epoch 1, i)] over its items, by running index."""
    n = len(dataset)
    return (lambda i: dataset[i % n]), (lambda i: dataset[(1, i % n)])


def seeding(i: int) -> None:
    """What the seeded path adds per item: the seed from (seed, epoch, index) and two reseeds."""
    s = item_seed(0, 1, i)
    random.seed(s)
    np.random.seed(s)


def run(opt: argparse.Namespace) -> list[dict]:
    data = check_dataset(check_yaml("synthetic.yaml"))  # the built-in data, generated when missing
    hyp = yaml_load(ROOT / "data/hyps" / opt.hyp)
    rows = []
    for imgsz in opt.imgsz:
        dataset = LoadImagesAndLabels(data["train"], imgsz, 16, augment=True, hyp=hyp, stride=32, seed=0)
        plain, seeded = _loaders(dataset)
        times = {"plain": [], "seeded": [], "seeding": []}
        for _ in range(opt.rounds):  # interleaved rounds
            for name, fn in (("plain", plain), ("seeded", seeded), ("seeding", seeding)):
                times[name].append(per_item_ms(fn, opt.items))
        row = {"imgsz": imgsz, **{k: statistics.median(v) for k, v in times.items()}}
        rows.append(row)
        print(
            f"{imgsz:>5} px  plain {row['plain']:.2f} ms/item ({1e3 / row['plain']:.0f} items/s), "
            f"seeded {row['seeded']:.2f} ms/item ({1e3 / row['seeded']:.0f} items/s), "
            f"seeding alone {row['seeding'] * 1e3:.1f} us/item = {row['seeding'] / row['plain']:.2%} of an item"
        )
    return rows


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imgsz", type=int, nargs="+", default=[192, 640])
    parser.add_argument("--items", type=int, default=200, help="items per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hyp", default="hyp.short.yaml", help="hyp file under data/hyps (augmentation settings)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(parse_opt())
