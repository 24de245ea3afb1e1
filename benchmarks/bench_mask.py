"""Time distill.imitation_mask against a plain per-image, per-box loop computing the same FGFI mask, and
distill.imitation_loss on a batch of P3-sized features.

    python benchmarks/bench_mask.py                       # B=64, 80x80 map, YOLOv5 P3 anchors, CPU
    python benchmarks/bench_mask.py --device cuda --batch-size 16 --height 40 --width 64

CPU timings use one thread by default (--threads 1): a like-for-like single-core comparison, and on a machine whose
cores are busy with other work, multi-threaded torch ops stall waiting for their worker threads (--threads 0 shows it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from distill.loss import imitation_loss  # noqa: E402
from distill.mask import imitation_mask  # noqa: E402

P3_ANCHORS = [[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]]  # YOLOv5 P3 anchors / stride 8, grid cells


def loop_mask(targets: torch.Tensor, anchors: torch.Tensor, shape: tuple[int, int, int], iou_factor: float = 0.5):
    """The FGFI mask the obvious way: for each image, for each box, IoU with all H * W * K centred anchors."""
    batch_size, height, width = shape
    dtype = torch.float64
    anchors = anchors.to(targets.device, dtype)
    ys, xs = torch.meshgrid(
        torch.arange(height, device=targets.device, dtype=dtype) + 0.5,
        torch.arange(width, device=targets.device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    ax1, ax2 = xs[..., None] - anchors[:, 0] / 2, xs[..., None] + anchors[:, 0] / 2  # [H, W, K]
    ay1, ay2 = ys[..., None] - anchors[:, 1] / 2, ys[..., None] + anchors[:, 1] / 2
    anchor_area = anchors[:, 0] * anchors[:, 1]
    mask = torch.zeros(shape, device=targets.device)
    for b in range(batch_size):
        for _, _, x, y, w, h in targets[targets[:, 0] == b].to(dtype).tolist():
            x, y, w, h = x * width, y * height, w * width, h * height
            iw = (torch.clamp(ax2, max=x + w / 2) - torch.clamp(ax1, min=x - w / 2)).clamp(min=0)
            ih = (torch.clamp(ay2, max=y + h / 2) - torch.clamp(ay1, min=y - h / 2)).clamp(min=0)
            inter = iw * ih
            iou = inter / (w * h + anchor_area - inter)
            best = iou.max()
            if best > 0:
                mask[b] = torch.maximum(mask[b], (iou > iou_factor * best).any(-1).float())
    return mask


def random_targets(batch_size: int, boxes_per_image: float, generator: torch.Generator) -> torch.Tensor:
    """[n, 6] targets: Poisson-ish box counts per image, centres uniform, sides 2-60 % of the image."""
    counts = torch.poisson(torch.full((batch_size,), boxes_per_image), generator=generator).long()
    image = torch.repeat_interleave(torch.arange(batch_size), counts).float()
    n = len(image)
    xy = torch.rand(n, 2, generator=generator)
    wh = 0.02 + 0.58 * torch.rand(n, 2, generator=generator) ** 2  # mostly small boxes, like real data
    return torch.cat((image[:, None], torch.zeros(n, 1), xy, wh), 1)


def median_time(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds over `repeats` runs after `warmup` untimed runs (CUDA synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(opt: argparse.Namespace) -> None:
    device = torch.device(opt.device)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    generator = torch.Generator().manual_seed(opt.seed)
    targets = random_targets(opt.batch_size, opt.boxes, generator).to(device)
    anchors = torch.tensor(P3_ANCHORS, device=device)
    shape = (opt.batch_size, opt.height, opt.width)

    fast = imitation_mask(targets, anchors, shape, opt.iou_factor)
    slow = loop_mask(targets, anchors, shape, opt.iou_factor)
    differ = int((fast != slow).sum())
    t_fast = median_time(lambda: imitation_mask(targets, anchors, shape, opt.iou_factor), opt.repeats, device)
    t_slow = median_time(lambda: loop_mask(targets, anchors, shape, opt.iou_factor), max(opt.repeats // 4, 1), device)

    channels = opt.channels
    student = torch.randn(opt.batch_size, channels, opt.height, opt.width, device=device, generator=None)
    teacher = torch.randn_like(student)
    mask = fast[:, None]
    t_loss = median_time(lambda: imitation_loss(student, teacher, mask), opt.repeats, device)

    print(
        f"device {device}, threads {torch.get_num_threads()}, B={opt.batch_size}, map {opt.height}x{opt.width}, "
        f"K={len(P3_ANCHORS)}, {len(targets)} boxes ({len(targets) / opt.batch_size:.1f}/image), "
        f"mask covers {fast.mean().item():.1%} of cells"
    )
    print(f"imitation_mask (vectorized)   {t_fast * 1e3:9.3f} ms")
    print(f"per-image, per-box loop       {t_slow * 1e3:9.3f} ms")
    print(f"speedup                       {t_slow / t_fast:9.1f} x")
    print(f"masks equal                   {differ == 0} ({differ} cells differ)")
    print(f"imitation_loss [{opt.batch_size}, {channels}, {opt.height}, {opt.width}] {t_loss * 1e3:9.3f} ms")
    if differ:
        sys.exit(1)


def parse_opt() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--height", type=int, default=80, help="feature map rows")
    parser.add_argument("--width", type=int, default=80, help="feature map columns")
    parser.add_argument("--boxes", type=float, default=7.0, help="mean boxes per image")
    parser.add_argument("--channels", type=int, default=128, help="feature channels for the loss timing")
    parser.add_argument("--iou-factor", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default; 1: one core each)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_opt())
