"""How large the distillation terms' step is against the detection loss's own step, under the decoupled step.

The gate scales the terms' loss, but Adam divides each step by the root of the gradient's own square, so a scaled-down
gradient gives nearly the same step. This measures it on the first steps of a fine-tune: per part of the student
(backbone, neck, the head's box+objectness rows and its class rows), the norm of the terms' step over the norm of the
detection loss's step (the parameters' change over the run's optimizer step), beside the batch's gate. Without --cap
the step is uncapped (--distill-cap 0); with --cap K (--distill-cap K, K = 1 as train.py's default when K is left
out) the terms' step of each tensor is at most K x the gate's share of the detection loss's.

    python benchmarks/bench_terms_step.py                  # BCCD fine-tune: yolov5n.pt <- the bccd preset's teacher
    python benchmarks/bench_terms_step.py --cap
    python benchmarks/bench_terms_step.py --data my.yaml --weights yolov5n.pt --teacher my_teacher.pt --imgsz 640

The BCCD teacher is the one `python experiment.py --preset bccd` trains first (runs/teachers/); the data and the
student's weights are in ../shared/real (not in a clone of this repository: give your own).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from distill.optim import DecoupledStep  # noqa: E402
from distill.options import build_distiller, resolve_distill_options  # noqa: E402
from utils.checkpoint import load_student  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.general import UserError, check_dataset, check_yaml, load_hyp  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.torch_utils import smart_optimizer  # noqa: E402

SHARED = ROOT.parent / "shared/real"


def parts(model: torch.nn.Module) -> dict[str, list[tuple[torch.nn.Parameter, torch.Tensor | slice]]]:
    """The student's parameters by part: (parameter, its rows in that part: a mask, or every row)."""
    detect = len(model.model) - 1
    backbone_end = next(i for i, m in enumerate(model.model) if type(m).__name__ == "SPPF") + 1
    out: dict[str, list] = {"backbone": [], "neck": [], "head box+obj": [], "head class": []}
    no = model.model[-1].no  # outputs per anchor: x, y, w, h, objectness, classes
    for name, p in model.named_parameters():
        layer = int(name.split(".")[1])
        if layer == detect:
            rows = torch.arange(p.shape[0]) % no
            out["head box+obj"].append((p, rows < 5))
            out["head class"].append((p, rows >= 5))
        else:
            out["backbone" if layer < backbone_end else "neck"].append((p, slice(None)))
    return out


def run(opt: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    device = torch.device("cpu")
    hyp = load_hyp(check_yaml(opt.hyp, "--hyp"))
    data = check_dataset(opt.data)
    model, _, _ = load_student(opt.weights, "", int(data["nc"]), hyp.get("anchors"), False, device)
    nc = int(data["nc"])
    train.scale_loss_gains(hyp, model.model[-1].nl, nc, opt.imgsz)
    model.nc, model.hyp, model.names = nc, hyp, data["names"]
    args = train.parse_opt(True, args=[])
    args.ft_weights = opt.teacher
    distiller = build_distiller(args, model, device, hyp, resolve_distill_options(args, hyp))
    distiller.check_student(model, adopt_anchors=False)
    loss_fn = ComputeLoss(model, hyp, terms=distiller.loss_terms, balanced=distiller.balanced_terms, gated=True)
    optimizer = smart_optimizer(model, "AdamW", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    for group in distiller.param_groups(hyp["weight_decay"]):
        optimizer.add_param_group(group)
    decoupled = DecoupledStep(optimizer, cap=opt.cap)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loader = create_dataloader(data["train"], opt.imgsz, opt.batch_size, 32, hyp=hyp, augment=True, shuffle=True,
                               workers=0)[0]  # fmt: skip
    groups, rows, batches = parts(model), [], iter(loader)
    model.train()
    for step in tqdm(range(opt.steps), desc="steps"):
        imgs, targets = next(batches)[:2]
        pred, inputs = distiller(model, imgs.float() / 255, targets)
        detection, terms, _ = loss_fn.split(pred, targets, **inputs)
        decoupled.backward(scaler, detection, terms)
        start = {p: p.detach().clone() for p in decoupled.params}
        scaler.step(optimizer)
        mid = {p: p.detach().clone() for p in decoupled.params}
        decoupled.step(scaler, share=loss_fn.gate)
        scaler.update()
        optimizer.zero_grad()
        row = {"step": step, "gate": float(loss_fn.gate)}
        for part, members in groups.items():
            det = sum((mid[p] - start[p])[sel].pow(2).sum() for p, sel in members)
            own = sum((p.detach() - mid[p])[sel].pow(2).sum() for p, sel in members)
            row[part] = float((own / det.clamp(min=1e-30)).sqrt())
        rows.append(row)
    capped = f" (--distill-cap {opt.cap:g})" if opt.cap else ""
    print(f"terms' step / detection loss's step{capped}: {opt.teacher} -> {opt.weights}")
    print(" ".join(f"{k:>12s}" for k in rows[0]))
    for row in rows:
        print(" ".join(f"{v:12d}" if k == "step" else f"{v:12.2f}" for k, v in row.items()))
    return rows


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "bccd.yaml"))
    parser.add_argument("--weights", default=str(SHARED / "weights/yolov5n.pt"), help="the student's start")
    parser.add_argument("--teacher", default=str(ROOT / "runs/teachers/bccd-yolov5n-320px-36e/weights/best.pt"))
    parser.add_argument("--hyp", default="hyp.short.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cap", type=float, nargs="?", const=1.0, default=0.0, metavar="K", help="--distill-cap K")
    return parser.parse_args(argv)


if __name__ == "__main__":
    opt = parse_opt()
    for flag, path in (("--data", opt.data), ("--weights", opt.weights), ("--teacher", opt.teacher)):
        if not Path(path).is_file():
            sys.exit(
                f"{flag} {path}: not found (the BCCD default needs ../shared/real and `experiment.py --preset bccd`)"
            )
    try:
        run(opt)
    except UserError as e:
        sys.exit(f"ERROR: {e}")
