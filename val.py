"""Validate a YOLOv5 detection model on a dataset: P, R, mAP50 and mAP50-95, per class, with plots.

Usage:
    python val.py --weights yolov5s.pt --data coco128.yaml --img 640
    python val.py --weights best.onnx --data synthetic.yaml               # or best.torchscript, best_openvino_model/
    python val.py --weights a.pt b.pt --task speed          # timings only, conf 0.25, NMS IoU 0.45
    python val.py --weights yolov5s.pt --task study         # sweep --img 256..1536, write study_*.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.backend import DetectMultiBackend
from utils.checkpoint import attempt_load
from utils.dataloaders import create_dataloader
from utils.general import (
    LOGGER,
    ROOT,
    UserError,
    check_dataset,
    check_img_size,
    check_range,
    check_writable,
    check_yaml,
    colorstr,
    increment_path,
    non_max_suppression,
    print_args,
    scale_boxes,
    xywh2xyxy,
    xyxy2xywh,
)
from utils.metrics import ConfusionMatrix, ap_per_class, process_batch
from utils.plots import output_to_target, plot_images
from utils.torch_utils import select_device, smart_inference_mode, time_sync

FILE = Path(__file__).resolve()
TQDM_BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"
IOU_THRESHOLDS = (0.5, 0.95, 10)  # mAP50-95: 10 IoU thresholds 0.5, 0.55, ..., 0.95


def coco80_to_coco91_class() -> list[int]:
    """COCO category ids (1..90 with gaps) of the 80 contiguous YOLO class indices."""
    unused = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # ids of the 2014 paper that the 2017 release dropped
    return [i for i in range(1, 91) if i not in unused]


def save_one_txt(predn: torch.Tensor, save_conf: bool, shape: tuple[int, int], file: Path) -> None:
    """Append one image's detections (predn [n, 6] xyxy in original pixels, conf, class) to a YOLO label file:
    `class x y w h [conf]`, xywh normalized to the original image of shape (h, w)."""
    gain = torch.tensor(shape, dtype=torch.float32)[[1, 0, 1, 0]]
    with open(file, "a") as f:
        for *xyxy, conf, cls in predn.float().tolist():
            xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gain).view(-1).tolist()
            line = (cls, *xywh, conf) if save_conf else (cls, *xywh)
            f.write(("%g " * len(line)).rstrip() % line + "\n")


def save_one_json(predn: torch.Tensor, jdict: list, path: Path, class_map: list[int]) -> None:
    """Append one image's detections to a COCO results list: bbox is [x_min, y_min, w, h] in original pixels."""
    image_id = int(path.stem) if path.stem.isnumeric() else path.stem
    box = xyxy2xywh(predn[:, :4].float())
    box[:, :2] -= box[:, 2:] / 2  # centre to top-left corner
    for p, b in zip(predn.float().tolist(), box.tolist()):
        jdict.append(
            {
                "image_id": image_id,
                "category_id": class_map[int(p[5])],
                "bbox": [round(x, 3) for x in b],
                "score": round(p[4], 5),
            }
        )


def _model_nc(model) -> int | None:
    if getattr(model, "nc", None) is not None:
        return int(model.nc)
    layers = getattr(model, "model", None)
    if isinstance(layers, torch.nn.Sequential) and hasattr(layers[-1], "nc"):
        return int(layers[-1].nc)
    return None


def _set_precision(model: torch.nn.Module, half: bool) -> None:
    """Cast in place outside inference mode: parameters made inside it could never be trained again."""
    with torch.inference_mode(False):
        model.half() if half else model.float()


def _fixed_shape_batch(model, imgsz: int) -> tuple[int, int]:
    """(imgsz, batch size) for an export with a fixed input shape: its own, square letterboxed, with a note."""
    h, w = model.imgsz
    if h != w:
        raise UserError(
            f"--weights {model.weights} was exported for {h}x{w} images; val.py letterboxes square images: "
            f"export with a square --imgsz or with --dynamic"
        )
    LOGGER.info(
        f"Forcing --batch-size {model.batch_size} square inference ({model.batch_size}, 3, {h}, {w}) for fixed-shape "
        f"{model.weights.name}{f' (not --imgsz {imgsz})' if imgsz != h else ''}; export with --dynamic to change it"
    )
    return h, model.batch_size


def _try_plot(fn, *args, **kwargs) -> None:
    """Plots are a by-product: a failure warns instead of ending a long training run."""
    try:
        fn(*args, **kwargs)
    except Exception as e:
        LOGGER.warning(f"WARNING: {getattr(fn, '__name__', 'plot')} failed: {e}")


@smart_inference_mode()
def run(
    data,
    weights=None,  # model path: *.pt, *.torchscript, *.onnx or *_openvino_model/
    batch_size: int = 32,
    imgsz: int = 640,  # inference size (pixels)
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,  # NMS IoU threshold
    max_det: int = 300,  # maximum detections per image
    task: str = "val",  # train, val, test, speed or study
    device: str = "",  # cuda device, i.e. 0 or 0,1,2,3 or cpu
    workers: int = 8,  # max dataloader workers
    single_cls: bool = False,
    augment: bool = False,  # test-time augmentation
    verbose: bool = False,  # per-class table even when training or nc >= 50
    save_txt: bool = False,
    save_hybrid: bool = False,  # labels + predictions in the txt files (autolabelling)
    save_conf: bool = False,
    save_json: bool = False,
    project=ROOT / "runs/val",
    name: str = "exp",
    exist_ok: bool = False,
    half: bool = True,  # FP16 inference (CUDA only)
    dnn: bool = False,  # OpenCV DNN backend: not supported, ONNX files run with onnxruntime
    model=None,
    dataloader=None,
    save_dir=Path(""),
    plots: bool = True,
    compute_loss=None,
):
    """Evaluate a model on data[task] (or on `dataloader` when train.py passes its model and loader).

    Returns ((mp, mr, map50, map, *val_losses), maps, times): mean P, R, mAP50 and mAP50-95 over classes with
    labels, then the mean per-batch validation loss terms in compute_loss.detection_names order (YOLOv5's box, obj,
    cls: validation has no teacher, so no distillation term; none without compute_loss); maps [nc] mAP50-95 per class (the overall mAP for classes without labels); times
    (pre-process, inference, NMS) in ms per image.
    """
    training = model is not None
    if training:  # called by train.py with the EMA model
        device = next(model.parameters()).device
        half &= device.type != "cpu"
        _set_precision(model, half)
    else:
        for flag, value in (("--batch-size", batch_size), ("--imgsz", imgsz)):
            if value < 1:
                raise UserError(f"{flag} {value}: must be >= 1")
        check_range("--conf-thres", conf_thres, 0, 1)
        check_range("--iou-thres", iou_thres, 0, 1)
        check_range("--workers", workers, 0, hint="0 loads data in the main process")
        device = select_device(device, batch_size=batch_size)
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
        if dnn:
            LOGGER.warning("WARNING: --dnn ignored: ONNX files run with onnxruntime")
        model = DetectMultiBackend(weights, device=device, load_pt=attempt_load)
        half &= device.type != "cpu"
        _set_precision(model, half)
        data = check_dataset(data)
    save_dir = Path(save_dir)
    if not training:
        check_writable(save_dir, "--project")
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    stride = max(int(torch.as_tensor(model.stride).max()), 32)
    fixed_shape = not training and not getattr(model, "dynamic", True)  # an export traced at one input shape
    if not training:
        imgsz = check_img_size(imgsz, s=stride)
    if fixed_shape:
        imgsz, batch_size = _fixed_shape_batch(model, imgsz)

    model.eval()
    val_path = data.get("val")
    is_coco = isinstance(val_path, str) and val_path.replace("\\", "/").endswith("coco/val2017.txt")
    nc = 1 if single_cls else int(data["nc"])
    iouv = torch.linspace(*IOU_THRESHOLDS, device=device)
    niou = iouv.numel()

    if dataloader is None:
        ncm = _model_nc(model)
        if not single_cls and ncm is not None and ncm != nc:
            raise UserError(
                f"--weights {weights} has {ncm} classes but --data {data.get('yaml_file', '')} has {nc}: "
                f"pass weights trained on this dataset (or --single-cls)"
            )
        if device.type != "cpu":  # warm up
            model(torch.zeros(1, 3, imgsz, imgsz, device=device, dtype=torch.half if half else torch.float))
        pad, rect = (0.0, False) if task == "speed" or fixed_shape else (0.5, True)
        task = task if task in ("train", "val", "test") else "val"
        if not data.get(task):
            raise UserError(f"--task {task}: the data YAML has no '{task}:' images")
        dataloader = create_dataloader(
            data[task], imgsz, batch_size, stride, single_cls, pad=pad, rect=rect, workers=workers,
            prefix=colorstr(f"{task}: "), nc=int(data["nc"]),
        )[0]  # fmt: skip

    seen = 0
    confusion_matrix = ConfusionMatrix(nc=nc)
    names = model.names if hasattr(model, "names") else model.module.names
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
    class_map = coco80_to_coco91_class() if is_coco else list(range(1000))
    s = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
    p = r = ap50 = ap = np.zeros(0)
    mp = mr = map50 = map = 0.0
    dt = [0.0, 0.0, 0.0]  # seconds: pre-process, inference, NMS
    loss_names = tuple(getattr(compute_loss, "detection_names", compute_loss.names)) if compute_loss else ()
    loss = torch.zeros(len(loss_names), device=device)
    jdict, stats, ap_class = [], [], np.zeros(0, dtype=int)
    for batch_i, (im, targets, paths, shapes) in enumerate(tqdm(dataloader, desc=s, bar_format=TQDM_BAR_FORMAT)):
        t1 = time_sync()
        im = im.to(device, non_blocking=True)
        im = (im.half() if half else im.float()) / 255
        targets = targets.to(device)
        nb, _, height, width = im.shape
        t2 = time_sync()
        dt[0] += t2 - t1

        preds, train_out = model(im) if compute_loss else (model(im, augment=augment), None)
        dt[1] += time_sync() - t2

        if compute_loss:
            items = compute_loss([x.float() for x in train_out], targets)[1]
            loss += torch.stack([items[k].detach().float() for k in loss_names]).to(device)

        targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)  # to letterboxed pixels
        hybrid = [targets[targets[:, 0] == i, 1:] for i in range(nb)] if save_hybrid else []
        t3 = time_sync()
        preds = non_max_suppression(
            preds, conf_thres, iou_thres, labels=hybrid, multi_label=True, agnostic=single_cls, max_det=max_det
        )
        dt[2] += time_sync() - t3

        for si, pred in enumerate(preds):
            labels = targets[targets[:, 0] == si, 1:]  # [nl, 5] class, xywh in letterboxed pixels
            nl, npr = labels.shape[0], pred.shape[0]
            path, shape = Path(paths[si]), shapes[si][0]
            correct = torch.zeros(npr, niou, dtype=torch.bool, device=device)
            seen += 1
            if npr == 0:
                if nl:
                    stats.append((correct, *torch.zeros((2, 0), device=device), labels[:, 0]))
                    if plots:
                        confusion_matrix.process_batch(detections=None, labels=labels[:, 0])
                continue

            if single_cls:
                pred[:, 5] = 0
            predn = pred.clone()
            scale_boxes(im[si].shape[1:], predn[:, :4], shape, shapes[si][1])  # to original-image pixels
            tbox = xywh2xyxy(labels[:, 1:5])
            scale_boxes(im[si].shape[1:], tbox, shape, shapes[si][1])
            labelsn = torch.cat((labels[:, 0:1], tbox), 1)  # [nl, 5] class, xyxy in original pixels
            if nl:
                correct = process_batch(predn, labelsn, iouv)
            if plots:
                confusion_matrix.process_batch(predn, labelsn)
            stats.append((correct, pred[:, 4], pred[:, 5], labels[:, 0]))

            if save_txt:
                save_one_txt(predn, save_conf, shape, file=save_dir / "labels" / f"{path.stem}.txt")
            if save_json:
                save_one_json(predn, jdict, path, class_map)

        if plots and batch_i < 3:
            _try_plot(plot_images, im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names)
            _try_plot(plot_images, im, output_to_target(preds), paths, save_dir / f"val_batch{batch_i}_pred.jpg", names)

    # statistics over the whole set
    stats = [
        torch.cat([t.float() for t in x], 0).cpu().numpy() for x in zip(*stats)
    ]  # correct, conf, pred class, label class
    if len(stats) and stats[0].any():
        _, _, p, r, _, ap, ap_class = ap_per_class(*stats, plot=plots, save_dir=save_dir, names=names)
        ap50, ap = ap[:, 0], ap.mean(1)
        mp, mr, map50, map = float(p.mean()), float(r.mean()), float(ap50.mean()), float(ap.mean())
    nt = np.bincount(stats[3].astype(int), minlength=nc) if len(stats) else np.zeros(nc, dtype=int)

    pf = "%22s" + "%11i" * 2 + "%11.3g" * 4
    LOGGER.info(pf % ("all", seen, nt.sum(), mp, mr, map50, map))
    if nt.sum() == 0:
        LOGGER.warning(f"WARNING: no labels found in {task} set, can not compute metrics without labels")
    if (verbose or (nc < 50 and not training)) and nc > 1 and len(stats):
        for i, c in enumerate(ap_class):
            LOGGER.info(pf % (names.get(c, c), seen, nt[c], p[i], r[i], ap50[i], ap[i]))

    t = tuple(x / max(seen, 1) * 1e3 for x in dt)  # ms per image
    if not training:
        shape = (batch_size, 3, imgsz, imgsz)
        LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {shape}" % t)

    if plots:
        _try_plot(confusion_matrix.plot, save_dir=save_dir, names=list(names.values()))

    if save_json and len(jdict):
        w = Path(weights[0] if isinstance(weights, (list, tuple)) else weights).stem if weights is not None else ""
        anno_json = Path(data.get("path") or "../coco") / "annotations/instances_val2017.json"
        pred_json = save_dir / f"{w}_predictions.json"
        LOGGER.info(f"\nSaving {pred_json}...")
        with open(pred_json, "w") as f:
            json.dump(jdict, f)
        if anno_json.is_file():
            map, map50 = _coco_eval(anno_json, pred_json, dataloader, is_coco, default=(map, map50))
        else:
            LOGGER.info(f"pycocotools evaluation skipped: no annotations file {anno_json}")

    _set_precision(model, half=False)  # training continues in FP32
    if not training:
        n = len(list(save_dir.glob("labels/*.txt")))
        s = f"\n{n} labels saved to {save_dir / 'labels'}" if save_txt else ""
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}{s}")
    maps = np.zeros(nc) + map
    for i, c in enumerate(ap_class):
        maps[c] = ap[i]
    return (mp, mr, map50, map, *(loss.cpu() / max(len(dataloader), 1)).tolist()), maps, t


def _coco_eval(anno_json: Path, pred_json: Path, dataloader, is_coco: bool, default: tuple[float, float]):
    """mAP50-95 and mAP50 from pycocotools (COCOeval 'bbox'); `default` when it cannot run."""
    LOGGER.info(f"\nEvaluating pycocotools mAP with {anno_json}...")
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        anno = COCO(str(anno_json))
        pred = anno.loadRes(str(pred_json))
        coco_eval = COCOeval(anno, pred, "bbox")
        if is_coco:  # only the images we evaluated
            coco_eval.params.imgIds = [int(Path(x).stem) for x in dataloader.dataset.im_files]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return float(coco_eval.stats[0]), float(coco_eval.stats[1])
    except Exception as e:
        LOGGER.info(f"pycocotools unable to run: {e}")
        return default


def plot_study(files: list[Path], x: list[int], save_file: Path = Path("study.png")) -> None:
    """mAP50-95 against image size and inference time for each study_*.txt written by --task study."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), tight_layout=True)
    FigureCanvasAgg(fig)
    ax_size, ax_time = fig.subplots(1, 2)
    for f in files:
        y = np.loadtxt(f, ndmin=2)  # rows: P, R, mAP50, mAP50-95, [losses], pre-process, inference, NMS ms
        label = Path(f).stem.replace("study_", "")
        ax_size.plot(x[: len(y)], y[:, 3], ".-", label=label)
        ax_time.plot(y[:, -2], y[:, 3], ".-", label=label)
    ax_size.set(xlabel="image size (pixels)", ylabel="mAP50-95")
    ax_time.set(xlabel="inference time (ms/img)", ylabel="mAP50-95")
    for ax in (ax_size, ax_time):
        ax.grid(alpha=0.2)
        ax.legend(loc="lower right")
    fig.savefig(save_file, dpi=200)


def parse_opt(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=str, default=ROOT / "data/synthetic.yaml", help="dataset.yaml path")
    parser.add_argument("--weights", nargs="+", type=str, default=ROOT / "yolov5s.pt", help="*.pt, *.onnx, ... path")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    parser.add_argument("--task", default="val", help="train, val, test, speed or study")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers (per RANK in DDP mode)")
    parser.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    parser.add_argument("--augment", action="store_true", help="augmented inference")
    parser.add_argument("--verbose", action="store_true", help="report mAP by class")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-hybrid", action="store_true", help="save label+prediction hybrid results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--save-json", action="store_true", help="save a COCO-JSON results file")
    parser.add_argument("--project", default=ROOT / "runs/val", help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--half", action="store_true", help="use FP16 half-precision inference")
    parser.add_argument("--dnn", action="store_true", help="use OpenCV DNN for ONNX inference (not supported)")
    opt = parser.parse_args(args)
    opt.data = check_yaml(opt.data, "--data")
    opt.save_json |= opt.data.endswith("coco.yaml")
    opt.save_txt |= opt.save_hybrid
    print_args(vars(opt), FILE.stem)
    return opt


def main(opt: argparse.Namespace) -> None:
    if opt.half and (opt.device == "cpu" or not torch.cuda.is_available()):
        LOGGER.info("--half ignored: FP16 inference runs on CUDA only; this runs in FP32 on the CPU")
    if opt.task in ("train", "val", "test"):
        if opt.conf_thres > 0.001:
            LOGGER.info(f"WARNING: confidence threshold {opt.conf_thres} > 0.001 gives invalid mAP")
        if opt.save_hybrid:
            LOGGER.info("WARNING: --save-hybrid returns a high mAP from hybrid labels, not from predictions alone")
        run(**vars(opt))
        return
    weights = opt.weights if isinstance(opt.weights, list) else [opt.weights]
    opt.half = torch.cuda.is_available() and opt.device != "cpu"  # FP16 for the fastest results
    if opt.task == "speed":
        opt.conf_thres, opt.iou_thres, opt.save_json = 0.25, 0.45, False
        for opt.weights in weights:
            run(**vars(opt), plots=False)
    elif opt.task == "study":
        x, files = list(range(256, 1536 + 128, 128)), []
        for opt.weights in weights:
            f = Path(f"study_{Path(opt.data).stem}_{Path(opt.weights).stem}.txt")
            y = []
            for opt.imgsz in x:
                LOGGER.info(f"\nRunning {f} --imgsz {opt.imgsz}...")
                results, _, times = run(**vars(opt), plots=False)
                y.append(results + times)
            np.savetxt(f, y, fmt="%10.4g")
            files.append(f)
        plot_study(files, x)
    else:
        raise UserError(f"--task {opt.task}: use one of train, val, test, speed, study")


if __name__ == "__main__":
    try:
        main(parse_opt())
    except UserError as e:
        sys.exit(f"ERROR: {e}")
