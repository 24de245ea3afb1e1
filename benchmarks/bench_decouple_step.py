"""What --distill-decouple costs: the default recipe's step with one backward pass of the summed loss against two
(the detection loss's and the terms', each into its own gradient) and the second Adam step (distill/optim.py).

Median wall time, in interleaved rounds, of four AdamW training steps on one built-in batch:
  plain       the student alone: forward + YOLOv5 loss + backward + optimizer step
  summed      the default recipe (FGFI + kd + box_kd, balanced) with one step of the summed gradient
              (--no-distill-decouple)
  decoupled   the same with the two backward passes and the terms' own Adam step, uncapped (--distill-cap 0)
  capped      the same with --distill-cap 1 at a share of 0.3 (the default under Adam/AdamW: a copy of the
              student's parameters before the step, and a norm per tensor)
and the ratios decoupled / summed, capped / decoupled and capped / plain. The teacher is the shipped one, the images
the built-in data's (generated on first use).

    python benchmarks/bench_decouple_step.py                          # CPU: yolov5n <- shipped yolov5s, 192 px, batch 16
    python benchmarks/bench_decouple_step.py --device 0 --batch-size 64 --imgsz 640
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_train_step import interleaved_medians  # noqa: E402
from distill import Distiller  # noqa: E402
from distill.optim import DecoupledStep  # noqa: E402
from models.yolo import DetectionModel  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.general import check_dataset, yaml_load  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.torch_utils import reuse_freed_memory, select_device, smart_optimizer  # noqa: E402

TEACHER = ROOT / "weights/yolov5s-synthetic.pt"


def run(opt: argparse.Namespace) -> dict:
    device = select_device(opt.device)
    cuda = device.type == "cuda"
    if not cuda:
        reuse_freed_memory()  # as train.py does on CPU
    hyp = yaml_load(ROOT / "data/hyps/hyp.short.yaml")
    data = check_dataset("synthetic.yaml")
    imgs, targets = next(iter(create_dataloader(data["train"], opt.imgsz, opt.batch_size, 32, hyp=hyp, augment=True,
                                                shuffle=True, workers=0)[0]))[:2]  # fmt: skip
    imgs, targets = imgs.to(device).float() / 255, targets.to(device)

    torch.manual_seed(0)
    student = DetectionModel(opt.student, nc=data["nc"]).to(device).train()
    distiller = Distiller(
        student, TEACHER, device, weights={"kd": 1.0, "box_kd": 0.05}, precision=opt.distill_precision
    )
    distiller.check_student(student, adopt_anchors=True)
    plain_loss = ComputeLoss(student, hyp)
    loss_fn = ComputeLoss(student, hyp, terms=distiller.loss_terms, balanced=distiller.balanced_terms)
    optimizer = smart_optimizer(student, "AdamW", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    for group in distiller.param_groups(hyp["weight_decay"]):
        optimizer.add_param_group(group)
    decoupled, capped = DecoupledStep(optimizer, cap=0.0), DecoupledStep(optimizer, cap=1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    def finish(terms_step: DecoupledStep | None = None):
        scaler.step(optimizer)
        if terms_step:
            terms_step.step(scaler, share=0.3)
        scaler.update()
        optimizer.zero_grad()

    def plain():
        with torch.autocast(device.type, enabled=cuda):
            loss, _ = plain_loss(student(imgs), targets)
        scaler.scale(loss).backward()
        finish()

    def summed():
        with torch.autocast(device.type, enabled=cuda):
            pred, inputs = distiller(student, imgs, targets)
            loss, _ = loss_fn(pred, targets, **inputs)
        scaler.scale(loss).backward()
        finish()

    def split(step: DecoupledStep):
        with torch.autocast(device.type, enabled=cuda):
            pred, inputs = distiller(student, imgs, targets)
            detection, terms, _ = loss_fn.split(pred, targets, **inputs)
        step.backward(scaler, detection, terms)
        finish(terms_step=step)

    steps = {"plain": plain, "summed": summed, "decoupled": lambda: split(decoupled), "capped": lambda: split(capped)}
    row = interleaved_medians(steps, opt.iters, opt.warmup, device)
    print(
        f"{device.type}: {opt.student} <- {TEACHER.name}, {opt.imgsz} px, batch {opt.batch_size}, AdamW; median of "
        f"{opt.iters} interleaved rounds after {opt.warmup}"
    )
    for k in steps:
        print(f"  {k:10s} {row[k]:8.1f} ms/step")
    print(
        f"  decoupled / summed {row['decoupled'] / row['summed']:.2f}x, capped / decoupled "
        f"{row['capped'] / row['decoupled']:.2f}x, capped / plain {row['capped'] / row['plain']:.2f}x"
    )
    return row


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="yolov5n.yaml")
    parser.add_argument("--imgsz", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--distill-precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    parser.add_argument("--iters", type=int, default=7, help="timed rounds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(parse_opt())
