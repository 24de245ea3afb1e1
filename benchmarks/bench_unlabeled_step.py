"""What a step costs with unlabelled images (train.py --unlabeled) beside the labelled batch.

Median wall time, in interleaved rounds, of three training steps of the default recipe (FGFI + kd + box_kd, balanced):
  plain        the student alone: forward + YOLOv5 loss + backward + optimizer step
  labelled     the distillation step on the labelled batch (what --ft_weights alone runs)
  +unlabelled  the same, then U unlabelled images: the teacher's whole forward, its pseudo-boxes (NMS above
               --pseudo-conf) as FGFI's mask, the student's forward and the output terms' and FGFI's backward
and the ratios +unlabelled / labelled and +unlabelled / plain: how many more epochs of a labelled-only run fit in the
same minutes (experiment.py's '@time' arms measure the same from whole runs). The teacher is the shipped one and the
images are the built-in data's (generated on first use), so its pseudo-boxes are real ones.

    python benchmarks/bench_unlabeled_step.py                          # CPU: yolov5n <- shipped yolov5s, 192 px, 16 + 16
    python benchmarks/bench_unlabeled_step.py --unlabeled-batch-size 8 --imgsz 320
    python benchmarks/bench_unlabeled_step.py --device 0 --batch-size 64 --unlabeled-batch-size 64 --imgsz 640
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
from models.yolo import DetectionModel  # noqa: E402
from utils.dataloaders import create_dataloader, create_unlabeled_loader  # noqa: E402
from utils.general import check_dataset, yaml_load  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.torch_utils import reuse_freed_memory, select_device  # noqa: E402

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
    uimgs = next(
        iter(create_unlabeled_loader(data["val"], opt.imgsz, opt.unlabeled_batch_size, 32, hyp, workers=0)[0])
    )[0]
    imgs, targets, uimgs = imgs.to(device).float() / 255, targets.to(device), uimgs.to(device).float() / 255

    torch.manual_seed(0)
    student = DetectionModel(opt.student, nc=data["nc"]).to(device).train()
    distiller = Distiller(
        student, TEACHER, device, weights={"kd": 1.0, "box_kd": 0.05}, pseudo_conf=opt.pseudo_conf,
        precision=opt.distill_precision,
    )  # fmt: skip
    distiller.check_student(student, adopt_anchors=True)
    plain_loss = ComputeLoss(student, hyp)
    loss_fn = ComputeLoss(
        student, hyp, terms=distiller.loss_terms, balanced=distiller.balanced_terms, unlabeled=distiller.unlabeled_terms
    )
    params = list(student.parameters()) + distiller.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    pseudo = []

    def finish():
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def plain():
        with torch.autocast(device.type, enabled=cuda):
            loss, _ = plain_loss(student(imgs), targets)
        scaler.scale(loss).backward()
        finish()

    def labelled(then_unlabelled: bool = False):
        with torch.autocast(device.type, enabled=cuda):
            pred, inputs = distiller(student, imgs, targets)
            loss, _ = loss_fn(pred, targets, **inputs)
        scaler.scale(loss).backward()
        if then_unlabelled:
            with torch.autocast(device.type, enabled=cuda):
                pred_u, inputs_u = distiller(student, uimgs, None)
                loss_u, _ = loss_fn.unlabeled_loss(pred_u, **inputs_u)
            scaler.scale(loss_u).backward()
            pseudo.append(len(inputs_u.get("pseudo", ())))
        finish()

    row = interleaved_medians(
        {"plain": plain, "labelled": labelled, "+unlabelled": lambda: labelled(True)}, opt.iters, opt.warmup, device
    )
    row["pseudo_boxes"] = sum(pseudo) / max(len(pseudo), 1) / len(uimgs)
    print(
        f"{device.type}: {opt.student} <- {TEACHER.name}, {opt.imgsz} px, labelled batch {opt.batch_size}, unlabelled "
        f"batch {opt.unlabeled_batch_size}, --pseudo-conf {opt.pseudo_conf} ({row['pseudo_boxes']:.1f} pseudo-boxes "
        f"per unlabelled image); median of {opt.iters} interleaved rounds after {opt.warmup}"
    )
    for k in ("plain", "labelled", "+unlabelled"):
        print(f"  {k:12s} {row[k]:8.1f} ms/step")
    print(f"  +unlabelled / labelled {row['+unlabelled'] / row['labelled']:.2f}x, "
          f"+unlabelled / plain {row['+unlabelled'] / row['plain']:.2f}x")  # fmt: skip
    return row


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="yolov5n.yaml")
    parser.add_argument("--imgsz", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--unlabeled-batch-size", type=int, default=16)
    parser.add_argument("--pseudo-conf", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--distill-precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    parser.add_argument("--iters", type=int, default=7, help="timed rounds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(parse_opt())
