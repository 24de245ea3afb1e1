"""Run YOLOv5 detection on images, videos, directories, globs and .txt lists of paths.

Usage:
    $ python detect.py --weights yolov5s.pt --source img.jpg          # image
                                                 vid.mp4              # video
                                                 path/                # directory
                                                 'path/*.jpg'         # glob
                                                 list.txt             # one image/video path per line
    $ python detect.py --weights best.onnx ...     # or best.torchscript, best_openvino_model/ (export.py)

Annotated images and videos go to runs/detect/exp*, --save-txt labels to labels/<stem>.txt as
(class, x, y, w, h[, conf]) with xywh normalized to the original image.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import cv2
import torch

FILE = Path(__file__).resolve()
ROOT = FILE.parents[0]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # so `python path/to/detect.py` finds models/ and utils/

from utils.downloads import attempt_download  # noqa: E402
from utils.general import (  # noqa: E402
    LOGGER,
    UserError,
    check_img_size,
    check_range,
    check_writable,
    colorstr,
    increment_path,
    non_max_suppression,
    print_args,
    scale_boxes,
    xyxy2xywh,
    yaml_load,
)
from utils.plots import Annotator, colors, save_one_box  # noqa: E402


class _Timer:
    """Accumulates wall time over `with` blocks, synchronizing CUDA so GPU work is counted where it happens."""

    def __init__(self, device: torch.device):
        self.t, self.dt, self.cuda = 0.0, 0.0, device.type == "cuda"

    def __enter__(self):
        self.start = self._now()
        return self

    def __exit__(self, *args):
        self.dt = self._now() - self.start
        self.t += self.dt

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _can_imshow() -> bool:
    """True if cv2.imshow works here (not in headless OpenCV builds, not without a display)."""
    try:
        cv2.imshow("test", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy())
        cv2.waitKey(1)
        cv2.destroyAllWindows()
        return True
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        LOGGER.warning(f"WARNING: --view-img disabled, this environment cannot show images ({reason})")
        return False


def _load_model(weights, device: torch.device, data):
    """Load --weights (.pt, .torchscript, .onnx, OpenVINO folder) as a DetectMultiBackend; returns (model, names)."""
    # a missing official name (yolov5s.pt, ...) is fetched from the YOLOv5 v7.0 release first
    weights = [str(attempt_download(w)) for w in (weights if isinstance(weights, (list, tuple)) else [weights])]
    for w in weights:
        if not Path(w).exists():
            raise UserError(f"--weights {w} not found: pass the path of a trained .pt checkpoint or an exported model")
    from models.backend import DetectMultiBackend

    model = DetectMultiBackend(weights, device=device)
    names = getattr(model, "names", None)
    if not names and data and Path(data).is_file():  # names from the data YAML when the model has none
        names = yaml_load(data).get("names")
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    nc = getattr(model, "nc", None) or len(names or {}) or 1000
    names = names or {i: f"class{i}" for i in range(nc)}
    return model, names


def _update_weights(weights) -> None:
    """--update: strip the optimizer from each checkpoint (re-saving it with the current source)."""
    from utils.checkpoint import strip_optimizer

    for w in weights if isinstance(weights, (list, tuple)) else [weights]:
        strip_optimizer(w)


@torch.no_grad()
def run(
    weights=ROOT / "yolov5s.pt",  # model path(s)
    source=ROOT / "data/images",  # file/dir/glob/.txt list
    data=ROOT / "data/synthetic.yaml",  # dataset YAML, only for class names when the checkpoint has none
    imgsz=(640, 640),  # inference size (height, width)
    conf_thres=0.25,  # confidence threshold
    iou_thres=0.45,  # NMS IoU threshold
    max_det=1000,  # maximum detections per image
    device="",  # cuda device, i.e. 0 or 0,1,2,3 or cpu
    view_img=False,  # show results
    save_txt=False,  # save results to *.txt
    save_conf=False,  # save confidences in --save-txt labels
    save_crop=False,  # save cropped prediction boxes
    nosave=False,  # do not save images/videos
    classes=None,  # filter by class: --classes 0, or --classes 0 2 3
    agnostic_nms=False,  # class-agnostic NMS
    augment=False,  # augmented inference
    visualize=False,  # visualize features
    update=False,  # strip optimizers from the weights
    project=ROOT / "runs/detect",  # save results to project/name
    name="exp",  # save results to project/name
    exist_ok=False,  # existing project/name ok, do not increment
    line_thickness=3,  # bounding box thickness (pixels)
    hide_labels=False,  # hide labels
    hide_conf=False,  # hide confidences
    half=False,  # use FP16 half-precision inference (CUDA only)
    dnn=False,  # OpenCV DNN for ONNX: accepted for CLI compatibility, ONNX files run with onnxruntime
    vid_stride=1,  # video frame-rate stride
) -> Path:
    """Detect objects in every image / video frame of source; returns the results folder (runs/detect/exp*)."""
    from utils.dataloaders import LoadImages
    from utils.torch_utils import select_device

    source = str(source)
    if source.isnumeric() or source.lower().startswith(("rtsp://", "rtmp://", "http://", "https://", "screen")):
        raise UserError(f"--source {source}: webcams, streams, URLs and screenshots are not supported; "
                        "pass an image, video, directory, glob or .txt list of paths")  # fmt: skip
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    if not sizes or len(sizes) > 2:
        raise UserError(f"--imgsz {' '.join(map(str, sizes))}: give one size or height and width, each >= 1 pixel")
    if min(sizes) < 1:
        raise UserError(f"--imgsz {' '.join(map(str, sizes))}: must be >= 1 pixel (rounded up to the model stride)")
    check_range("--conf-thres", conf_thres, 0, 1)
    check_range("--iou-thres", iou_thres, 0, 1)
    if vid_stride < 1:
        raise UserError(f"--vid-stride {vid_stride}: must be >= 1 (1 reads every video frame, 2 every other)")
    if dnn:
        LOGGER.warning("WARNING: --dnn ignored: ONNX files run with onnxruntime, PyTorch weights with PyTorch")
    save_img = not nosave

    device = select_device(device)
    if half and device.type != "cuda":
        LOGGER.info("--half ignored: FP16 inference runs on CUDA only; this runs in FP32 on the CPU")
    half &= device.type == "cuda"  # FP16 only on CUDA
    model, names = _load_model(weights, device, data)
    if half:
        model.half()
    stride = int(torch.as_tensor(model.stride).max())
    imgsz = [imgsz, imgsz] if isinstance(imgsz, int) else list(imgsz)
    imgsz = check_img_size(imgsz * 2 if len(imgsz) == 1 else imgsz, s=stride)
    dynamic = getattr(model, "dynamic", True)  # False: an export traced at one input shape
    if not dynamic:
        if list(model.imgsz) != imgsz:
            LOGGER.info(f"Using {model.weights.name}'s fixed input size {list(model.imgsz)}, not --imgsz {imgsz}")
        imgsz = list(model.imgsz)

    try:  # a fixed-shape export gets every image letterboxed to exactly imgsz, others to the smallest stride multiple
        dataset = LoadImages(source, img_size=imgsz, stride=stride, auto=dynamic, vid_stride=vid_stride)
    except FileNotFoundError as e:
        raise UserError(f"--source {source}: {e}") from None
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)  # made only once the inputs are known good
    check_writable(save_dir, "--project")
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    view_img = view_img and _can_imshow()
    vid_path, vid_writer = [None], [None]

    if device.type == "cuda":  # warmup
        model(torch.zeros(1, 3, *imgsz, device=device, dtype=torch.half if half else torch.float))
    seen, windows = 0, []
    dt = (_Timer(device), _Timer(device), _Timer(device))
    for path, im, im0s, vid_cap, s in dataset:
        with dt[0]:
            im = torch.from_numpy(im).to(device)
            im = im.half() if half else im.float()
            im /= 255  # 0-255 -> 0.0-1.0
            if im.ndim == 3:
                im = im[None]
        with dt[1]:
            visualize_dir = increment_path(save_dir / Path(path).stem, mkdir=True) if visualize else False
            pred = model(im, augment=augment, visualize=visualize_dir)
        with dt[2]:
            pred = non_max_suppression(pred, conf_thres, iou_thres, classes, agnostic_nms, max_det=max_det)

        for det in pred:  # one image per batch here
            seen += 1
            p, im0, frame = Path(path), im0s.copy(), getattr(dataset, "frame", 0)
            save_path = str(save_dir / p.name)
            txt_path = str(save_dir / "labels" / p.stem) + ("" if dataset.mode == "image" else f"_{frame}")
            s += f"{im.shape[2]}x{im.shape[3]} "
            gn = torch.tensor(im0.shape)[[1, 0, 1, 0]]  # whwh normalization gain
            imc = im0.copy() if save_crop else im0
            annotator = Annotator(im0, line_width=line_thickness, example=str(names))
            if len(det):
                det[:, :4] = scale_boxes(im.shape[2:], det[:, :4], im0.shape).round()
                for c in det[:, 5].unique():
                    n = int((det[:, 5] == c).sum())
                    s += f"{n} {names[int(c)]}{'s' * (n > 1)}, "
                for *xyxy, conf, cls in reversed(det.float().cpu()):
                    c = int(cls)
                    if save_txt:
                        xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gn).view(-1).tolist()
                        line = (c, *xywh, float(conf)) if save_conf else (c, *xywh)
                        with open(f"{txt_path}.txt", "a") as f:
                            f.write(("%g " * len(line)).rstrip() % line + "\n")
                    if save_img or save_crop or view_img:
                        label = None if hide_labels else (names[c] if hide_conf else f"{names[c]} {conf:.2f}")
                        annotator.box_label(xyxy, label, color=colors(c, True))
                    if save_crop:
                        save_one_box(xyxy, imc, file=save_dir / "crops" / names[c] / f"{p.stem}.jpg", BGR=True)

            im0 = annotator.result()
            if view_img:
                if platform.system() == "Linux" and p not in windows:
                    windows.append(p)
                    cv2.namedWindow(str(p), cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO)
                    cv2.resizeWindow(str(p), im0.shape[1], im0.shape[0])
                cv2.imshow(str(p), im0)
                cv2.waitKey(1)

            if save_img:
                if dataset.mode == "image":
                    cv2.imwrite(save_path, im0)
                else:  # video: one writer per source video, always .mp4
                    if vid_path[0] != save_path:
                        vid_path[0] = save_path
                        if isinstance(vid_writer[0], cv2.VideoWriter):
                            vid_writer[0].release()
                        fps = vid_cap.get(cv2.CAP_PROP_FPS) if vid_cap else 30
                        fps = fps if fps and fps > 0 else 30
                        h, w = im0.shape[:2]
                        save_path = str(Path(save_path).with_suffix(".mp4"))
                        vid_writer[0] = cv2.VideoWriter(save_path, cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
                    vid_writer[0].write(im0)

        LOGGER.info(f"{s}{'' if len(det) else '(no detections), '}{dt[1].dt * 1e3:.1f}ms")

    for writer in vid_writer:
        if isinstance(writer, cv2.VideoWriter):
            writer.release()
    t = tuple(x.t / max(seen, 1) * 1e3 for x in dt)  # ms per image
    LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {(1, 3, *imgsz)}" % t)
    if save_txt or save_img:
        s = f"\n{len(list(save_dir.glob('labels/*.txt')))} labels saved to {save_dir / 'labels'}" if save_txt else ""
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}{s}")
    if update:
        _update_weights(weights)
    return save_dir


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", nargs="+", type=str, default=ROOT / "yolov5s.pt", help="*.pt, *.onnx, ... path")
    parser.add_argument("--source", type=str, default=ROOT / "data/images", help="file/dir/glob/.txt list")
    parser.add_argument("--data", type=str, default=ROOT / "data/synthetic.yaml", help="(optional) dataset.yaml path")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="inference size h,w")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--view-img", action="store_true", help="show results")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--save-crop", action="store_true", help="save cropped prediction boxes")
    parser.add_argument("--nosave", action="store_true", help="do not save images/videos")
    parser.add_argument("--classes", nargs="+", type=int, help="filter by class: --classes 0, or --classes 0 2 3")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--augment", action="store_true", help="augmented inference")
    parser.add_argument("--visualize", action="store_true", help="visualize features")
    parser.add_argument("--update", action="store_true", help="update all models")
    parser.add_argument("--project", default=ROOT / "runs/detect", help="save results to project/name")
    parser.add_argument("--name", default="exp", help="save results to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--line-thickness", default=3, type=int, help="bounding box thickness (pixels)")
    parser.add_argument("--hide-labels", default=False, action="store_true", help="hide labels")
    parser.add_argument("--hide-conf", default=False, action="store_true", help="hide confidences")
    parser.add_argument("--half", action="store_true", help="use FP16 half-precision inference")
    parser.add_argument("--dnn", action="store_true", help="use OpenCV DNN for ONNX inference")
    parser.add_argument("--vid-stride", type=int, default=1, help="video frame-rate stride")
    opt = parser.parse_args(argv)
    opt.imgsz = opt.imgsz * 2 if len(opt.imgsz) == 1 else opt.imgsz  # expand (run checks the count)
    print_args(vars(opt), "detect")
    return opt


def main(opt: argparse.Namespace) -> Path:
    return run(**vars(opt))


if __name__ == "__main__":
    try:
        main(parse_opt())
    except UserError as e:
        sys.exit(f"ERROR: {e}")  # one line on stderr, exit code 1, no traceback
