"""PyTorch helpers: device selection, BatchNorm fusing, model summaries, EMA, optimizers, DDP, early stopping."""

from __future__ import annotations

import ctypes
import math
import os
import platform
import time
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from utils.general import LOCAL_RANK, LOGGER, UserError, colorstr

try:
    import thop  # FLOPs counting
except ImportError:
    thop = None


def smart_inference_mode():
    """Decorator: run the function under torch.inference_mode()."""

    def decorate(fn):
        return torch.inference_mode()(fn)

    return decorate


@contextmanager
def torch_distributed_zero_first(local_rank: int):
    """Make every DDP process wait while the local master (rank 0 or -1) does something first, e.g. caching."""
    if local_rank not in {-1, 0}:
        dist.barrier(device_ids=[local_rank])
    yield
    if local_rank == 0:
        dist.barrier(device_ids=[0])


def select_device(device: str | int | torch.device = "", batch_size: int = 0) -> torch.device:
    """Resolve a device string ('', 'cpu', '0', '0,1', 'cuda:0') to a torch.device, logging what was chosen.

    '' means the first CUDA device when there is one, else the CPU. For explicit CUDA ids, CUDA_VISIBLE_DEVICES is
    set to them (as YOLOv5 does) when CUDA has not been initialised yet, so 'cuda:0' is the first listed GPU.
    batch_size must divide evenly over several GPUs.
    """
    s = f"YOLOv5 Python-{platform.python_version()} torch-{torch.__version__} "
    device = str(device).strip().lower().replace("cuda:", "").replace("none", "")
    cpu = device == "cpu"
    mps = device == "mps"
    indices = None  # CUDA indices to use, as torch sees them
    if device and not cpu and not mps:
        ids = [x.strip() for x in device.split(",") if x.strip()]
        if not ids or not all(x.isdigit() for x in ids):
            raise UserError(f"--device '{device}' is not valid: use 'cpu', a CUDA id like '0', or a list like '0,1'")
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} asks for CUDA, but no CUDA GPU is available: use --device cpu")
        if torch.cuda.is_initialized():  # too late to restrict visibility: address the devices by their ids
            if max(int(x) for x in ids) >= torch.cuda.device_count():
                raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
            indices = [int(x) for x in ids]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            if torch.cuda.device_count() < len(ids):
                raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if not cpu and not mps and torch.cuda.is_available():
        devices = device.split(",") if device else ["0"]
        indices = indices or list(range(len(devices)))
        n = len(devices)
        if n > 1 and batch_size > 0 and batch_size % n:
            raise UserError(f"--batch-size {batch_size} is not a multiple of the {n} GPUs in --device {device}")
        space = " " * (len(s) + 1)
        for i, d in enumerate(devices):
            p = torch.cuda.get_device_properties(indices[i])
            s += f"{'' if i == 0 else space}CUDA:{d} ({p.name}, {p.total_memory / (1 << 20):.0f}MiB)\n"
        arg = f"cuda:{indices[0]}"
    elif mps and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        s += "MPS\n"
        arg = "mps"
    else:
        s += "CPU\n"
        arg = "cpu"
    LOGGER.info(s.rstrip())
    return torch.device(arg)


def reuse_freed_memory() -> bool:
    """Keep memory freed by the process for reuse instead of handing it back to the OS (Linux with glibc; elsewhere a
    no-op). Returns whether it was applied.

    glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap, unmaps it on free, and trims
    the heap's free top, so a CPU training step that allocates the same large tensors every step faults their pages
    in again each time (the kernel zeroes each 4 KiB page): measured 88,000 page faults (344 MiB) per distillation
    step with the output terms on, 38,000 per teacher forward (benchmarks/RESULTS.md). M_MMAP_MAX = 0 serves large
    blocks from the heap too and M_TRIM_THRESHOLD at its maximum never trims it: the reuse that jemalloc or tcmalloc
    give through LD_PRELOAD (PyTorch's CPU performance guide), without the preload. Results are unchanged; the
    process keeps the memory of its peak step, which training reaches every step anyway.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def cpu_has_bf16_matmul() -> bool:
    """This CPU multiplies bfloat16 matrices in hardware (Intel AMX tiles), where oneDNN runs them many times faster
    than float32 (a [6769, 1152] x [1152, 256] product: 1.5 vs 13.5 ms on 2 Xeon cores; benchmarks/RESULTS.md). False
    on CPUs without AMX (there bfloat16 products are emulated, no faster than float32) and where torch cannot tell."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, torch >= 2.3
    try:
        return bool(check()) if check else False
    except (RuntimeError, AttributeError):
        return False


def time_sync() -> float:
    """time.time() after waiting for pending CUDA work, so timings are accurate."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def is_parallel(model: nn.Module) -> bool:
    return type(model) in (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)


def de_parallel(model: nn.Module) -> nn.Module:
    """The wrapped model of a DP/DDP wrapper, else the model itself."""
    return model.module if is_parallel(model) else model


def initialize_weights(model: nn.Module) -> None:
    """YOLOv5's init: default Conv2d init, BatchNorm eps=1e-3 and momentum=0.03, in-place activations."""
    for m in model.modules():
        t = type(m)
        if t is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif t in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            m.inplace = True


@torch.no_grad()
def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One Conv2d (with bias) equal to bn(conv(x)) in eval mode (https://tehnokv.com/posts/fusing-batchnorm-and-conv/)."""
    fused = (
        nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=True,
        )
        .requires_grad_(False)
        .to(conv.weight.device)
    )
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [out]
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    b_conv = torch.zeros(conv.out_channels, device=conv.weight.device) if conv.bias is None else conv.bias
    fused.bias.copy_(scale * (b_conv - bn.running_mean) + bn.bias)
    return fused


def model_info(model: nn.Module, verbose: bool = False, imgsz: int | list[int] = 640) -> None:
    """Log layers, parameters, gradients and (with thop installed) GFLOPs at imgsz; verbose adds a per-tensor table."""
    n_p = sum(x.numel() for x in model.parameters())
    n_g = sum(x.numel() for x in model.parameters() if x.requires_grad)
    if verbose:
        LOGGER.info(
            f"{'layer':>5} {'name':>40} {'gradient':>9} {'parameters':>12} {'shape':>20} {'mu':>10} {'sigma':>10}"
        )
        for i, (name, p) in enumerate(model.named_parameters()):
            name = name.replace("module_list.", "")
            sigma = p.std() if p.numel() > 1 else 0
            LOGGER.info(
                f"{i:5g} {name:>40s} {str(p.requires_grad):>9s} {p.numel():12g} {str(list(p.shape)):>20s} "
                f"{p.mean():10.3g} {sigma:10.3g}"
            )
    fs = ""
    if thop is not None:
        try:
            p = next(model.parameters())
            stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
            im = torch.empty((1, p.shape[1], stride, stride), device=p.device, dtype=p.dtype)
            flops = thop.profile(deepcopy(model), inputs=(im,), verbose=False)[0] / 1e9 * 2  # GFLOPs at stride px
            imgsz = imgsz if isinstance(imgsz, list) else [imgsz, imgsz]
            fs = f", {flops * imgsz[0] / stride * imgsz[1] / stride:.1f} GFLOPs"
        except Exception:  # thop cannot profile every module; the summary is still useful without FLOPs
            fs = ""
    yaml_file = getattr(model, "yaml_file", None)
    name = Path(yaml_file).stem.replace("yolov5", "YOLOv5") if yaml_file else "Model"
    LOGGER.info(f"{name} summary: {len(list(model.modules()))} layers, {n_p} parameters, {n_g} gradients{fs}")


def scale_img(img: torch.Tensor, ratio: float = 1.0, same_shape: bool = False, gs: int = 32) -> torch.Tensor:
    """Resize a [B, C, H, W] batch by ratio, then pad (value 0.447) up to a multiple of gs unless same_shape."""
    if ratio == 1.0:
        return img
    h, w = img.shape[2:]
    s = (int(h * ratio), int(w * ratio))
    img = F.interpolate(img, size=s, mode="bilinear", align_corners=False)
    if not same_shape:
        h, w = (math.ceil(x * ratio / gs) * gs for x in (h, w))
    return F.pad(img, [0, w - s[1], 0, h - s[0]], value=0.447)  # ImageNet mean


def copy_attr(a: object, b: object, include: tuple = (), exclude: tuple = ()) -> None:
    """Copy b's public attributes onto a (only those in include, when given), skipping exclude."""
    for k, v in b.__dict__.items():
        if (include and k not in include) or k.startswith("_") or k in exclude:
            continue
        setattr(a, k, v)


def smart_optimizer(
    model: nn.Module, name: str = "SGD", lr: float = 0.001, momentum: float = 0.9, decay: float = 1e-5
) -> torch.optim.Optimizer:
    """YOLOv5's optimizer with three parameter groups, in this order of ``optimizer.param_groups``:

    0: biases (no weight decay; train.py warms these up from warmup_bias_lr),
    1: other weights (weight_decay=decay), 2: normalization-layer weights (no decay).
    name: SGD (Nesterov), Adam, AdamW or RMSProp; momentum is Adam's beta1.
    """
    g = [], [], []  # decayed weights, normalization weights, biases
    norms = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)
    for module in model.modules():
        for p_name, p in module.named_parameters(recurse=False):
            if p_name == "bias":
                g[2].append(p)
            elif p_name == "weight" and isinstance(module, norms):
                g[1].append(p)
            else:
                g[0].append(p)

    if name == "Adam":
        optimizer = torch.optim.Adam(g[2], lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(g[2], lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == "RMSProp":
        optimizer = torch.optim.RMSprop(g[2], lr=lr, momentum=momentum)
    elif name == "SGD":
        optimizer = torch.optim.SGD(g[2], lr=lr, momentum=momentum, nesterov=True)
    else:
        raise UserError(f"--optimizer {name} is not available: use SGD, Adam, AdamW or RMSProp")

    optimizer.add_param_group({"params": g[0], "weight_decay": decay})
    optimizer.add_param_group({"params": g[1], "weight_decay": 0.0})
    LOGGER.info(
        f"{colorstr('optimizer:')} {type(optimizer).__name__}(lr={lr}) with parameter groups "
        f"{len(g[1])} weight(decay=0.0), {len(g[0])} weight(decay={decay}), {len(g[2])} bias"
    )
    return optimizer


def smart_DDP(model: nn.Module) -> DDP:
    """Wrap in DistributedDataParallel with a static graph, as YOLOv5 does on torch >= 1.11: on GPU LOCAL_RANK (NCCL),
    on CPU (gloo) the same wrapping without device ids, so that the CPU DDP tests run what CUDA runs."""
    cuda = next(model.parameters()).device.type == "cuda"
    ids = [LOCAL_RANK] if cuda else None
    return DDP(model, device_ids=ids, output_device=LOCAL_RANK if cuda else None, static_graph=True)


def smart_resume(ckpt: dict, optimizer, ema: ModelEMA | None = None, weights="yolov5s.pt", epochs=300, resume=True):
    """Restore optimizer/EMA state from a checkpoint dict; returns (best_fitness, start_epoch, epochs)."""
    best_fitness = 0.0
    start_epoch = ckpt["epoch"] + 1
    if ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        best_fitness = ckpt["best_fitness"]
    if ema is not None and ckpt.get("ema"):
        ema.ema.load_state_dict(ckpt["ema"].float().state_dict())
        ema.updates = ckpt["updates"]
    if resume and start_epoch <= 0:
        raise UserError(f"{weights} finished training to {epochs} epochs, nothing to resume: train without --resume")
    if epochs < start_epoch:
        LOGGER.info(f"{weights} has been trained for {ckpt['epoch']} epochs. Fine-tuning for {epochs} more epochs.")
        epochs += ckpt["epoch"]
    return best_fitness, start_epoch, epochs


class EarlyStopping:
    """Stop when fitness has not improved for ``patience`` epochs (0 or None = never)."""

    def __init__(self, patience: int = 30):
        self.best_fitness = 0.0
        self.best_epoch = 0
        self.patience = patience or float("inf")
        self.possible_stop = False  # True on the last epoch before a stop

    def __call__(self, epoch: int, fitness: float) -> bool:
        if fitness >= self.best_fitness:  # >= so that fitness 0 in the first epochs still counts as progress
            self.best_epoch = epoch
            self.best_fitness = fitness
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= (self.patience - 1)
        stop = delta >= self.patience
        if stop:
            LOGGER.info(
                f"Stopping training early as no improvement observed in last {self.patience} epochs. "
                f"Best results observed at epoch {self.best_epoch}, best model saved as best.pt.\n"
                f"To update EarlyStopping(patience={self.patience}) pass a new patience value, "
                f"i.e. `python train.py --patience 300` or use `--patience 0` to disable EarlyStopping."
            )
        return stop


class ModelEMA:
    """Exponential moving average of a model's state_dict (https://github.com/rwightman/pytorch-image-models).

    The decay ramps up as decay * (1 - exp(-updates / tau)) so early, noisy weights are forgotten quickly.
    ``ema`` is an FP32 eval-mode copy with gradients off.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay_max = decay
        self.tau = tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self, updates: int) -> float:
        return self.decay_max * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay(self.updates)
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:  # skips BatchNorm's num_batches_tracked
                v *= d
                v += (1 - d) * msd[k].detach()

    def update_attr(self, model: nn.Module, include: tuple = (), exclude: tuple = ("process_group", "reducer")) -> None:
        copy_attr(self.ema, model, include, exclude)


def clip_gradients(groups: list, max_norm: float = 10.0) -> None:
    """Clip each group of parameters' gradient norm at max_norm on its own (YOLOv5 clips the model's at 10): the
    student and the distillation adapters are separate groups, so an adapter's large gradient (a random one's at the
    start) never shrinks the student's step, which stays exactly YOLOv5's."""
    for params in groups:
        torch.nn.utils.clip_grad_norm_(list(params), max_norm=max_norm)


def to_channels_last(module: nn.Module) -> nn.Module:
    """Put every 4-D parameter and buffer (conv weights) of module in channels_last memory format, in place, and
    return module. Module.to(memory_format=...) refuses a module with other tensors of rank > 1, such as Detect's
    anchors [nl, na, 2]; those stay as they are."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module
