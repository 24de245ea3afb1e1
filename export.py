"""Export a YOLOv5 checkpoint to TorchScript, ONNX or OpenVINO for deployment.

Format       | `--include`   | writes
---          | ---           | ---
PyTorch      | -             | best.pt (the input)
TorchScript  | `torchscript` | best.torchscript   (stride, names, input shape in the extra file config.txt)
ONNX         | `onnx`        | best.onnx          (stride, names in metadata_props)
OpenVINO     | `openvino`    | best_openvino_model/ (best.xml, best.bin, metadata.yaml; needs `pip install openvino`)

The exported graph is the inference model only: BatchNorms fused into the convs, Detect returning one tensor
[B, N, 5 + nc] (xywh in input pixels, objectness, class scores), no loss, no distillation adapters or teacher (a
distillation checkpoint keeps those beside the model and they are not read here).

Usage:
    python export.py --weights runs/train/exp/weights/best.pt --include torchscript onnx
    python export.py --weights best.pt --include onnx --dynamic --simplify      # any batch and image size

Inference (the same flags as with the .pt):
    python detect.py --weights best.onnx --source path/to/images
    python val.py --weights best.onnx --data synthetic.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import yaml

FILE = Path(__file__).resolve()
ROOT = FILE.parents[0]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # so `python path/to/export.py` finds models/ and utils/

from utils.general import (  # noqa: E402
    LOGGER,
    UserError,
    check_img_size,
    check_range,
    check_writable,
    colorstr,
    print_args,
)
from utils.torch_utils import select_device  # noqa: E402

FORMATS = {"torchscript": ".torchscript", "onnx": ".onnx", "openvino": "_openvino_model"}
ONNX_OPSETS = (7, 20)  # what torch.onnx.export's TorchScript exporter writes (torch.onnx._constants)
YOLOV5_ONLY_FORMATS = ("engine", "coreml", "saved_model", "pb", "tflite", "edgetpu", "tfjs", "paddle")


def check_include(include: str | list[str] | tuple[str, ...]) -> list[str]:
    """Lower-cased --include formats; UserError (one line) for a format this repository cannot write."""
    include = [include] if isinstance(include, str) else list(include)
    formats = [x.strip().lower() for x in include]
    supported = ", ".join(FORMATS)
    for x in formats:
        if x in YOLOV5_ONLY_FORMATS:
            raise UserError(f"--include {x}: this format is not supported here, use one of {supported}")
        if x not in FORMATS:
            raise UserError(f"--include {x}: unknown format, use one of {supported}")
    if not formats:
        raise UserError(f"--include is empty: give one or more of {supported}")
    return formats


def load_for_export(weights: str | Path, device: torch.device, inplace: bool, dynamic: bool) -> nn.Module:
    """The checkpoint's model (EMA if present) as a fused FP32 eval DetectionModel whose Detect is in export mode."""
    from models.yolo import Detect
    from utils.checkpoint import attempt_load

    if Path(weights).suffix != ".pt":
        raise UserError(f"--weights {weights}: export.py reads PyTorch *.pt checkpoints")
    model = attempt_load(weights, device=device, inplace=inplace, fuse=True)
    for m in model.modules():
        if isinstance(m, Detect):
            m.inplace = inplace
            m.dynamic = dynamic  # build the grids from the input shape inside the graph
            m.export = True  # forward returns (inference [B, N, 5 + nc],) only
    for p in model.parameters():
        p.requires_grad = False
    return model


def export_torchscript(model: nn.Module, im: torch.Tensor, file: Path, metadata: dict) -> Path:
    """Trace the model; stride, names, input shape and dynamic go in the extra file config.txt (as YOLOv5)."""
    f = file.with_suffix(".torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
        ts = torch.jit.trace(model, im, strict=False)
    config = {"shape": list(im.shape), **metadata}
    ts.save(str(f), _extra_files={"config.txt": json.dumps(config)})
    return f


def export_onnx(
    model: nn.Module, im: torch.Tensor, file: Path, opset: int, dynamic: bool, simplify: bool, metadata: dict
) -> Path:
    """torch.onnx (TorchScript-based exporter); input 'images', output 'output0'; metadata_props stride, names."""
    try:
        import onnx
    except ImportError:
        raise UserError("--include onnx needs the onnx package: pip install onnx") from None
    f = file.with_suffix(".onnx")
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the legacy-exporter deprecation notice
        torch.onnx.export(
            model,
            im,
            str(f),
            dynamo=False,  # the TorchScript-based exporter: no onnxscript needed, YOLOv5's graph layout
            opset_version=opset,
            do_constant_folding=True,
            input_names=["images"],
            output_names=["output0"],
            dynamic_axes=axes if dynamic else None,
        )
    model_onnx = onnx.load(str(f))
    onnx.checker.check_model(model_onnx)
    if simplify:
        model_onnx = _simplify_onnx(model_onnx)
    for k, v in metadata.items():
        if k in ("stride", "names"):  # YOLOv5's keys and formats: str(int), str(dict)
            entry = model_onnx.metadata_props.add()
            entry.key, entry.value = k, str(v)
    onnx.save(model_onnx, str(f))
    return f


def _simplify_onnx(model_onnx):
    """onnxslim, else onnx-simplifier, whichever is installed; the graph unchanged (with a warning) otherwise."""
    try:
        import onnxslim

        return onnxslim.slim(model_onnx)
    except ImportError:
        pass
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model_onnx)
        if ok:
            return simplified
        LOGGER.warning("WARNING: --simplify: onnx-simplifier could not check the simplified graph, kept the original")
    except ImportError:
        LOGGER.warning("WARNING: --simplify skipped: pip install onnxslim (or onnxsim)")
    return model_onnx


def export_openvino(onnx_file: Path, file: Path, half: bool, metadata: dict) -> Path:
    """OpenVINO IR from the ONNX file: folder <name>_openvino_model/ with <name>.xml, .bin and metadata.yaml."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError("--include openvino needs the openvino package: pip install openvino") from None
    folder = Path(f"{file.with_suffix('')}{FORMATS['openvino']}")
    folder.mkdir(parents=True, exist_ok=True)
    ov_model = ov.Core().read_model(str(onnx_file))
    ov.save_model(ov_model, str(folder / file.with_suffix(".xml").name), compress_to_fp16=half)
    meta = {"stride": metadata["stride"], "names": metadata["names"], "half": half}  # half: the backend's bf16/f32
    (folder / "metadata.yaml").write_text(yaml.safe_dump(meta))
    return folder


@torch.no_grad()
def run(
    weights=ROOT / "yolov5s.pt",  # model.pt path
    imgsz=(640, 640),  # image (height, width)
    batch_size: int = 1,
    device: str = "cpu",  # cuda device, i.e. 0 or 0,1,2,3 or cpu
    include=("torchscript",),  # formats: torchscript, onnx, openvino
    half: bool = False,  # FP16 export
    inplace: bool = False,  # Detect inplace flag (kept for YOLOv5 compatibility)
    dynamic: bool = False,  # dynamic batch, height and width
    simplify: bool = False,  # ONNX: simplify the graph (onnxslim or onnxsim)
    opset: int = 17,  # ONNX: opset version
) -> list[str]:
    """Export `weights` to each format in `include`; returns the written paths (files, or the OpenVINO folder)."""
    t = time.time()
    include = check_include(include)
    weights = weights[0] if isinstance(weights, (list, tuple)) and len(weights) == 1 else weights
    if isinstance(weights, (list, tuple)):
        raise UserError(f"--weights {weights}: give one checkpoint to export")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    if "onnx" in include:
        check_range(
            "--opset", opset, ONNX_OPSETS[0], ONNX_OPSETS[1], hint="ONNX opsets the exporter writes; 17 default"
        )
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    if not sizes or min(sizes) < 1:
        raise UserError(f"--imgsz {' '.join(map(str, sizes))}: must be >= 1 pixel (rounded up to the model stride)")
    file = Path(weights)
    check_writable(file.parent, "--weights")  # the exports are written beside the checkpoint
    device = select_device(device)
    model = load_for_export(file, device, inplace, dynamic)

    stride = max(int(model.stride.max()), 32)
    imgsz = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    imgsz = check_img_size(imgsz * 2 if len(imgsz) == 1 else imgsz, s=stride)  # rounded up, with a warning
    im = torch.zeros(batch_size, 3, *imgsz, device=device)
    if half:
        model.half()
        im = im.half()
    for _ in range(2):
        y = model(im)  # dry runs: grids built, shapes checked
    shape = tuple(y[0].shape)
    names = {int(k): str(v) for k, v in model.names.items()}
    metadata = {"stride": int(model.stride.max()), "names": names, "dynamic": dynamic}
    size = file.stat().st_size / 1e6
    LOGGER.info(f"\n{colorstr('PyTorch:')} starting from {file} with output shape {shape} ({size:.1f} MB)")

    written = []
    onnx_file = None
    for fmt in include:
        t0 = time.time()
        if fmt == "torchscript":
            f = export_torchscript(model, im, file, metadata)
        elif fmt == "onnx" or (fmt == "openvino" and onnx_file is None):
            f = onnx_file = export_onnx(model, im, file, opset, dynamic, simplify, metadata)
        if fmt == "openvino":
            f = export_openvino(onnx_file, file, half, metadata)
        written.append(str(f))
        LOGGER.info(
            f"{colorstr(fmt + ':')} export success, {time.time() - t0:.1f}s, saved as {f} ({_size_mb(f):.1f} MB)"
        )

    LOGGER.info(
        f"\nExport complete ({time.time() - t:.1f}s)\nResults saved to {colorstr('bold', file.parent.resolve())}"
        f"\nDetect:   python detect.py --weights {written[-1]}"
        f"\nValidate: python val.py --weights {written[-1]}"
    )
    return written


def _size_mb(path: str | Path) -> float:
    path = Path(path)
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


def parse_opt(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", nargs="+", type=str, default=ROOT / "yolov5s.pt", help="model.pt path")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640, 640], help="image (h, w)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size")
    parser.add_argument("--device", default="cpu", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--half", action="store_true", help="FP16 half-precision export")
    parser.add_argument("--inplace", action="store_true", help="set YOLOv5 Detect() inplace=True")
    parser.add_argument("--dynamic", action="store_true", help="ONNX/TorchScript: dynamic batch, height, width")
    parser.add_argument("--simplify", action="store_true", help="ONNX: simplify model (onnxslim or onnxsim)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX: opset version")
    parser.add_argument("--include", nargs="+", default=["torchscript"], help="torchscript, onnx, openvino")
    opt = parser.parse_args(args)
    opt.imgsz *= 2 if len(opt.imgsz) == 1 else 1
    print_args(vars(opt), FILE.stem)
    return opt


def main(opt: argparse.Namespace) -> list[str]:
    return run(**vars(opt))


if __name__ == "__main__":
    try:
        main(parse_opt())
    except UserError as e:
        sys.exit(f"ERROR: {e}")  # one line on stderr, exit code 1, no traceback
