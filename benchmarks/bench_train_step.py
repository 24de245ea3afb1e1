"""Training-step cost of FGFI distillation against its physical limit, the plain step plus the teacher's forward.

For each box density (--boxes, boxes per image), median wall time of:
  plain            student forward + YOLOv5 loss + backward + SGD step
  teacher          the frozen teacher's forward alone, as training runs it (fused, no grad, fp16 on CUDA, up to the
                   imitated layer)
  distill dense    the whole distillation step (distill.Distiller + ComputeLoss + backward + step), adapter as a conv
  distill sparse   the same with the adapter on the masked cells only (distill.sparse: masked_cells, Adapter(x, cells))
  teacher full     the teacher's whole forward (head outputs too), as the output terms (--kd-weight) need it
  fgfi+kd          the distillation step with FGFI and both output terms on (experiment.py's KD weights), the path
                   training takes
  mask             the imitation masks alone
  cells + loss     masked_cells (the host sync), the teacher gather and the imitation loss fwd+bwd (sparse path)
  adapter          the adapter alone, fwd+bwd, dense conv and sparse
and the ratio distill / (plain + teacher) of the path training takes by default (sparse below
distill.sparse.default_max_share masked cells, dense above: SPARSE_MAX_SHARE, SPARSE_MAX_SHARE_BF16 in bf16). Steps are timed in interleaved rounds so drift on a shared
machine hits every row alike. Random images, random boxes (3-40% of the image), a random-weight teacher saved and
loaded like a real --ft_weights checkpoint. The line before the last is the default setting's ratio with the output
terms on, fgfi+kd / (plain + teacher full); the last line the FGFI-only ratio. On CPU the process first reuses freed
memory as train.py does (utils.torch_utils.reuse_freed_memory; --default-malloc leaves glibc's malloc as it is).

    python benchmarks/bench_train_step.py                     # CPU: yolov5n <- yolov5s at 320, batch 16, 1/7/30 boxes
    python benchmarks/bench_train_step.py --sweep             # where the sparse adapter stops paying (the crossover)
    python benchmarks/bench_train_step.py --device 0 --student yolov5s.yaml --teacher yolov5l.yaml --imgsz 640 \
        --batch-size 64 --channels-last
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill import (  # noqa: E402
    PRECISIONS,
    Distiller,
    feature_channels,
    imitation_loss,
    imitation_mask,
    teacher_features,
    teacher_outputs,
)
from distill.distiller import resolve_cpu_bf16  # noqa: E402
from distill.loss import Adapter  # noqa: E402
from distill.sparse import SPARSE_MAX_SHARE, SPARSE_MAX_SHARE_BF16, gather_cells, masked_cells  # noqa: E402
from experiment import KD  # noqa: E402
from models.yolo import DetectionModel  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.general import yaml_load  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.torch_utils import reuse_freed_memory, select_device  # noqa: E402

ALWAYS_SPARSE = float("inf")


def random_targets(batch: int, boxes_per_image: int, nc: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 6] (image, class, x, y, w, h) normalized, sides 3-40% of the image."""
    n = batch * boxes_per_image
    img = torch.arange(batch).repeat_interleave(boxes_per_image).float()
    cls = torch.randint(0, nc, (n,), generator=generator).float()
    wh = 0.03 + 0.37 * torch.rand(n, 2, generator=generator)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=generator)
    return torch.cat((img[:, None], cls[:, None], xy, wh), 1)


def interleaved_medians(fns: dict, rounds: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median ms of each function, timed in rounds that call every function once; and, as '<name>_faults', the median
    minor page faults of a call (on CPU, memory that the allocator handed back to the OS and must fault in again)."""
    times, faults = {k: [] for k in fns}, {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {k: statistics.median(v) for k, v in times.items()} | {
        f"{k}_faults": statistics.median(v) for k, v in faults.items()
    }


def peak_memory(fn, device: torch.device) -> float:
    """Peak GPU memory (GB) of one call of fn; nan on CPU."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


def make_teacher(cfg: str, nc: int, folder: Path) -> Path:
    """A random-weight teacher in YOLOv5's checkpoint layout (fp16), as --ft_weights would give one."""
    torch.manual_seed(1)
    model = DetectionModel(cfg, nc=nc)
    model.names = {i: str(i) for i in range(nc)}
    file = folder / "teacher.pt"
    save_checkpoint({"epoch": -1, "model": model.half(), "ema": None, "optimizer": None, "opt": {}}, file)
    return file


def part_steps(
    student: DetectionModel, distiller: Distiller, imgs: torch.Tensor, targets: torch.Tensor, iou_factor: float
) -> tuple[dict, list[torch.Tensor]]:
    """The parts of a distillation step on their own: mask, cells + loss, adapter dense and sparse; and the masks."""
    cuda = imgs.device.type == "cuda"
    with torch.no_grad():
        _, features, masks = student(imgs, target=targets, imitation_layers=distiller.student_layers)
    t_maps = teacher_features(distiller.teacher, imgs, distiller.teacher_layers)
    anchors = [student.model[-1].anchors[level] for level in student.imitation_levels(distiller.student_layers)]
    leaves = [f.detach().float().requires_grad_(True) for f in features]
    adapters = getattr(distiller.adapters, "module", distiller.adapters).m
    cells = masked_cells(masks, ALWAYS_SPARSE)
    autocast = partial(torch.autocast, imgs.device.type, enabled=cuda or distiller.cpu_bf16)  # as the Distiller
    with torch.no_grad(), autocast():
        adapted = [a(x, c).float().requires_grad_(True) for a, x, c in zip(adapters, leaves, cells)]

    def mask():
        for f, a in zip(features, anchors):
            imitation_mask(targets, a, (f.shape[0], f.shape[2], f.shape[3]), iou_factor)

    def cells_loss():
        step_cells = masked_cells(masks, ALWAYS_SPARSE)
        sum(imitation_loss(s, gather_cells(t, c)) for s, t, c in zip(adapted, t_maps, step_cells)).backward()

    def adapter(sparse: bool):
        def fn():
            with autocast():
                out = [a(x, c if sparse else None) for a, x, c in zip(adapters, leaves, cells)]
            sum(o.float().sum() for o in out).backward()

        return fn

    fns = {"mask": mask, "cells_loss": cells_loss, "adapter_dense": adapter(False), "adapter_sparse": adapter(True)}
    return fns, masks


def run(opt: argparse.Namespace) -> list[dict]:
    """Time every step at every density; print the table; return one dict of figures per density."""
    device = select_device(opt.device)
    cuda = device.type == "cuda"
    reused = not cuda and not opt.default_malloc and reuse_freed_memory()  # as train.py does on CPU
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    hyp = yaml_load(ROOT / "data/hyps/hyp.scratch-low.yaml")
    torch.manual_seed(0)
    student = DetectionModel(opt.student, nc=opt.nc).to(device).train()
    if opt.channels_last:
        student.to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_file = make_teacher(opt.teacher, opt.nc, Path(tmp))
        distiller, kd_distiller = (
            Distiller(
                student, teacher_file, device, opt.imitation_layers, iou_factor=opt.iou_factor,
                adapter_kernel=opt.adapter_kernel, channels_last=opt.channels_last, weights=weights,
                precision=opt.distill_precision,
            )
            for weights in (None, {"kd": KD["kd_weight"], "box_kd": KD["box_kd_weight"]})
        )  # fmt: skip
    params = list(student.parameters()) + distiller.parameters() + kd_distiller.parameters()
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    plain_loss = ComputeLoss(student, hyp)
    distill_loss = ComputeLoss(student, hyp, terms=distiller.loss_terms)
    kd_loss = ComputeLoss(student, hyp, terms=kd_distiller.loss_terms)
    imgs = torch.rand(opt.batch_size, 3, opt.imgsz, opt.imgsz, generator=g).to(device)
    if opt.channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last)

    def step(loss):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def plain():
        with torch.autocast(device.type, enabled=cuda):
            loss, _ = plain_loss(student(imgs), targets)
        step(loss)

    def teacher():
        teacher_features(distiller.teacher, imgs, distiller.teacher_layers)

    def teacher_full():
        teacher_outputs(kd_distiller.teacher, imgs, kd_distiller.teacher_layers)

    def fgfi_kd():
        with torch.autocast(device.type, enabled=cuda):
            pred, inputs = kd_distiller(student, imgs, targets)
            loss, _ = kd_loss(pred, targets, **inputs)
        step(loss)

    def distill(max_share: float):
        def fn():
            distiller.sparse_max_share = max_share
            with torch.autocast(device.type, enabled=cuda):
                pred, imitation = distiller(student, imgs, targets)
                loss, _ = distill_loss(pred, targets, **imitation)
            step(loss)

        return fn

    rows, default_share = [], distiller.sparse_max_share  # the path training takes (default_max_share)
    for boxes in opt.boxes:
        targets = random_targets(opt.batch_size, boxes, opt.nc, g).to(device)
        fns = {
            "plain": plain,
            "teacher": teacher,
            "distill_dense": distill(0.0),
            "distill_sparse": distill(ALWAYS_SPARSE),
            "teacher_full": teacher_full,
            "fgfi_kd": fgfi_kd,
        }
        parts, masks = part_steps(student, distiller, imgs, targets, opt.iou_factor)
        fns.update(parts)
        row = interleaved_medians(fns, opt.iters, opt.warmup, device)
        row.update({f"{k}_gb": peak_memory(fns[k], device) for k in ("plain", "distill_dense", "distill_sparse")})
        base = row["plain"] + row["teacher"]
        cells = sum(int(m.count_nonzero()) for m in masks)
        auto = "sparse" if all(c is not None for c in masked_cells(masks, default_share)) else "dense"
        row.update(
            boxes=boxes, share=cells / sum(m.numel() for m in masks), cells=cells, auto=auto,
            ratio_dense=row["distill_dense"] / base, ratio_sparse=row["distill_sparse"] / base,
        )  # fmt: skip
        row["ratio"] = row[f"ratio_{auto}"]
        row["ratio_kd"] = row["fgfi_kd"] / (row["plain"] + row["teacher_full"])
        row["loss_share"] = (row["mask"] + row["cells_loss"]) / row[f"distill_{auto}"]
        rows.append(row)
    distiller.sparse_max_share = default_share
    print_table(opt, device, distiller, rows, reused)
    return rows


def print_table(
    opt: argparse.Namespace, device: torch.device, distiller: Distiller, rows: list[dict], reused: bool = False
) -> None:
    cuda = device.type == "cuda"
    malloc = "freed memory reused" if reused else "default malloc"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads, {malloc}"
    if not cuda:
        name += f", teacher and adapters {distiller.precision} (--distill-precision {opt.distill_precision})"
    k = opt.adapter_kernel
    print(
        f"\n{name}, torch {torch.__version__}; {opt.student} <- {opt.teacher}, {opt.imgsz} px, batch {opt.batch_size}, "
        f"layers {distiller.student_layers} <- {distiller.teacher_layers}, adapter {k}x{k}, "
        f"channels_last={opt.channels_last}, median of {opt.iters} interleaved rounds (ms)"
    )
    labels = {
        "share": "masked share of cells", "cells": "masked cells (batch)", "plain": "plain student step",
        "teacher": "teacher forward alone", "distill_dense": "distill step, dense adapter",
        "distill_sparse": "distill step, sparse adapter", "mask": "imitation mask", "cells_loss": "cells + imitation loss",
        "adapter_dense": "adapter fwd+bwd, dense", "adapter_sparse": "adapter fwd+bwd, sparse",
        "ratio_dense": "ratio, dense adapter", "ratio_sparse": "ratio, sparse adapter", "auto": "path taken (auto)",
        "ratio": "ratio, path taken", "loss_share": "(mask + loss) / step",
        "teacher_full": "teacher full forward", "fgfi_kd": "fgfi+kd step (path taken)",
        "ratio_kd": "ratio fgfi+kd/(plain+full)",
        "plain_faults": "page faults, plain step", "teacher_faults": "page faults, teacher",
        "distill_dense_faults": "page faults, dense step", "distill_sparse_faults": "page faults, sparse step",
        "teacher_full_faults": "page faults, teacher full", "fgfi_kd_faults": "page faults, fgfi+kd step",
    }  # fmt: skip
    if cuda:
        labels.update(plain_gb="peak GB, plain", distill_dense_gb="peak GB, dense", distill_sparse_gb="peak GB, sparse")
    print(f"{'boxes per image':<30}" + "".join(f"{r['boxes']:>12}" for r in rows))
    for key, label in labels.items():
        cells = []
        for r in rows:
            v = r[key]
            if isinstance(v, str):
                cells.append(f"{v:>12}")
            elif key in ("share", "loss_share"):
                cells.append(f"{v * 100:>11.2f}%")
            elif key == "cells" or key.endswith("_faults"):
                cells.append(f"{v:>12.0f}")
            elif key.startswith("ratio"):
                cells.append(f"{v:>12.3f}")
            else:
                cells.append(f"{v:>12.2f}")
        print(f"{label:<30}" + "".join(cells))
    default = next((r for r in rows if r["boxes"] == 7), rows[-1])
    print(f"ratio fgfi+kd/(plain+teacher) = {default['ratio_kd']:.2f}")
    print(f"ratio distill/(plain+teacher) = {default['ratio']:.2f}")


def sweep(opt: argparse.Namespace) -> list[tuple[float, float, float]]:
    """Adapter + imitation loss fwd+bwd, dense conv vs sparse, on random masks of growing share; prints the
    crossover (the share where sparse stops being faster), the value distill.sparse.SPARSE_MAX_SHARE (in bf16:
    SPARSE_MAX_SHARE_BF16) should hold."""
    device = select_device(opt.device)
    cuda = device.type == "cuda"
    if not cuda and not opt.default_malloc:
        reuse_freed_memory()  # as train.py does on CPU
    torch.manual_seed(0)
    student = DetectionModel(opt.student, nc=opt.nc)
    teacher = DetectionModel(opt.teacher, nc=opt.nc)
    layer = student.imitation_points(opt.imitation_layers)[0]
    stride = student.layer_strides[layer]
    c_s = feature_channels(student, [layer])[0]
    c_t = feature_channels(teacher, teacher.imitation_points(opt.imitation_layers))[0]
    h = w = opt.imgsz // stride
    adapter = Adapter(c_s, c_t, opt.adapter_kernel).to(device)
    bf16 = resolve_cpu_bf16(opt.distill_precision, device)
    autocast = partial(torch.autocast, device.type, enabled=cuda or bf16)  # as the Distiller runs the adapter
    x = torch.randn(opt.batch_size, c_s, h, w, device=device, requires_grad=True)
    t = torch.randn(opt.batch_size, c_t, h, w, device=device)

    def dense(m):
        with autocast():
            s = adapter(x)
        imitation_loss(s, t, m).backward()

    def sparse(m):
        (cells,) = masked_cells([m], ALWAYS_SPARSE)
        with autocast():
            s = adapter(x, cells)
        imitation_loss(s, gather_cells(t, cells)).backward()

    results = []
    k, precision = opt.adapter_kernel, "bf16" if bf16 else "fp32" if not cuda else "AMP"
    print(f"\nadapter {c_s} -> {c_t} ch, {k}x{k}, [{opt.batch_size}, {h}, {w}] map, {precision}:")
    print(f"{'masked share':>14}{'dense ms':>12}{'sparse ms':>12}{'sparse/dense':>14}")
    for share in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0):
        m = (torch.rand(opt.batch_size, 1, h, w, device=device) < share).float()
        times = interleaved_medians({"dense": partial(dense, m), "sparse": partial(sparse, m)}, opt.iters, 2, device)
        results.append((share, times["dense"], times["sparse"]))
        print(f"{share:>14.2f}{times['dense']:>12.2f}{times['sparse']:>12.2f}{times['sparse'] / times['dense']:>14.2f}")
    name, value = ("SPARSE_MAX_SHARE_BF16", SPARSE_MAX_SHARE_BF16) if bf16 else ("SPARSE_MAX_SHARE", SPARSE_MAX_SHARE)
    print(f"crossover (sparse = dense, interpolated): {crossover(results):.2f}; {name} = {value}")
    return results


def crossover(results: list[tuple[float, float, float]]) -> float:
    """The share where sparse and dense cost the same, linearly interpolated between the two shares around it (1.0 when
    sparse is faster everywhere, the first share when it is never faster)."""
    previous = None
    for share, dense, sparse in results:
        gap = sparse / dense - 1
        if gap >= 0:
            if previous is None:
                return share
            p_share, p_gap = previous
            return p_share + (share - p_share) * -p_gap / (gap - p_gap)
        previous = (share, gap)
    return 1.0


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="yolov5n.yaml")
    parser.add_argument("--teacher", default="yolov5s.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--nc", type=int, default=80)
    parser.add_argument("--boxes", default="1,7,30", help="box densities: boxes per image, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--imitation-layers", default=None, help="None (default point), 'detect' or '17,20,23'")
    parser.add_argument("--iou-factor", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=4, help="untimed rounds (CPU: let the allocator settle)")
    parser.add_argument("--iters", type=int, default=7, help="timed rounds")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--adapter-kernel", type=int, default=3, help="3 (paper) or 1")
    parser.add_argument("--sweep", action="store_true", help="only the dense/sparse crossover sweep")
    parser.add_argument(
        "--distill-precision", choices=PRECISIONS, default="auto",
        help="CPU: teacher and adapters in bf16 or fp32, as train.py's flag (auto: bf16 where the CPU has AMX)",
    )  # fmt: skip
    parser.add_argument(
        "--default-malloc", action="store_true",
        help="CPU: leave glibc's malloc as it is (train.py applies utils.torch_utils.reuse_freed_memory)",
    )  # fmt: skip
    opt = parser.parse_args(argv)
    opt.boxes = [int(b) for b in str(opt.boxes).split(",")]
    if opt.imitation_layers not in (None, "detect"):
        opt.imitation_layers = [int(x) for x in opt.imitation_layers.split(",")]
    return opt


if __name__ == "__main__":
    options = parse_opt()
    sweep(options) if options.sweep else run(options)
