"""Training-step cost of FGFI distillation, and train/val throughput.

Median wall time of one optimizer step for:
  plain        student forward + YOLOv5 loss + backward + SGD step
  teacher      the frozen teacher's forward alone (no_grad, fp16 on CUDA, up to the imitated layer)
  distill      the full distillation step (student + teacher + mask + adapter + imitation loss)
  mask, imit   the imitation mask and the imitation loss (forward + backward) alone
  adapter      the 3x3 adapter convs (student -> teacher channels), forward + backward
plus val (eval forward + NMS) images/s and, on CUDA, peak memory. Random images and ~7 random boxes per image.

    python benchmarks/bench_train_step.py                               # CPU: yolov5n <- yolov5s at 320, batch 16
    python benchmarks/bench_train_step.py --device 0 --student yolov5s.yaml --teacher yolov5l.yaml --imgsz 640 \
        --batch-size 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_mask import median_time  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from distill import FeatureAdapters, feature_channels, imitation_loss, imitation_mask, teacher_features  # noqa: E402
from models.yolo import DetectionModel  # noqa: E402
from utils.general import non_max_suppression, yaml_load  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402


def random_targets(batch: int, boxes_per_image: int, nc: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 6] (image, class, x, y, w, h) normalized, sizes 3-40% of the image."""
    n = batch * boxes_per_image
    img = torch.arange(batch).repeat_interleave(boxes_per_image).float()
    cls = torch.randint(0, nc, (n,), generator=generator).float()
    wh = 0.03 + 0.37 * torch.rand(n, 2, generator=generator)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=generator)
    return torch.cat((img[:, None], cls[:, None], xy, wh), 1)


def main(opt: argparse.Namespace) -> dict:
    device = select_device(opt.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    hyp = yaml_load(ROOT / "data/hyps/hyp.scratch-low.yaml")
    student = DetectionModel(opt.student, nc=opt.nc).to(device).train()
    teacher = DetectionModel(opt.teacher, nc=opt.nc).to(device).eval().requires_grad_(False)
    if cuda:
        teacher.half()
    layers = student.imitation_points(opt.imitation_layers)
    t_layers = teacher.imitation_points(opt.imitation_layers)
    s_channels, t_channels = feature_channels(student, layers, 64), feature_channels(teacher, t_layers, 64)
    adapters = FeatureAdapters(s_channels, t_channels, opt.adapter_kernel).to(device)
    if opt.channels_last:
        student.to(memory_format=torch.channels_last)
        adapters.to(memory_format=torch.channels_last)
    params = list(student.parameters()) + list(adapters.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    plain_loss = ComputeLoss(student, hyp)
    distill_loss = ComputeLoss(student, hyp, imitation_weight=0.01)

    imgs = torch.rand(opt.batch_size, 3, opt.imgsz, opt.imgsz, generator=g).to(device)
    if opt.channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    targets = random_targets(opt.batch_size, opt.boxes, opt.nc, g).to(device)

    def step(loss):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def plain():
        with torch.autocast(device.type, enabled=cuda):
            loss, _ = plain_loss(student(imgs), targets)
        step(loss)

    def teacher_only():
        teacher_features(teacher, imgs, t_layers)

    def distill():
        with torch.autocast(device.type, enabled=cuda):
            pred, feats, masks = student(imgs, target=targets, imitation_layers=opt.imitation_layers)
            feats = feats if isinstance(feats, list) else [feats]
            masks = masks if isinstance(masks, list) else [masks]
            t_feats = teacher_features(teacher, imgs, t_layers)
            loss, _ = distill_loss(pred, targets, teacher=t_feats, student=adapters(feats), mask=masks)
        step(loss)

    with torch.no_grad():
        _, feats, _ = student(imgs, target=targets, imitation_layers=opt.imitation_layers)
    feats = feats if isinstance(feats, list) else [feats]
    t_feats = teacher_features(teacher, imgs, t_layers)
    detect = student.model[-1]
    level_anchors = []
    for f, li in zip(feats, layers):
        level = [int(s) for s in detect.stride].index(student.layer_strides[li])
        level_anchors.append((detect.anchors[level], f.shape))

    def mask_only():
        for anchors, shape in level_anchors:
            imitation_mask(targets, anchors, (shape[0], shape[2], shape[3]), opt.iou_factor)

    s_feat = [f.detach().float().requires_grad_(True) for f in feats]
    masks = [imitation_mask(targets, a, (s[0], s[2], s[3])).unsqueeze(1) for a, s in level_anchors]

    with torch.no_grad():
        adapted_feat = [a.float().requires_grad_(True) for a in adapters(s_feat)]

    def imit_only():  # the loss alone, on already-adapted features
        loss = sum(imitation_loss(a, t, m) for a, t, m in zip(adapted_feat, t_feats, masks))
        loss.backward()

    def adapter_only():  # the adapter convs, forward + backward
        with torch.autocast(device.type, enabled=cuda):
            out = adapters(s_feat)
        sum(o.float().mean() for o in out).backward()

    def val_step():
        student.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=cuda):
            non_max_suppression(student(imgs)[0], 0.001, 0.6, max_det=300)
        student.train()

    w, n = opt.warmup, opt.iters
    figures = {}
    for name, fn in (("plain", plain), ("teacher", teacher_only), ("distill", distill), ("mask", mask_only),
                     ("imit", imit_only), ("adapter", adapter_only), ("val", val_step)):  # fmt: skip
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        figures[name] = median_time(fn, n, device, warmup=w) * 1000
        if cuda:
            figures[f"{name}_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    bs = opt.batch_size
    ratio = figures["distill"] / (figures["plain"] + figures["teacher"])
    share = (figures["mask"] + figures["imit"]) / figures["distill"]
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}, {opt.student} <- {opt.teacher}, batch {bs}, {opt.imgsz}px, "
          f"layers {layers}, adapter {opt.adapter_kernel}x{opt.adapter_kernel}, channels_last={opt.channels_last}")  # fmt: skip
    print(f"{'step':<28}{'median ms':>12}{'images/s':>12}" + (f"{'peak GB':>10}" if cuda else ""))
    labels = {
        "plain": "plain student step", "teacher": "teacher forward alone", "distill": "distillation step",
        "mask": "imitation mask", "imit": "imitation loss fwd+bwd", "adapter": "adapter conv fwd+bwd",
        "val": "val forward + NMS",
    }  # fmt: skip
    for k, label in labels.items():
        mem = f"{figures[k + '_mem_gb']:>10.2f}" if cuda else ""
        print(f"{label:<28}{figures[k]:>12.2f}{bs / figures[k] * 1000:>12.1f}{mem}")
    print(f"distill / (plain + teacher) = {ratio:.3f}   (target <= 1.10)")
    print(f"(mask + imitation loss) / distill step = {share * 100:.2f}%   (target < 2%)")
    figures.update(ratio=ratio, share=share)
    return figures


def parse_opt() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="yolov5n.yaml")
    parser.add_argument("--teacher", default="yolov5s.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--nc", type=int, default=80)
    parser.add_argument("--boxes", type=int, default=7, help="boxes per image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--imitation-layers", default=None, help="None (default point), 'detect' or '17,20,23'")
    parser.add_argument("--iou-factor", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--adapter-kernel", type=int, default=3, help="3 (paper) or 1")
    opt = parser.parse_args()
    if opt.imitation_layers not in (None, "detect"):
        opt.imitation_layers = [int(x) for x in opt.imitation_layers.split(",")]
    return opt


if __name__ == "__main__":
    main(parse_opt())
