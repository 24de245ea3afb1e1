"""One inference backend for val.py and detect.py: PyTorch checkpoints and the files export.py writes.

YOLOv5 calls this DetectMultiBackend. The runtime is picked by the weights' suffix:

    *.pt                 PyTorch, loaded by utils.checkpoint.attempt_load (allow-listed, never arbitrary pickles)
    *.torchscript        TorchScript (torch.jit.load), metadata in the extra file config.txt
    *.onnx               ONNX Runtime (CPU, or CUDA when onnxruntime-gpu is installed), metadata in metadata_props
    *_openvino_model/    OpenVINO IR folder (model .xml/.bin + metadata.yaml), if the openvino package is installed

Every backend takes images [B, 3, H, W] (RGB, 0..1) and returns inference output [B, N, 5 + nc] (xywh in input
pixels, objectness, class scores) on the input's device, ready for non_max_suppression. Exported files carry
their stride and class names, so nothing else is needed to run them.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import yaml

from utils.general import LOGGER, UserError

SUFFIXES = {".pt": "pt", ".torchscript": "jit", ".onnx": "onnx"}
DEFAULT_STRIDE = 32  # for an exported file without our metadata, as YOLOv5


def weights_format(weights: str | Path) -> str:
    """'pt', 'jit', 'onnx' or 'openvino' from a weights path; UserError (one line) for anything else."""
    w = Path(weights)
    if w.suffix in SUFFIXES:
        return SUFFIXES[w.suffix]
    if w.suffix == ".xml" or w.name.endswith("_openvino_model"):
        return "openvino"
    raise UserError(f"--weights {w}: unknown model format, use *.pt, *.torchscript, *.onnx or *_openvino_model/")


def parse_names(value) -> dict[int, str]:
    """Class names from metadata: a dict {index: name}, a list, or their str()/JSON text (read, never eval'd)."""
    if isinstance(value, (bytes, str)):
        text = value.decode() if isinstance(value, bytes) else value
        try:
            value = json.loads(text)
        except ValueError:
            value = ast.literal_eval(text)  # YOLOv5 writes str(dict); literal_eval only reads literals
    if isinstance(value, (list, tuple)):
        value = dict(enumerate(value))
    if not isinstance(value, dict):
        raise ValueError(f"class names must be a dict or a list, not {type(value).__name__}")
    return {int(k): str(v) for k, v in value.items()}


class DetectMultiBackend(nn.Module):
    """Run a detector from a .pt, .torchscript, .onnx or OpenVINO file.

    Attributes:
        format: 'pt', 'jit', 'onnx' or 'openvino'; pt, jit, onnx, xml: the same as booleans (YOLOv5's names).
        stride: int, the largest stride (images must be multiples of it).
        names: {class index: name}; nc: number of classes (None when unknown).
        dynamic: True if any batch size and image size (multiples of stride) run; False for a fixed-shape export.
        batch_size, imgsz: the fixed input batch and (h, w) of a fixed-shape export (None when dynamic).
        fp16: the exported model takes FP16 input (inputs are cast to it).
    """

    def __init__(
        self,
        weights: str | Path | list,
        device: torch.device | str = "cpu",
        load_pt: Callable | None = None,
    ):
        """load_pt(weights, device=...) loads *.pt checkpoints; default utils.checkpoint.attempt_load (fused)."""
        super().__init__()
        if isinstance(weights, (list, tuple)):
            if len(weights) != 1:
                raise UserError(f"--weights {weights}: model ensembles are not supported, give one file")
            weights = weights[0]
        self.weights = w = Path(str(weights))
        self.device = torch.device(device) if isinstance(device, str) else device
        self.format = weights_format(w)
        self.pt, self.jit, self.onnx, self.xml = (self.format == f for f in ("pt", "jit", "onnx", "openvino"))
        self.dynamic, self.batch_size, self.imgsz, self.fp16 = True, None, None, False
        self._warned_flags = False
        if self.pt:
            if load_pt is None:
                from utils.checkpoint import attempt_load as load_pt
            self.model = load_pt(weights, device=self.device)
            self.stride = int(torch.as_tensor(self.model.stride).max())
            self.names = parse_names(getattr(self.model, "names", None) or {})
            self.nc = _module_nc(self.model)
            return
        if not w.exists():
            raise UserError(f"--weights {w} not found: check the path")
        meta = {"jit": self._load_torchscript, "onnx": self._load_onnx, "openvino": self._load_openvino}[self.format]()
        self.stride, self.names = self._read_metadata(meta)
        if not self.dynamic:
            self.imgsz = tuple(self.imgsz)

    # --- loading ---------------------------------------------------------------------------------------------------

    def _load_torchscript(self) -> dict | None:
        extra = {"config.txt": ""}
        try:
            self.model = torch.jit.load(str(self.weights), _extra_files=extra, map_location=self.device).eval()
        except Exception as e:
            raise UserError(f"--weights {self.weights} is not a readable TorchScript file ({_first_line(e)})") from None
        meta = json.loads(extra["config.txt"]) if extra["config.txt"] else None
        self.fp16 = next(self.model.parameters()).dtype == torch.float16
        if meta and "shape" in meta:
            shape = [int(x) for x in meta["shape"]]
            self.dynamic = bool(meta.get("dynamic", False))  # YOLOv5's TorchScript files are traced at one shape
            self.batch_size, self.imgsz = (None, None) if self.dynamic else (shape[0], shape[2:])
        self.nc = int(meta["nc"]) if meta and "nc" in meta else None
        return meta

    def _load_onnx(self) -> dict | None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"--weights {self.weights} needs onnxruntime: pip install onnxruntime") from None
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as PyTorch
        try:
            self.session = ort.InferenceSession(str(self.weights), options, providers=providers)
        except Exception as e:
            raise UserError(f"--weights {self.weights} is not a readable ONNX model ({_first_line(e)})") from None
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self.fp16 = inp.type == "tensor(float16)"
        self._set_shape(inp.shape)
        self.nc = out.shape[-1] - 5 if isinstance(out.shape[-1], int) else None
        meta = self.session.get_modelmeta().custom_metadata_map
        return meta if "stride" in meta or "names" in meta else None

    def _load_openvino(self) -> dict | None:
        try:
            import openvino as ov
        except ImportError:
            raise UserError(f"--weights {self.weights} needs OpenVINO: pip install openvino") from None
        xml = self.weights if self.weights.suffix == ".xml" else next(iter(sorted(self.weights.glob("*.xml"))), None)
        if xml is None or not xml.with_suffix(".bin").is_file():
            raise UserError(f"--weights {self.weights}: no model .xml + .bin found in the OpenVINO folder")
        core = ov.Core()
        model = core.read_model(str(xml))
        shape = model.input(0).get_partial_shape()
        self._set_shape([d.get_length() if d.is_static else None for d in shape])
        self.fp16 = False  # OpenVINO IR compressed to FP16 still takes FP32 input
        meta_file = xml.parent / "metadata.yaml"
        meta = yaml.safe_load(meta_file.read_text()) if meta_file.is_file() else None
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
        if not (meta or {}).get("half"):  # else the CPU plugin may run in bf16 (its default where the CPU has it)
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self.compiled = core.compile_model(model, "CPU", config)
        out = model.output(0).get_partial_shape()
        self.nc = out[-1].get_length() - 5 if out[-1].is_static else None
        return meta

    def _set_shape(self, shape: list) -> None:
        """Input shape [B, 3, H, W] of an exported graph: ints where fixed, None or a name where dynamic."""
        fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
        self.dynamic = any(d is None for d in fixed)
        if not self.dynamic:
            self.batch_size, self.imgsz = fixed[0], fixed[2:]

    def _read_metadata(self, meta: dict | None) -> tuple[int, dict[int, str]]:
        """(stride, names) from the file's metadata; stride 32 and class ids as names (with a warning) without it."""
        try:
            if not meta:
                raise ValueError("none found")
            stride = int(meta["stride"])
            names = parse_names(meta["names"])
        except (KeyError, ValueError, TypeError, SyntaxError) as e:
            nc = self.nc or 0
            LOGGER.warning(
                f"WARNING: {self.weights} has no usable stride/names metadata ({_first_line(e)}): "
                f"assuming stride {DEFAULT_STRIDE} and class ids as names"
            )
            return DEFAULT_STRIDE, {i: str(i) for i in range(nc)}
        if self.nc is None:
            self.nc = len(names)
        return stride, names

    # --- inference -------------------------------------------------------------------------------------------------

    def forward(self, im: torch.Tensor, augment: bool = False, visualize=False):
        """im [B, 3, H, W] RGB 0..1 -> .pt: the DetectionModel's eval output; exported: [B, N, 5 + nc] tensor."""
        if self.pt:
            kwargs = {"augment": augment} if augment else {}
            if visualize:
                kwargs["visualize"] = visualize
            return self.model(im, **kwargs)
        if (augment or visualize) and not self._warned_flags:
            LOGGER.warning(f"WARNING: --augment/--visualize need *.pt weights, ignored for {self.weights.name}")
            self._warned_flags = True
        if not self.dynamic and tuple(im.shape[2:]) != self.imgsz:
            raise UserError(
                f"{self.weights.name} was exported for {self.imgsz[0]}x{self.imgsz[1]} images, got "
                f"{im.shape[2]}x{im.shape[3]}: use --imgsz {self.imgsz[0]} {self.imgsz[1]} or export with --dynamic"
            )
        n = im.shape[0]
        b = n if self.dynamic else self.batch_size
        chunks = []
        for i in range(0, n, b):  # a fixed batch size: run in chunks, padding the last one
            x = im[i : i + b]
            if x.shape[0] < b:
                x = torch.cat((x, x.new_zeros((b - x.shape[0], *x.shape[1:]))))
            chunks.append(self._run_exported(x))
        return torch.cat(chunks)[:n].to(im.device, im.dtype)

    def _run_exported(self, x: torch.Tensor) -> torch.Tensor:
        if self.jit:  # the parameters' dtype, which val.py's --half may have changed since loading
            y = self.model(x.to(next(self.model.parameters()).dtype))
            return y[0] if isinstance(y, (list, tuple)) else y
        x = x.detach().cpu().numpy().astype(np.float16 if self.fp16 else np.float32)
        if self.onnx:
            y = self.session.run([self.output_name], {self.input_name: x})[0]
        else:
            y = self.compiled(x)[self.compiled.output(0)]
        return torch.from_numpy(np.asarray(y, dtype=np.float32))


def _module_nc(model: nn.Module) -> int | None:
    if getattr(model, "nc", None) is not None:
        return int(model.nc)
    layers = getattr(model, "model", None)
    if isinstance(layers, nn.Sequential) and hasattr(layers[-1], "nc"):
        return int(layers[-1].nc)
    return None


def _first_line(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text[:120] if len(text) > 3 else type(e).__name__
