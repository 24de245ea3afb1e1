"""The output terms' anchor selection (distill.terms.OUTPUT_TOP_SHARE) with real teachers, and what it saves.

Coverage: for real teachers on real images, how much of the teacher's summed objectness (the class part's weights in
kd_term) the top share of each level's anchors holds, and whether every anchor above BOX_KD_MIN_OBJ (box_kd_term's
anchors) is among them. Teachers: the official YOLOv5n v7.0 on COCO128 at 320 and 640 px (../shared/real, skipped
when absent) and the shipped yolov5s on the built-in dataset at 192 px.

Cost: forward + backward of kd_term and box_kd_term reading every anchor (top share 1) and the default share, on
random head outputs of the training-step benchmark's shapes (yolov5n heads, 320 px, batch 16, nc 80), median of
interleaved rounds.

    python benchmarks/bench_output_terms.py
    python benchmarks/bench_output_terms.py --images 64 --shares 0.25,0.125,0.0625
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_train_step import interleaved_medians  # noqa: E402
from distill import teacher_outputs  # noqa: E402
from distill.terms import BOX_KD_MIN_OBJ, OUTPUT_TOP_SHARE, box_kd_term, kd_term, top_anchors  # noqa: E402
from utils.augmentations import letterbox  # noqa: E402
from utils.checkpoint import attempt_load  # noqa: E402
from utils.dataloaders import IMG_FORMATS  # noqa: E402
from utils.general import check_dataset  # noqa: E402

REAL = ROOT.parent / "shared/real"


def load_batch(files: list[Path], size: int) -> torch.Tensor:
    """Images letterboxed to size x size, [B, 3, size, size] RGB in 0..1."""
    images = []
    for f in files:
        im = letterbox(cv2.imread(str(f)), size, auto=False)[0][:, :, ::-1].transpose(2, 0, 1)
        images.append(torch.from_numpy(np.ascontiguousarray(im)).float() / 255)
    return torch.stack(images)


def coverage(weights: Path, files: list[Path], size: int, shares: list[float], batch: int = 16) -> list[dict]:
    """Per share: the fraction of the teacher's summed objectness its top anchors hold (over all images and levels),
    and per level the anchors above BOX_KD_MIN_OBJ, the top count K and how many of the former the top misses."""
    model = attempt_load(weights)
    objectness = [[] for _ in range(3)]
    for i in range(0, len(files), batch):
        _, preds = teacher_outputs(model, load_batch(files[i : i + batch], size), [])
        for level, p in enumerate(preds):
            objectness[level].append(p[..., 4].float().flatten())
    rows = []
    for share in shares:
        kept, total, levels = 0.0, 0.0, []
        for level in objectness:  # the top share of each batch, as training selects it
            confident, k, missed = 0, 0, 0
            for logits in level:
                values, index = top_anchors(logits, share)
                kept += values.sigmoid().sum().item()
                total += logits.sigmoid().sum().item()
                above = logits.sigmoid() > BOX_KD_MIN_OBJ
                confident, k = confident + int(above.sum()), k + len(index)
                missed += int(above.sum()) - int(above[index].sum())
            levels.append((confident, k, missed))
        rows.append({"share": share, "kept": kept / total, "levels": levels})
    return rows


def print_coverage(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    print(f"{'top share':>10}{'objectness held':>17}   per level: anchors p > {BOX_KD_MIN_OBJ} / top K (missed)")
    for r in rows:
        levels = "   ".join(f"{c} / {k} ({m})" for c, k, m in r["levels"])
        print(f"{r['share']:>10.4f}{r['kept'] * 100:>16.1f}%   {levels}")


def cost(opt: argparse.Namespace) -> None:
    """kd_term and box_kd_term forward + backward, every anchor vs the default share, on random outputs."""
    g = torch.Generator().manual_seed(0)
    side = [opt.imgsz // s for s in (8, 16, 32)]
    shape = [(opt.batch_size, 3, h, h, 5 + opt.nc) for h in side]
    student = [torch.randn(s, generator=g).requires_grad_() for s in shape]
    teacher = [torch.randn(s, generator=g) for s in shape]
    anchors = torch.rand(3, 3, 2, generator=g) * 4 + 0.5

    def step(term, share):
        def fn():
            inputs = dict(preds=student, teacher_preds=teacher, anchors=anchors, teacher_anchors=anchors)
            term(**inputs, balance=[4.0, 1.0, 0.4], top_share=share).backward()

        return fn

    fns = {
        f"{name} share {share:.3f}": step(term, share)
        for name, term in (("kd", kd_term), ("box_kd", box_kd_term))
        for share in (1.0, OUTPUT_TOP_SHARE)
    }
    times = interleaved_medians(fns, opt.iters, 2, torch.device("cpu"))
    n = sum(math.prod(s[:4]) for s in shape)
    print(
        f"\nCPU, {torch.get_num_threads()} threads: forward + backward on random outputs, {len(shape)} levels "
        f"{side}, batch {opt.batch_size}, nc {opt.nc} ({n} anchors), median of {opt.iters} interleaved rounds"
    )
    for name in fns:
        print(f"{name:<24}{times[name]:>10.1f} ms")


def main(opt: argparse.Namespace) -> None:
    shares = [float(s) for s in opt.shares.split(",")]
    if (REAL / "weights/yolov5n.pt").is_file():
        coco = sorted((REAL / "coco128/images/train2017").glob("*.jpg"))[: opt.images]
        for size in (320, 640):
            rows = coverage(REAL / "weights/yolov5n.pt", coco, size, shares)
            print_coverage(f"official YOLOv5n v7.0, COCO128 ({len(coco)} images), {size} px", rows)
    else:
        print(f"{REAL} not found: the COCO128 rows are skipped")
    data = check_dataset("synthetic.yaml")
    images = sorted(p for p in Path(data["train"]).glob("*") if p.suffix[1:].lower() in IMG_FORMATS)[: opt.images]
    rows = coverage(ROOT / "weights/yolov5s-synthetic.pt", images, 192, shares)
    print_coverage(f"shipped yolov5s teacher, built-in dataset ({len(images)} train images), 192 px", rows)
    cost(opt)


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per teacher (batches of 16)")
    parser.add_argument("--shares", default="0.25,0.125,0.0625,0.03125", help="top shares to report, comma-separated")
    parser.add_argument("--imgsz", type=int, default=320, help="cost: image size of the random outputs")
    parser.add_argument("--batch-size", type=int, default=16, help="cost: batch of the random outputs")
    parser.add_argument("--nc", type=int, default=80, help="cost: classes of the random outputs")
    parser.add_argument("--iters", type=int, default=7, help="cost: timed rounds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_opt())
