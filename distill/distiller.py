"""Distiller: all that FGFI adds to a YOLOv5 training run, as one object beside a plain student.

It owns the frozen teacher (outside the student: never in its EMA, optimizer or DDP wrapper), the adapters (trained
with the student, their own optimizer groups), the paired student/teacher layers and the imitation settings (region,
psi, weight, adapter kernel). A training loop uses it as

    distiller = Distiller(student, "teacher.pt", device, imitation_layers=[17, 20, 23], teacher_layers=[23, 26, 29])
    optimizer.param_groups += distiller.param_groups(weight_decay)       # (add_param_group, one by one)
    preds, imitation = distiller(student, imgs, targets)                  # student forward + teacher features
    loss, items = ComputeLoss(student, hyp, imitation_weight=distiller.imitation_weight)(preds, targets, **imitation)
    ckpt["distill"] = distiller.state_dict()                              # while training: --resume needs it

state_dict() is the one copy of the imitation settings a run keeps for --resume (train.py reads them back from the
checkpoint); a finished checkpoint drops it (utils/checkpoint.strip_optimizer), leaving a plain YOLOv5 checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from distill.loss import SPARSE_MAX_SHARE, FeatureAdapters, feature_channels, gather_cells, masked_cells
from distill.mask import REGIONS
from distill.teacher import load_teacher, match_layers, teacher_features
from utils.general import LOGGER, UserError, check_file, colorstr

LayerSpec = None | str | list[int]  # None: the default point, 'detect': Detect's inputs, or layer indices


def parse_imitation_layers(value: LayerSpec | tuple) -> tuple[LayerSpec, LayerSpec]:
    """--imitation-layers -> (student spec, teacher spec or None for 'the same').

    'default' (or None/''), 'detect', '17,20,23' (the same indices in both models) or '17,20,23:23,26,29' (the
    student's indices, then the teacher's, paired one by one). A list of ints is taken as the student's indices.
    """
    if isinstance(value, (list, tuple)):
        return [int(x) for x in value], None
    text = str(value if value is not None else "").replace(" ", "")
    student, _, teacher = text.partition(":")
    try:
        specs = [_spec(x) for x in (student, teacher)]
    except ValueError:
        raise UserError(
            f"--imitation-layers '{value}': use 'default', 'detect', layer indices like 17,20,23, or the student's "
            "then the teacher's indices like 17,20,23:23,26,29"
        ) from None
    return specs[0], specs[1] if ":" in text else None


def _spec(text: str) -> LayerSpec:
    if text in ("", "default"):
        return None
    if text == "detect":
        return "detect"
    return [int(x) for x in text.split(",") if x]


def format_layers(student: list[int], teacher: list[int]) -> str:
    """The --imitation-layers value that names exactly these pairs: '17,20,23:23,26,29'."""
    return f"{','.join(map(str, student))}:{','.join(map(str, teacher))}"


def check_settings(
    iou_factor: float, imitation_region: str, imitation_weight: float | None, adapter_kernel: int
) -> None:
    """One line naming the flag and its allowed range for a bad setting (None weight: not chosen yet)."""
    if not 0 <= iou_factor < 1:
        raise UserError(f"--iou-factor {iou_factor}: FGFI's psi must be in [0, 1) (the paper uses 0.5)")
    if imitation_region not in REGIONS:
        raise UserError(f"--imitation-region {imitation_region!r}: use one of {', '.join(REGIONS)}")
    if imitation_weight is not None and not imitation_weight >= 0:
        raise UserError(f"--imitation-weight {imitation_weight}: must be >= 0 (0.01 in the paper)")
    if adapter_kernel < 1 or adapter_kernel % 2 == 0:
        raise UserError(f"--adapter-kernel {adapter_kernel}: use an odd size >= 1 (3 as in the paper, or 1)")


class Distiller:
    """FGFI distillation of a YOLOv5 student from a frozen teacher; see the module docstring.

    Args:
        student: the student DetectionModel (read only: its imitated layers and channels).
        teacher: teacher checkpoint path (--ft_weights); kept as an absolute path.
        device: where the teacher and the adapters live (the student's device).
        imitation_layers: the student's layers (LayerSpec); teacher_layers: the teacher's, paired one by one
            (None: the same spec resolved on the teacher).
        iou_factor: FGFI's psi in [0, 1); imitation_region: 'fgfi', 'gtbox' or 'full'.
        imitation_weight: gain of the imitation loss (>= 0); adapter_kernel: odd adapter conv size.
        channels_last: teacher and adapters in channels_last memory format (--channels-last; the student is too).
        sparse_max_share: run the adapters on the masked cells alone when a level's masked share is below this
            (distill.loss.SPARSE_MAX_SHARE, measured), the dense conv otherwise; 0 always dense, > 1 always sparse.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: str | Path,
        device: torch.device | str,
        imitation_layers: LayerSpec = None,
        teacher_layers: LayerSpec = None,
        iou_factor: float = 0.5,
        imitation_region: str = "fgfi",
        imitation_weight: float = 0.01,
        adapter_kernel: int = 3,
        channels_last: bool = False,
        sparse_max_share: float = SPARSE_MAX_SHARE,
    ):
        check_settings(iou_factor, imitation_region, imitation_weight, adapter_kernel)
        self.iou_factor, self.imitation_region = float(iou_factor), str(imitation_region)
        self.imitation_weight, self.adapter_kernel = float(imitation_weight), int(adapter_kernel)
        self.teacher_path = str(Path(check_file(teacher, "--ft_weights")).resolve())
        student = getattr(student, "module", student)
        self.teacher = load_teacher(self.teacher_path, student, device, imitation_layers, teacher_layers=teacher_layers)
        self.student_layers, self.teacher_layers = match_layers(
            self.teacher, student, imitation_layers, teacher_layers, self.teacher_path
        )
        # the image grid both models need: a P6 teacher beside a P5 student needs multiples of 64
        self.stride = max(int(student.stride.max()), int(self.teacher.stride.max()), 32)
        s_channels = feature_channels(student, self.student_layers, 2 * self.stride)
        t_channels = feature_channels(self.teacher, self.teacher_layers, 2 * self.stride)
        self.adapters = FeatureAdapters(s_channels, t_channels, self.adapter_kernel).to(device)
        if channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.adapters.to(memory_format=torch.channels_last)
        self.sparse_max_share = float(sparse_max_share)
        pairs = ", ".join(
            f"{s} ({cs} ch) -> {t} ({ct} ch)"
            for s, t, cs, ct in zip(self.student_layers, self.teacher_layers, s_channels, t_channels)
        )
        LOGGER.info(
            f"{colorstr('FGFI: ')}teacher {self.teacher_path}, student -> teacher layers {pairs}, "
            f"weight {self.imitation_weight}, region {self.imitation_region}, iou_factor {self.iou_factor}"
        )

    def __call__(self, student: nn.Module, imgs: torch.Tensor, targets: torch.Tensor) -> tuple[list, dict]:
        """Student forward with imitation: (preds, {'student', 'teacher', 'mask'}: lists, one entry per pair).

        imgs: [B, 3, H, W] in 0..1; targets: [n, 6] (image, class, x, y, w, h), xywh normalized. The dict holds, per
        pair, the adapted student feature and the teacher's (no grad), either as maps [B, C_t, h, w] (dense path) or
        at the N masked cells only, [N, C_t] each (sparse path, where the masked share is below sparse_max_share),
        and the mask [B, 1, h, w]; as ComputeLoss takes them (loss(preds, targets, **imitation)).
        """
        # Teacher first: its intermediate maps are freed before the student's forward keeps its own for backward,
        # which lowers peak memory (on CPU: 730 vs 753 ms a step and no page faults vs 6,400; benchmarks/RESULTS.md).
        teacher = teacher_features(self.teacher, imgs, self.teacher_layers, float32=False)  # fp16 on CUDA
        preds, features, masks = student(
            imgs, target=targets, imitation_layers=self.student_layers, iou_factor=self.iou_factor,
            region=self.imitation_region,
        )  # fmt: skip
        cells = masked_cells(masks, self.sparse_max_share)  # after both forwards are queued: the step's one sync
        # float32 after the gather: only the masked cells' copy, not the whole map (imitation_loss casts the rest)
        teacher = [t if c is None else gather_cells(t, c).float() for t, c in zip(teacher, cells)]
        return preds, {"student": self.adapters(features, cells), "teacher": teacher, "mask": masks}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups for the adapters, as YOLOv5 groups the student's: weights decayed, biases not."""
        weights = [p for name, p in self.adapters.named_parameters() if not name.endswith("bias")]
        biases = [p for name, p in self.adapters.named_parameters() if name.endswith("bias")]
        return [{"params": weights, "weight_decay": weight_decay}, {"params": biases, "weight_decay": 0.0}]

    def parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def train(self, mode: bool = True) -> Distiller:
        """Adapters to train/eval mode; the teacher always stays in eval mode."""
        self.adapters.train(mode)
        return self

    def wrap(self, ddp: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the adapters for DDP (the teacher is replicated per rank, never wrapped)."""
        self.adapters = ddp(self.adapters)

    @property
    def settings(self) -> dict:
        """The imitation settings, under the names of train.py's flags (ft_weights: 'teacher')."""
        return {
            "teacher": self.teacher_path,
            "imitation_layers": list(self.student_layers),
            "teacher_layers": list(self.teacher_layers),
            "iou_factor": self.iou_factor,
            "imitation_region": self.imitation_region,
            "imitation_weight": self.imitation_weight,
            "adapter_kernel": self.adapter_kernel,
        }

    def state_dict(self) -> dict:
        """What a run needs beside the student to resume: the settings and a copy of the adapter weights."""
        adapters = getattr(self.adapters, "module", self.adapters)  # DDP -> the module
        return {**self.settings, "adapters": {k: v.detach().clone() for k, v in adapters.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the adapters of a resumed run; a teacher of another width is one clear UserError."""
        adapters = getattr(self.adapters, "module", self.adapters)
        own = adapters.state_dict()
        for k, v in state["adapters"].items():
            if k not in own or own[k].shape != v.shape:
                shape = tuple(own[k].shape) if k in own else "none"
                raise UserError(
                    f"--ft_weights {self.teacher_path}: its adapter {k} would be {shape} but the run's is "
                    f"{tuple(v.shape)} (a teacher of another width?): resume with the run's teacher {state['teacher']}"
                )
        adapters.load_state_dict(state["adapters"])

    @staticmethod
    def options_from_state(state: dict) -> dict:
        """train.py options that rebuild this distillation on --resume (older checkpoints: only what they hold)."""
        opts = {
            k: state[k] for k in ("iou_factor", "imitation_region", "imitation_weight", "adapter_kernel") if k in state
        }
        opts["ft_weights"] = state["teacher"]
        if "teacher_layers" in state:  # both lists: exactly the pairs the run trained with
            opts["imitation_layers"] = format_layers(state["imitation_layers"], state["teacher_layers"])
        return opts
