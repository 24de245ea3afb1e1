"""Train a YOLOv5 detector, optionally distilled from a frozen teacher with fine-grained feature imitation (FGFI).

Usage:
    python train.py --data synthetic.yaml --cfg yolov5n.yaml --epochs 10 --img 320              # from scratch
    python train.py --weights yolov5n.pt --data coco128.yaml --img 640                          # fine-tune
    python train.py --weights yolov5n.pt --ft_weights yolov5l.pt --data coco128.yaml             # FGFI distillation
    python -m torch.distributed.run --nproc_per_node 2 train.py --weights yolov5s.pt --ft_weights yolov5l.pt ...
    python train.py --resume runs/train/exp/weights/last.pt                                     # continue a run
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim import lr_scheduler
from tqdm import tqdm

FILE = Path(__file__).resolve()
ROOT = FILE.parents[0]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import val as validate  # noqa: E402
from distill import BOXES, PRECISIONS, REGIONS  # noqa: E402
from distill.options import (  # noqa: E402
    build_distiller,
    check_distill_options,
    decoupled_step,
    distill_state,
    resolve_distill_options,
    resume_distill_options,
    unlabeled_source,
)
from distill.terms import DEFAULT_REDUCTION, REDUCTIONS, TERMS  # noqa: E402
from utils.autoanchor import check_anchors  # noqa: E402
from utils.checkpoint import (  # noqa: E402
    attempt_load,
    load_student,
    restore_train_state,
    save_checkpoint,
    strip_optimizer,
    train_state,
    training_checkpoint,
)
from utils.dataloaders import create_dataloader, create_unlabeled_loader  # noqa: E402
from utils.evolve import evolve  # noqa: E402
from utils.general import (  # noqa: E402
    LOCAL_RANK,
    LOGGER,
    RANK,
    WORLD_SIZE,
    UserError,
    check_dataset,
    check_file,
    check_img_size,
    check_writable,
    check_yaml,
    colorstr,
    increment_path,
    init_seeds,
    labels_to_class_weights,
    labels_to_image_weights,
    load_hyp,
    one_cycle,
    print_args,
    yaml_save,
)
from utils.loggers import TensorBoardLogger  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.metrics import fitness  # noqa: E402
from utils.options import check_train_options, resume_options  # noqa: E402
from utils.plots import plot_images, plot_imitation_masks, plot_labels, plot_results  # noqa: E402
from utils.results import NOT_LOSSES, append_results, results_row, truncate_results  # noqa: E402
from utils.torch_utils import (  # noqa: E402
    EarlyStopping,
    ModelEMA,
    clip_gradients,
    de_parallel,
    reuse_freed_memory,
    select_device,
    smart_DDP,
    smart_optimizer,
    smart_resume,
    to_channels_last,
    torch_distributed_zero_first,
)


def scale_loss_gains(hyp: dict, nl: int, nc: int, imgsz: int) -> None:
    """YOLOv5's loss gains scaled, in place, by the number of detection levels, classes and the image size."""
    hyp["box"] *= 3 / nl
    hyp["cls"] *= nc / 80 * 3 / nl
    hyp["obj"] *= (imgsz / 640) ** 2 * 3 / nl


def train(hyp: dict | str, opt: argparse.Namespace, device: torch.device) -> tuple:
    """Train one model; returns the final validation results (P, R, mAP50, mAP50-95, *val losses)."""
    save_dir, epochs, batch_size, weights, single_cls, evolve, data, cfg, resume, noval, nosave, workers, freeze = (
        Path(opt.save_dir), opt.epochs, opt.batch_size, opt.weights, opt.single_cls, opt.evolve, opt.data, opt.cfg,
        opt.resume, opt.noval, opt.nosave, opt.workers, opt.freeze,
    )  # fmt: skip
    wdir = save_dir / "weights"
    (wdir.parent if evolve else wdir).mkdir(parents=True, exist_ok=True)
    last, best = wdir / "last.pt", wdir / "best.pt"

    if isinstance(hyp, (str, Path)):
        hyp = load_hyp(hyp)
    hyp = dict(hyp)  # local copy: the loss gains below are scaled per model
    LOGGER.info(colorstr("hyperparameters: ") + ", ".join(f"{k}={v}" for k, v in hyp.items()))
    opt.hyp = hyp.copy()
    explicit = resolve_distill_options(opt, hyp) if opt.ft_weights else []  # flag, else hyp file, else default
    hyp_to_save = dict(hyp)  # as read: the loss gains are scaled per model below
    plots = not evolve and not opt.noplots
    cuda = device.type == "cuda"
    init_seeds(opt.seed + 1 + RANK, deterministic=True)
    with torch_distributed_zero_first(LOCAL_RANK):
        data_dict = check_dataset(data)
    train_path, val_path = data_dict["train"], data_dict["val"]
    nc = 1 if single_cls else int(data_dict["nc"])
    names = {0: "item"} if single_cls and len(data_dict["names"]) != 1 else data_dict["names"]

    # Student: a checkpoint's weights transferred into a fresh model (nc may differ), or a YAML from scratch
    with torch_distributed_zero_first(LOCAL_RANK):  # DDP: rank 0 fetches a weights name (yolov5s.pt), then the rest
        model, ckpt, pretrained_head = load_student(weights, cfg, nc, hyp.get("anchors"), resume, device)
    amp = cuda  # mixed precision on CUDA only

    freeze = [f"model.{x}." for x in (freeze if len(freeze) > 1 else range(freeze[0]))]
    for k, v in model.named_parameters():
        v.requires_grad = True
        if any(x in k for x in freeze):
            LOGGER.info(f"freezing {k}")
            v.requires_grad = False

    # Distillation: the frozen teacher, the adapters and the terms' settings, beside the plain student (distill/)
    distiller = None
    if opt.ft_weights:
        state = ckpt.get("distill") if ckpt is not None and resume else None
        with torch_distributed_zero_first(LOCAL_RANK):  # a teacher by name too
            distiller = build_distiller(opt, model, device, hyp, explicit, resume_state=state)
        distiller.check_student(model, adopt_anchors=not (weights or resume))  # --kd-weight: the teacher's anchors
    gs = max(int(model.stride.max()), distiller.stride if distiller else 0, 32)  # a P6 teacher needs 64
    imgsz = check_img_size(opt.imgsz, gs, floor=gs * 2)
    if opt.channels_last:
        model = to_channels_last(model)

    # Optimizer: YOLOv5's three groups, plus the adapters' weights (decayed) and biases (not decayed)
    nbs = 64  # nominal batch size
    accumulate = max(round(nbs / batch_size), 1)
    hyp["weight_decay"] *= batch_size * accumulate / nbs
    optimizer = smart_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    for group in distiller.param_groups(hyp["weight_decay"]) if distiller else []:
        optimizer.add_param_group(group)
    decoupled = decoupled_step(distiller, optimizer, RANK != -1, ckpt if resume else None, opt.distill_cap)

    if opt.cos_lr:
        lf = one_cycle(1, hyp["lrf"], epochs)
    else:
        lf = lambda x: (1 - x / epochs) * (1.0 - hyp["lrf"]) + hyp["lrf"]  # noqa: E731
    scheduler = lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    ema = ModelEMA(model) if RANK in {-1, 0} else None

    best_fitness, start_epoch, state = 0.0, 0, None
    if ckpt is not None and resume:
        best_fitness, start_epoch, epochs = smart_resume(ckpt, optimizer, ema, weights, epochs, resume)
        state = ckpt.get("train_state")  # RNGs, scaler, step phase: None in YOLOv5's and older checkpoints
        LOGGER.info(f"Resuming training from {weights} from epoch {start_epoch} to {epochs} total epochs")
        if RANK in {-1, 0}:  # rows of epochs after the checkpoint's are redone (killed before it was saved)
            truncate_results(save_dir / "results.csv", start_epoch - 1)
    # TensorBoard beside results.csv (a resumed run drops the events of the epochs it redoes, as the CSV's rows)
    tb = (
        TensorBoardLogger(save_dir, purge_step=start_epoch if resume else None)
        if RANK in {-1, 0} and not evolve
        else None
    )
    del ckpt

    if opt.sync_bn and cuda and RANK != -1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
        LOGGER.info("Using SyncBatchNorm()")

    # Data
    train_loader, dataset = create_dataloader(
        train_path, imgsz, batch_size // WORLD_SIZE, gs, single_cls, hyp=hyp, augment=True,
        cache=None if opt.cache == "val" else opt.cache, rect=opt.rect, rank=LOCAL_RANK, workers=workers,
        image_weights=opt.image_weights, quad=opt.quad, prefix=colorstr("train: "), shuffle=True, seed=opt.seed,
        nc=nc, epoch=start_epoch,
    )  # fmt: skip
    labels = np.concatenate(dataset.labels, 0) if dataset.labels else np.zeros((0, 5))
    nb = len(train_loader)
    # Unlabelled images (--unlabeled / the data YAML's unlabeled:): an endless stream beside the labelled batches, ub
    # of them a step, continued across epochs; a resumed run starts where the stream was (epoch * nb * ub)
    source, ub = unlabeled_source(opt, data_dict, distiller), (opt.unlabeled_batch_size or batch_size) // WORLD_SIZE
    unlabeled = None
    if source:
        unlabeled = iter(
            create_unlabeled_loader(
                source, imgsz, ub, gs, hyp, cache=None if opt.cache == "val" else opt.cache, workers=workers,
                seed=opt.seed, start=start_epoch * nb * ub, prefix=colorstr("unlabeled: "),
            )[0]
        )  # fmt: skip
    if RANK in {-1, 0}:
        val_loader = create_dataloader(
            val_path, imgsz, batch_size // WORLD_SIZE * 2, gs, single_cls, hyp=hyp,
            cache=None if noval else opt.cache, rect=True, rank=-1, workers=workers * 2, pad=0.5,
            prefix=colorstr("val: "), nc=nc,
        )[0]  # fmt: skip
        if not resume:
            if distiller and distiller.same_anchors and not opt.noautoanchor:
                LOGGER.info(f"{colorstr('AutoAnchor: ')}skipped: --kd-weight needs the teacher's anchors")
            elif pretrained_head and not opt.noautoanchor:  # YOLOv5 re-fits them and the head loses what it learnt
                LOGGER.info(
                    f"{colorstr('AutoAnchor: ')}kept the anchors the pretrained head of {weights} was trained with "
                    "(a checkpoint with another class count, or --cfg, gets anchors fitted to the data)"
                )
            elif not opt.noautoanchor:
                check_anchors(dataset, model=model, thr=hyp["anchor_t"], imgsz=imgsz)
            model.half().float()  # pre-reduce anchor precision, as YOLOv5 does
            if plots:
                plot_labels(labels, names, save_dir)

    if RANK != -1:  # the adapters are trained on every rank too; the teacher is replicated, never wrapped
        model = smart_DDP(model)  # NCCL on CUDA, gloo on CPU: the same static-graph wrapping
        if distiller:
            distiller.wrap(smart_DDP)

    scale_loss_gains(hyp, de_parallel(model).model[-1].nl, nc, imgsz)
    hyp["label_smoothing"] = opt.label_smoothing
    m = de_parallel(model)
    m.nc, m.names = nc, names
    m.class_weights = labels_to_class_weights(dataset.labels, nc).to(device) * nc

    t0 = time.time()
    nw = max(round(hyp["warmup_epochs"] * nb), 100) if hyp["warmup_epochs"] > 0 else 0
    last_opt_step = -1
    maps = np.zeros(nc)
    results = (0, 0, 0, 0, 0, 0, 0)
    scheduler.last_epoch = start_epoch - 1
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    stopper, stop = EarlyStopping(patience=opt.patience), False
    if state is not None:  # an exact resume: the state the uninterrupted run had at this point
        restore_train_state(state, scaler)
        last_opt_step = state["last_opt_step"]
        maps = np.asarray(state["maps"], dtype=float)
        stopper.best_fitness, stopper.best_epoch = state["stopper"]
    elif resume:
        LOGGER.info(f"{weights} holds no RNG states (YOLOv5 or an older version): the resumed run is not exact")
    compute_loss = ComputeLoss(
        model,
        hyp,
        terms=distiller.loss_terms if distiller else None,
        balanced=distiller.balanced_terms if distiller else (),
        unlabeled=distiller.unlabeled_terms if source else (),
        gated=bool(distiller and distiller.gate),
    )
    loss_names = compute_loss.names
    # iterations in which imitation trains the adapters alone: by default the lr warmup's (same rule as nw)
    adapter_warmup = max(round(distiller.adapter_warmup * nb), 100) if distiller and distiller.adapter_warmup else 0
    epoch = start_epoch - 1  # a run resumed after its last epoch's save only finishes (strip, validate)
    if not evolve:  # only now, when nothing can refuse the run any more: a refused --resume leaves them as they were
        yaml_save(save_dir / "hyp.yaml", hyp_to_save)
        yaml_save(save_dir / "opt.yaml", vars(opt))
    LOGGER.info(
        f"Image sizes {imgsz} train, {imgsz} val\nUsing {train_loader.num_workers} dataloader workers\n"
        f"Logging results to {colorstr('bold', save_dir)}\nStarting training for {epochs} epochs..."
    )
    for epoch in range(start_epoch, epochs):
        model.train()
        if distiller:
            distiller.train()
        if opt.image_weights:
            cw = m.class_weights.cpu().numpy() * (1 - maps) ** 2 / nc
            iw = labels_to_image_weights(dataset.labels, nc=nc, class_weights=cw)
            # drawn from (seed, epoch) alone: the loader's workers (or --workers 0 reseeding this process's RNG) and
            # a --resume with other --workers draw the same images
            dataset.indices = random.Random(f"{opt.seed}:iw:{epoch}").choices(range(dataset.n), weights=iw, k=dataset.n)
        mloss = torch.zeros(len(loss_names), device=device)  # (the loader's EpochSampler counts epochs itself)
        pbar = enumerate(train_loader)
        LOGGER.info(
            ("\n" + "%11s" * (4 + len(loss_names)))
            % (
                "Epoch",
                "GPU_mem",
                *(_label(k) if k in NOT_LOSSES else f"{_label(k)}_loss" for k in loss_names),
                "Instances",
                "Size",
            )
        )
        if RANK in {-1, 0}:
            pbar = tqdm(pbar, total=nb, bar_format="{l_bar}{bar:10}{r_bar}")
        optimizer.zero_grad()
        for i, (imgs, targets, paths, _) in pbar:
            ni = i + nb * epoch
            imgs = imgs.to(device, non_blocking=True).float() / 255
            targets = targets.to(device, non_blocking=True)
            if opt.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)

            if ni <= nw:  # warmup: bias lr falls from warmup_bias_lr (the student's group 0, the adapters' biases)
                xi = [0, nw]
                accumulate = max(1, np.interp(ni, xi, [1, nbs / batch_size]).round())
                for j, x in enumerate(optimizer.param_groups):
                    start = hyp["warmup_bias_lr"] if j == 0 or x.get("bias") else 0.0
                    x["lr"] = np.interp(ni, xi, [start, x["initial_lr"] * lf(epoch)])
                    if "momentum" in x:
                        x["momentum"] = np.interp(ni, xi, [hyp["warmup_momentum"], hyp["momentum"]])

            if opt.multi_scale:
                draw = random.Random(f"{opt.seed}:ms:{ni}")  # from (seed, step): exact across --workers and ranks
                sz = draw.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
                sf = sz / max(imgs.shape[2:])
                if sf != 1:
                    ns = [math.ceil(x * sf / gs) * gs for x in imgs.shape[2:]]
                    imgs = nn.functional.interpolate(imgs, size=ns, mode="bilinear", align_corners=False)

            with torch.autocast(device_type=device.type, enabled=amp):
                pred, imitation = (
                    distiller(model, imgs, targets, adapters_only=ni < adapter_warmup)
                    if distiller
                    else (model(imgs), {})
                )
                if decoupled:  # the detection loss and the terms apart, each into its own gradient
                    loss, loss_terms, items = compute_loss.split(pred, targets, **imitation)
                else:
                    loss, items = compute_loss(pred, targets, **imitation)
                if RANK != -1:
                    loss *= WORLD_SIZE  # gradients are averaged across ranks
                if opt.quad:
                    loss *= 4.0
                    if decoupled:
                        loss_terms = loss_terms * 4.0

            if decoupled:
                decoupled.backward(scaler, loss, loss_terms)
            else:
                scaler.scale(loss).backward()
            # the same step's unlabelled images: the distillation terms alone (their own forward and backward)
            if unlabeled is not None:
                uimgs = next(unlabeled)[0].to(device, non_blocking=True).float() / 255
                if uimgs.shape[2:] != imgs.shape[2:]:  # --multi-scale: the labelled batch's size
                    uimgs = nn.functional.interpolate(uimgs, size=imgs.shape[2:], mode="bilinear", align_corners=False)
                if opt.channels_last:
                    uimgs = uimgs.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, enabled=amp):
                    pred_u, inputs_u = distiller(model, uimgs, None, adapters_only=ni < adapter_warmup)
                    loss_u, items_u = compute_loss.unlabeled_loss(pred_u, **inputs_u)
                with decoupled.terms_grads() if decoupled else nullcontext():
                    scaler.scale(loss_u * WORLD_SIZE if RANK != -1 else loss_u).backward()
                items = {k: items.get(k, 0) + items_u[k] for k in loss_names}
            if ni - last_opt_step >= accumulate:
                scaler.unscale_(optimizer)
                clip_gradients([model.parameters()] + ([distiller.parameters()] if distiller else []), max_norm=10.0)
                scaler.step(optimizer)
                if decoupled:  # --distill-cap: the terms' step at most the gate's share of the student's own
                    decoupled.step(scaler, share=1.0 if compute_loss.gate is None else compute_loss.gate)
                scaler.update()
                optimizer.zero_grad()
                if ema:
                    ema.update(model)
                last_opt_step = ni

            if RANK in {-1, 0}:
                mloss = (mloss * i + torch.stack(list(items.values()))) / (i + 1)
                mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
                pbar.set_description(
                    ("%11s" * 2 + "%11.4g" * (2 + len(loss_names)))
                    % (f"{epoch}/{epochs - 1}", mem, *mloss, targets.shape[0], imgs.shape[-1])
                )
                if plots and ni < 3:
                    plot_images(imgs, targets, paths, save_dir / f"train_batch{ni}.jpg", names)
                    if "mask" in imitation:
                        f = save_dir / f"imitation_masks{ni}.jpg"
                        plot_imitation_masks(imgs, imitation["mask"], targets, f, names)

        lr = [x["lr"] for x in optimizer.param_groups]  # x/lr3, x/lr4: the adapters' weights and biases
        scheduler.step()

        if RANK in {-1, 0}:
            ema.update_attr(model, include=["yaml", "nc", "names", "stride", "class_weights"])
            final_epoch = (epoch + 1 == epochs) or stopper.possible_stop
            if not noval or final_epoch:
                results, maps, _ = validate.run(
                    data_dict, batch_size=batch_size // WORLD_SIZE * 2, imgsz=imgsz, half=amp, model=ema.ema,
                    single_cls=single_cls, dataloader=val_loader, save_dir=save_dir, plots=False,
                    compute_loss=compute_loss,
                )  # fmt: skip
            fi = float(fitness(np.array(results[:4]).reshape(1, -1))[0])
            stop = stopper(epoch=epoch, fitness=fi)
            best_fitness = max(best_fitness, fi)
            row = results_row(loss_names, mloss, results, lr)
            append_results(save_dir / "results.csv", epoch, row)
            if tb:
                tb.log_epoch(epoch, row)

            # the CSV row, best.pt, epoch{N}.pt, then last.pt commits the epoch: a run killed before last.pt is
            # replaced redoes the epoch and writes the others again
            if (not nosave) or (final_epoch and not evolve):
                state = train_state(
                    scaler, last_opt_step=last_opt_step, maps=maps.tolist(),
                    stopper=(stopper.best_fitness, stopper.best_epoch),
                )  # fmt: skip
                ckpt = training_checkpoint(
                    epoch, best_fitness, model, ema, optimizer, opt, distill_state(distiller, decoupled), state
                )
                if best_fitness == fi:
                    save_checkpoint(ckpt, best)
                if opt.save_period > 0 and epoch % opt.save_period == 0:
                    save_checkpoint(ckpt, wdir / f"epoch{epoch}.pt")
                save_checkpoint(ckpt, last)
                del ckpt

        if RANK != -1:  # every rank stops together
            flag = [stop if RANK == 0 else None]
            dist.broadcast_object_list(flag, 0)
            stop = flag[0]
        if stop:
            break

    if RANK in {-1, 0}:
        LOGGER.info(f"\n{epoch - start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
        for f in best, last:  # best first: a run killed in between is resumed from last.pt and strips both
            if f.exists():
                strip_optimizer(f)
                if f is best and not evolve:
                    LOGGER.info(f"\nValidating {f}...")
                    results, _, _ = validate.run(
                        data_dict, batch_size=batch_size // WORLD_SIZE * 2, imgsz=imgsz,
                        model=attempt_load(f, device).half() if amp else attempt_load(f, device),
                        iou_thres=0.60, single_cls=single_cls, dataloader=val_loader, save_dir=save_dir,
                        verbose=True, plots=plots, compute_loss=compute_loss, half=amp,
                    )  # fmt: skip
        if plots and (save_dir / "results.csv").exists():
            plot_results(file=save_dir / "results.csv")
        if tb:  # the pictures that exist (none with --noplots), at the end: no step waits for an image encoder
            tb.log_plots()
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}")
    torch.cuda.empty_cache()
    return results


def _label(name: str) -> str:
    """Progress-bar name of a loss item: a term's short label ('imit', 'boxkd'; '_u' on unlabelled images)."""
    base, u = (name[:-2], "_u") if name.endswith("_u") and name[:-2] in TERMS else (name, "")
    return (TERMS[base].label if base in TERMS else base) + u


def parse_opt(known: bool = False, args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=str, default="", help="initial weights path (a YOLOv5 .pt)")
    parser.add_argument("--cfg", type=str, default="", help="model.yaml path, e.g. models/yolov5s.yaml")
    parser.add_argument("--data", type=str, default=str(ROOT / "data/synthetic.yaml"), help="dataset.yaml path")
    parser.add_argument("--hyp", type=str, default=str(ROOT / "data/hyps/hyp.scratch-low.yaml"), help="hyp path")
    parser.add_argument("--epochs", type=int, default=100, help="total training epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="total batch size for all GPUs")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train, val image size (px)")
    parser.add_argument("--rect", action="store_true", help="rectangular training")
    parser.add_argument("--resume", nargs="?", const=True, default=False, help="resume most recent training")
    parser.add_argument("--nosave", action="store_true", help="only save final checkpoint")
    parser.add_argument("--noval", action="store_true", help="only validate final epoch")
    parser.add_argument("--noautoanchor", action="store_true", help="disable AutoAnchor")
    parser.add_argument("--noplots", action="store_true", help="save no plot files")
    parser.add_argument("--evolve", type=int, nargs="?", const=300, help="evolve hyperparameters for x generations")
    parser.add_argument("--cache", type=str, nargs="?", const="ram", help="image --cache ram/disk")
    parser.add_argument("--image-weights", action="store_true", help="use weighted image selection for training")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    parser.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    parser.add_argument("--optimizer", type=str, choices=["SGD", "Adam", "AdamW"], default="SGD", help="optimizer")
    parser.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only available in DDP mode")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers (per RANK in DDP mode)")
    parser.add_argument("--project", default=str(ROOT / "runs/train"), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--quad", action="store_true", help="quad dataloader")
    parser.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="Label smoothing epsilon")
    parser.add_argument("--patience", type=int, default=100, help="EarlyStopping patience (epochs without improvement)")
    parser.add_argument("--freeze", nargs="+", type=int, default=[0], help="Freeze layers: backbone=10, first3=0 1 2")
    parser.add_argument("--save-period", type=int, default=-1, help="Save checkpoint every x epochs (disabled if < 1)")
    parser.add_argument("--seed", type=int, default=0, help="Global training seed")
    parser.add_argument("--local_rank", type=int, default=-1, help="Automatic DDP Multi-GPU argument, do not modify")
    # FGFI distillation
    parser.add_argument(
        "--ft_weights",
        "--ft-weights",
        type=str,
        default="",
        help="teacher weights: enables distillation (FGFI; output terms with --kd-weight, --box-kd-weight)",
    )
    for term in TERMS.values():  # --imitation-weight, --kd-weight, --box-kd-weight: one per distill/terms.py entry
        parser.add_argument(f"--{term.name.replace('_', '-')}-weight", type=float, default=None, help=term.help)
        for setting in term.settings:  # and each term's own settings (--kd-temperature)
            parser.add_argument(f"--{setting.name.replace('_', '-')}", type=float, default=None, help=setting.help)
    parser.add_argument(
        "--imitation-reduce", choices=REDUCTIONS, default=DEFAULT_REDUCTION,
        help="several imitated layers: their terms' mean (default), sum, or channel-weighted mean",
    )  # fmt: skip
    parser.add_argument(
        "--imitation-boxes", choices=BOXES, default="auto",
        help="boxes of each level's mask: all (the paper), matched (those YOLOv5's loss assigns to that level) or "
        "auto (default: matched with several imitated layers, all with one)",
    )  # fmt: skip
    parser.add_argument("--iou-factor", type=float, default=0.5, help="FGFI psi: keep anchors with IoU > psi * max IoU")
    parser.add_argument(
        "--imitation-layers", type=str, default="default",
        help="'default' (the stride-8 neck Concat), 'detect' (P3/P4/P5 inputs), indices '17,20,23' or, for a teacher "
        "of another architecture, student:teacher indices '17,20,23:23,26,29'",
    )  # fmt: skip
    parser.add_argument(
        "--imitation-region", choices=REGIONS, default="fgfi",
        help="where to imitate: fgfi (anchor-IoU mask), gtbox (inside GT boxes), full (whole map)",
    )  # fmt: skip
    parser.add_argument("--adapter-kernel", type=int, default=3, help="adapter conv size: 3 (paper) or 1 (cheaper)")
    parser.add_argument(
        "--distill-balance", action=argparse.BooleanOptionalAction, default=True,
        help="hold the output terms' gradient at the head outputs at most as large as the detection loss's, batch by "
        "batch (default on; --no-distill-balance: the terms at their weights as they are)",
    )  # fmt: skip
    parser.add_argument(
        "--distill-gate", action=argparse.BooleanOptionalAction, default=None,
        help="scale every distillation term, batch by batch, by how much better the teacher fits the labelled batch "
        "than the student: clamp(1 - teacher's detection loss / student's, 0, 1) (default: on where the teacher has "
        "the student's head; --no-distill-gate: the terms at their weights)",
    )  # fmt: skip
    parser.add_argument(
        "--distill-decouple", action=argparse.BooleanOptionalAction, default=None,
        help="Adam/AdamW: step the distillation terms' gradient with its own moments (a second backward pass), so the "
        "detection loss's step stays the student's own (default: on under Adam/AdamW on one process; no effect under "
        "SGD; --no-distill-decouple: one step of the summed gradient)",
    )  # fmt: skip
    parser.add_argument(
        "--distill-cap", type=float, default=None, metavar="K",
        help="with --distill-decouple: each tensor's step by the terms at most K x the gate's share (1 without the "
        "gate) of the norm of its step by the detection loss (default: 1 where the decoupled step is on; 0: no cap, "
        "more gain where the teacher is far better than the student, a risk where it is not)",
    )  # fmt: skip
    parser.add_argument(
        "--adapter-warmup", type=float, default=None,
        help="epochs in which the imitation term trains the adapters alone, before its gradient reaches the student "
        "(default: hyp warmup_epochs; 0 = from the first step)",
    )  # fmt: skip
    parser.add_argument(
        "--distill-precision", choices=PRECISIONS, default="auto",
        help="CPU: teacher forward and adapter products in bf16 or fp32; auto (default): bf16 where the CPU has AMX "
        "matrix units, fp32 elsewhere. The student trains in fp32 either way; CUDA: fp16 teacher, adapters under AMP",
    )  # fmt: skip
    parser.add_argument(
        "--unlabeled", type=str, default="",
        help="images without labels (folder, glob or .txt list) distilled from the teacher beside the labelled ones; "
        "overrides the data YAML's unlabeled:",
    )  # fmt: skip
    parser.add_argument(
        "--unlabeled-batch-size",
        type=int,
        default=None,
        help="unlabelled images per step, all GPUs (default: --batch-size)",
    )
    parser.add_argument(
        "--pseudo-conf", type=float, default=0.5,
        help="FGFI on unlabelled images: its mask from the teacher's boxes above this confidence (1: labelled only)",
    )  # fmt: skip
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (CUDA speed)")
    return parser.parse_known_args(args)[0] if known else parser.parse_args(args)


def main(opt: argparse.Namespace) -> tuple | None:
    if RANK in {-1, 0}:
        print_args(vars(opt), "train")

    if opt.resume and not opt.evolve:  # continue an interrupted run with its own options
        opt = resume_options(opt, defaults=parse_opt(True, args=[]), state_options=resume_distill_options)
    else:
        opt.data, opt.cfg, opt.hyp = (check_file(opt.data, "--data"), str(opt.cfg), check_yaml(opt.hyp, "--hyp"))
        if opt.cfg:
            opt.cfg = check_yaml(opt.cfg, "--cfg")
        if not (opt.cfg or opt.weights):
            raise UserError("either --cfg (a model YAML) or --weights (a .pt) must be given")
        if opt.ft_weights:  # absolute: a --resume from another directory still finds it
            opt.ft_weights = str(Path(check_file(opt.ft_weights, "--ft_weights")).resolve())
        if opt.unlabeled and not any(c in opt.unlabeled for c in "*?["):
            opt.unlabeled = str(Path(opt.unlabeled).resolve())
        if opt.evolve:
            opt.project = str(ROOT / "runs/evolve") if opt.project == str(ROOT / "runs/train") else opt.project
            opt.exist_ok, opt.resume = opt.resume, False
        opt.save_dir = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok))
    check_train_options(opt)
    check_distill_options(opt)
    check_writable(opt.save_dir, "--resume" if opt.resume and not opt.evolve else "--project")

    device = select_device(opt.device, batch_size=opt.batch_size)
    if device.type == "cpu":
        reuse_freed_memory()  # large tensors reused, not page-faulted in anew each step (benchmarks/RESULTS.md)
    if LOCAL_RANK != -1:
        if opt.batch_size % WORLD_SIZE:
            raise UserError(f"--batch-size {opt.batch_size} must be a multiple of WORLD_SIZE {WORLD_SIZE}")
        if opt.image_weights or opt.evolve:
            raise UserError("--image-weights and --evolve are not supported with DDP training")
        if torch.cuda.is_available() and device.type == "cuda":
            torch.cuda.set_device(LOCAL_RANK)
            device = torch.device("cuda", LOCAL_RANK)
        backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=10800))

    fresh = not opt.resume and not Path(opt.save_dir).exists()  # this call makes the run folder
    try:
        if not opt.evolve:
            return train(opt.hyp, opt, device)
        return evolve(opt, device, train)
    except UserError:
        if fresh and RANK in {-1, 0} and not any(Path(opt.save_dir).glob("**/*.pt")):
            shutil.rmtree(opt.save_dir, ignore_errors=True)  # a refused run leaves the disk as it found it
        raise
    finally:
        if WORLD_SIZE > 1 and dist.is_initialized() and RANK == 0:
            LOGGER.info("Destroying process group... ")
        if dist.is_initialized():
            dist.destroy_process_group()


def run(**kwargs) -> tuple | None:
    """Python entry: train.run(data='synthetic.yaml', cfg='yolov5n.yaml', epochs=1, imgsz=320)."""
    opt = parse_opt(True, args=[])  # defaults only: the caller's own command line is not ours to read
    for k, v in kwargs.items():
        setattr(opt, k, v)
    return main(opt)


if __name__ == "__main__":
    try:
        main(parse_opt())
    except UserError as e:
        LOGGER.error(f"ERROR: {e}")
        sys.exit(1)
