"""Distiller: all that distillation adds to a YOLOv5 training run, as one object beside a plain student.

It owns the frozen teacher (outside the student: never in its EMA, optimizer or DDP wrapper), the adapters (trained
with the student, their own optimizer groups), the paired student/teacher layers, the weights of the distillation
terms (distill/terms.py: FGFI imitation, output distillation) and their settings (region, psi, adapter kernel,
temperature, ...). A training loop uses it as

    distiller = Distiller(student, "teacher.pt", device, imitation_layers=[17, 20, 23], weights={"kd": 1.0})
    optimizer.param_groups += distiller.param_groups(weight_decay)       # (add_param_group, one by one)
    preds, inputs = distiller(student, imgs, targets)                     # student forward + what the terms read
    loss, items = ComputeLoss(student, hyp, terms=distiller.loss_terms)(preds, targets, **inputs)
    ckpt["distill"] = distiller.state_dict()                              # while training: --resume needs it

A term is on when its weight is > 0 (with every weight 0, FGFI imitation stays on at weight 0: a control run).
The teacher runs only as far as the terms need: up to the imitated layers for FGFI alone, its whole forward (head
outputs) when an output term is on.

state_dict() is the one copy of the imitation settings a run keeps for --resume (train.py reads them back from the
checkpoint); a finished checkpoint drops it (utils/checkpoint.strip_optimizer), leaving a plain YOLOv5 checkpoint.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from distill.fast import use_fast_kernels
from distill.loss import FeatureAdapters, feature_channels
from distill.mask import BOXES, REGIONS
from distill.pseudo import pseudo_targets
from distill.sparse import default_max_share, gather_cells, masked_cells
from distill.teacher import check_heads, load_teacher, match_layers, teacher_features, teacher_outputs
from distill.terms import (
    DEFAULT_REDUCTION,
    FEATURE_INPUTS,
    LOSS_INPUTS,
    OUTPUT_INPUTS,
    REDUCTIONS,
    TERMS,
    check_weight,
    level_weights,
    term_settings,
)
from utils.general import LOGGER, UserError, check_file, check_range, colorstr
from utils.torch_utils import cpu_has_bf16_matmul, to_channels_last

LayerSpec = Union[str, list[int], None]  # None: the default point, 'detect': Detect's inputs, or layer indices
PRECISIONS = ("auto", "fp32", "bf16")  # --distill-precision: the teacher's and the adapters' on CPU
# What a run saved before an option existed trained with (--resume of an older checkpoint, an older opt.yaml)
LEGACY_OPTIONS = {
    "imitation_region": "fgfi",
    "adapter_kernel": 3,
    "imitation_reduce": "sum",  # the imitated layers' terms were summed
    "imitation_boxes": "all",  # every level was masked with every box
    "distill_precision": "fp32",  # teacher and adapters ran in float32
    "adapter_warmup": 0.0,  # the adapters trained with the student from the first step
    "distill_balance": False,  # the output terms' gradient was not held to the detection loss's
    "distill_gate": False,  # the terms were not scaled by how much better the teacher fits each batch
    "distill_decouple": False,  # the terms' gradient was added to the detection loss's (one optimizer step)
    "distill_cap": 0.0,  # the terms' decoupled step was not capped
}


def parse_imitation_layers(value: LayerSpec | tuple) -> tuple[LayerSpec, LayerSpec]:
    """--imitation-layers -> (student spec, teacher spec or None for 'the same').

    'default' (or None/''), 'detect', 'neck', '17,20,23' (the same indices in both models) or '17,20,23:23,26,29' (the
    student's indices, then the teacher's, paired one by one). A list of ints is taken as the student's indices.
    """
    if isinstance(value, (list, tuple)):
        return [int(x) for x in value], None
    text = str(value if value is not None else "").replace(" ", "")
    student, _, teacher = text.partition(":")
    try:
        if ":" in text and not (student and teacher):  # '17:' or ':' would silently pair nothing or the default
            raise ValueError
        specs = [_spec(x) for x in (student, teacher)]
    except ValueError:
        raise UserError(
            f"--imitation-layers '{value}': use 'default', 'neck', 'detect', layer indices like 17,20,23, or the "
            "student's then the teacher's indices like 17,20,23:23,26,29"
        ) from None
    return specs[0], specs[1] if ":" in text else None


def _spec(text: str) -> LayerSpec:
    if text in ("", "default"):
        return None
    if text in ("detect", "neck"):
        return text
    layers = [int(x) for x in text.split(",") if x]
    if not layers or len(set(layers)) != len(layers):  # ',' names nothing; '16,16' would train two equal adapters
        raise ValueError(text)
    return layers


def format_layers(student: list[int], teacher: list[int]) -> str:
    """The --imitation-layers value that names exactly these pairs: '17,20,23:23,26,29'."""
    return f"{','.join(map(str, student))}:{','.join(map(str, teacher))}"


def check_settings(
    iou_factor: float,
    imitation_region: str,
    imitation_weight: float | None,
    adapter_kernel: int,
    weights: dict[str, float | None] | None = None,
    settings: dict[str, float | None] | None = None,
    imitation_reduce: str | None = None,
    imitation_boxes: str | None = None,
    precision: str | None = None,
) -> None:
    """One line naming the flag and its allowed range for a bad setting (None: not chosen yet)."""
    if not 0 <= iou_factor < 1:
        raise UserError(f"--iou-factor {iou_factor}: FGFI's psi must be in [0, 1) (the paper uses 0.5)")
    if imitation_region not in REGIONS:
        raise UserError(f"--imitation-region {imitation_region!r}: use one of {', '.join(REGIONS)}")
    if imitation_weight is not None and not (math.isfinite(imitation_weight) and imitation_weight >= 0):
        raise UserError(f"--imitation-weight {imitation_weight}: must be >= 0 and finite (0.01 in the paper)")
    for name, weight in (weights or {}).items():
        check_weight(name, weight)
    known = term_settings()
    for name, value in (settings or {}).items():
        if name not in known:
            raise ValueError(f"unknown term setting {name!r}; the terms' settings are {list(known)}")
        s = known[name]
        if value is not None and not (math.isfinite(value) and s.low <= value <= s.high):
            raise UserError(f"--{name.replace('_', '-')} {value}: must be in [{s.low:g}, {s.high:g}]")
    if imitation_reduce is not None and imitation_reduce not in REDUCTIONS:
        raise UserError(f"--imitation-reduce {imitation_reduce!r}: use one of {', '.join(REDUCTIONS)}")
    if imitation_boxes is not None and imitation_boxes not in BOXES:
        raise UserError(f"--imitation-boxes {imitation_boxes!r}: use one of {', '.join(BOXES)}")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--distill-precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if adapter_kernel < 1 or adapter_kernel % 2 == 0:
        raise UserError(f"--adapter-kernel {adapter_kernel}: use an odd size >= 1 (3 as in the paper, or 1)")


def _all_settings() -> dict:
    return term_settings()


def resolve_cpu_bf16(precision: str, device: torch.device | str) -> bool:
    """--distill-precision resolved: whether the teacher and the adapters' products run in bf16 (on CPU only: 'bf16',
    or 'auto' where the CPU has AMX, utils.torch_utils.cpu_has_bf16_matmul)."""
    if torch.device(device).type != "cpu":
        return False
    return precision == "bf16" or (precision == "auto" and cpu_has_bf16_matmul())


class Distiller:
    """Distillation of a YOLOv5 student from a frozen teacher; see the module docstring.

    Args:
        student: the student DetectionModel (read only: its imitated layers and channels).
        teacher: teacher checkpoint path (--ft_weights); kept as an absolute path.
        device: where the teacher and the adapters live (the student's device).
        imitation_layers: the student's layers (LayerSpec); teacher_layers: the teacher's, paired one by one
            (None: the same spec resolved on the teacher).
        iou_factor: FGFI's psi in [0, 1); imitation_region: 'fgfi', 'gtbox' or 'full'.
        imitation_weight: gain of the imitation loss (>= 0); adapter_kernel: odd adapter conv size.
        channels_last: teacher and adapters in channels_last memory format (--channels-last; the student is too).
        sparse_max_share: run the adapters on the masked cells alone when a level's masked share is below this, the
            dense conv otherwise; 0 always dense, > 1 always sparse. None: distill.sparse.default_max_share, i.e.
            SPARSE_MAX_SHARE (measured) on CPU (SPARSE_MAX_SHARE_BF16 in bf16), the dense conv on CUDA (not measured
            there).
        weights: the other terms' weights, {name: weight} (distill.terms.TERMS, e.g. {"kd": 1.0, "box_kd": 0.05});
            missing ones are 0 (off).
        balance: hold the output terms' gradient at the head outputs, batch by batch, at most as large as the
            detection loss's (ComputeLoss(balanced=...); --distill-balance).
        decouple: read by train.py: under Adam/AdamW the terms' gradient is stepped with its own moments
            (distill/optim.py; --distill-decouple); None: wherever it can run (Adam/AdamW, one process), False:
            never. Kept here so that --resume restores it.
        term_settings: the terms' own settings by name (distill.terms.Setting: kd_temperature, ...); missing ones
            take their defaults. kd_temperature: the same as term_settings={"kd_temperature": ...}.
        imitation_reduce: how several imitated layers' terms combine (distill.terms.level_weights): 'sum', 'mean' or
            'channel'; a single layer is the same under all three.
        imitation_boxes: which boxes make each level's mask: 'all' (the paper: every box on every level),
            'matched' (the boxes YOLOv5's loss assigns to that level's anchors, hyp anchor_t: distill.mask.matched_boxes)
            or 'auto': matched with several imitated layers, all with one (the paper's loss for the default layer).
        anchor_t: the anchor-ratio limit of 'matched' (hyp 'anchor_t', 4.0).
        precision: on CPU, what the teacher's forward and the adapters' products run in: 'bf16' (bfloat16, gradients
            summed in float32, as AMP does on CUDA), 'fp32', or 'auto' (bf16 where the CPU multiplies bfloat16 in
            hardware, AMX: utils.torch_utils.cpu_has_bf16_matmul; fp32 elsewhere). The student trains in float32
            either way. On CUDA it is not read: the teacher runs in fp16 and the adapters under the run's AMP.
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
        sparse_max_share: float | None = None,
        weights: dict[str, float] | None = None,
        kd_temperature: float | None = None,
        imitation_reduce: str = DEFAULT_REDUCTION,
        imitation_boxes: str = "auto",
        anchor_t: float = 4.0,
        precision: str = "auto",
        explicit: Collection[str] | None = None,
        adapter_warmup: float = 0.0,
        term_settings: dict[str, float] | None = None,
        balance: bool = True,
        pseudo_conf: float = 0.5,
        gate: bool | None = False,
        decouple: bool | None = None,
    ):
        weights = {name: float((weights or {}).get(name, 0.0)) for name in TERMS if name != "imitation"}
        # terms the user asked for by flag: refused with one line where the teacher cannot serve them; the others
        # (defaults, hyp file) are dropped with one line instead (None: every term counts as asked for)
        self.explicit = set(TERMS) if explicit is None else set(explicit)
        check_range("--adapter-warmup", adapter_warmup, 0, hint="epochs; 0 = from the first step")
        self.adapter_warmup = float(adapter_warmup)
        self.balance = bool(balance)
        self.decouple = None if decouple is None else bool(decouple)  # train.py's (distill/optim.py)
        check_range("--pseudo-conf", pseudo_conf, 0, 1, hint="1 = FGFI on labelled images only")
        self.pseudo_conf = float(pseudo_conf)
        given = dict(term_settings or {})
        if kd_temperature is not None:
            given["kd_temperature"] = kd_temperature
        check_settings(
            iou_factor, imitation_region, imitation_weight, adapter_kernel, weights, given, imitation_reduce,
            imitation_boxes, precision,
        )  # fmt: skip
        # every term's settings, by name: the given ones, the others at their defaults
        self.term_settings = {name: float(given.get(name, s.default)) for name, s in _all_settings().items()}
        self.iou_factor, self.imitation_region = float(iou_factor), str(imitation_region)
        self.imitation_weight, self.adapter_kernel = float(imitation_weight), int(adapter_kernel)
        self.weights = {"imitation": self.imitation_weight, **weights}
        # the terms switched on; with every weight 0, imitation at weight 0 (a control run, as before output terms)
        self.loss_weights = {k: w for k, w in self.weights.items() if w > 0} or {"imitation": self.imitation_weight}
        self.imitate = any(TERMS[k].features for k in self.loss_weights)  # adapters and imitated features
        self.outputs = any(TERMS[k].outputs for k in self.loss_weights)  # the teacher's whole forward is needed
        self._check_inputs()
        self.imitation_reduce = str(imitation_reduce)
        self.imitation_boxes, self.anchor_t = str(imitation_boxes), float(anchor_t)
        self.teacher_path = str(Path(check_file(teacher, "--ft_weights")).resolve())
        # CPU: bf16 teacher and adapter products where asked for or, by default, where the CPU has AMX
        self.cpu_bf16 = resolve_cpu_bf16(precision, device)
        cpu = torch.device(device).type == "cpu"
        self.precision = ("bf16" if self.cpu_bf16 else "fp32") if cpu else str(precision)  # resolved: --resume
        self.precision_asked = str(precision)  # 'auto' is resolved again on --resume (another CPU may lack AMX)
        student = getattr(student, "module", student)
        self.teacher = load_teacher(
            self.teacher_path, student, device, imitation_layers, teacher_layers=teacher_layers,
            dtype=torch.bfloat16 if self.cpu_bf16 else None,
        )  # fmt: skip
        self.student_layers, self.teacher_layers = match_layers(
            self.teacher, student, imitation_layers, teacher_layers, self.teacher_path
        )
        several = len(self.student_layers) > 1
        self.matched = self.imitation_boxes == "matched" or (self.imitation_boxes == "auto" and several)
        # the output terms compare the heads anchor by anchor; objectness and class also need the same anchor sizes
        self.same_anchors = any(TERMS[k].same_anchors for k in self.loss_weights)
        # ComputeLoss(gated=...): every term scaled by how much better the teacher fits; None: wherever it can
        self.gate = gate is not False
        if self.outputs or self.gate:  # both read the teacher's head as the student's: one check serves both
            try:
                check_heads(self.teacher, student, self.teacher_path, same_anchors=False)
            except UserError as e:
                why = str(e).split(": ", 1)[-1].split(";")[0]
                if self.outputs:
                    if any(TERMS[k].outputs and k in self.explicit for k in self.loss_weights):
                        raise
                    self._drop([k for k in self.loss_weights if TERMS[k].outputs], why)
                if gate:  # asked for by name: say why it is off
                    LOGGER.info(f"{colorstr('Distillation: ')}--distill-gate off: {why}")
                self.gate = False
        # the image grid both models need: a P6 teacher beside a P5 student needs multiples of 64
        self.stride = max(int(student.stride.max()), int(self.teacher.stride.max()), 32)
        s_channels = feature_channels(student, self.student_layers, 2 * self.stride)
        t_channels = feature_channels(self.teacher, self.teacher_layers, 2 * self.stride)
        self.level_weights = level_weights(t_channels, self.imitation_reduce)
        # no adapters where nothing is imitated (output terms alone): no parameters, no optimizer groups
        self.adapters = FeatureAdapters(
            s_channels if self.imitate else [], t_channels if self.imitate else [], self.adapter_kernel
        ).to(device)
        if channels_last:
            to_channels_last(self.teacher)
            to_channels_last(self.adapters)
        if sparse_max_share is None:  # the sparse adapter is a fast kernel: distill.fast switches it off (dense)
            sparse_max_share = default_max_share(device, self.cpu_bf16) if use_fast_kernels() else 0.0
        self.sparse_max_share = float(sparse_max_share)
        terms = ", ".join(f"{k} {w:g}" for k, w in self.loss_weights.items())
        text = f"{colorstr('Distillation: ')}teacher {self.teacher_path}, terms {terms}"
        if self.imitate:
            pairs = ", ".join(
                f"{s} ({cs} ch) -> {t} ({ct} ch)"
                for s, t, cs, ct in zip(self.student_layers, self.teacher_layers, s_channels, t_channels)
            )
            text += f"; student -> teacher layers {pairs}, region {self.imitation_region}, iou_factor {self.iou_factor}"
            text += f", levels combined by {self.imitation_reduce}" if several else ""
            if several or self.matched:
                text += f", {'matched' if self.matched else 'all'} boxes (--imitation-boxes {self.imitation_boxes})"
        own = [s for k in self.loss_weights for s in TERMS[k].settings]
        if own:
            text += "; " + ", ".join(f"{s.name} {self.term_settings[s.name]:g}" for s in own)
        if self.outputs and self.balance:
            text += "; output terms' gradient held at most the detection loss's (--no-distill-balance: off)"
        if self.gate:
            text += "; terms scaled by how much better the teacher fits each batch (--distill-gate)"
        if self.imitate and self.adapter_warmup:
            text += f"; adapters warm up alone for {self.adapter_warmup:g} epochs (--adapter-warmup)"
        if self.cpu_bf16:
            text += "; teacher and adapters in bf16 (--distill-precision fp32: float32)"
        LOGGER.info(text)

    def _drop(self, names: list[str], why: str) -> None:
        """Switch off default-on terms this teacher cannot serve, with one line saying which and why."""
        for name in names:
            self.weights[name] = 0.0
            self.loss_weights.pop(name, None)
        self.loss_weights = self.loss_weights or {"imitation": self.imitation_weight}
        self.imitate = any(TERMS[k].features for k in self.loss_weights)
        self.outputs = any(TERMS[k].outputs for k in self.loss_weights)
        self.same_anchors = any(TERMS[k].same_anchors for k in self.loss_weights)
        terms = ", ".join(f"{k} {w:g}" for k, w in self.loss_weights.items())
        flags = " ".join(f"--{k.replace('_', '-')}-weight 0" for k in names)
        LOGGER.info(
            f"{colorstr('Distillation: ')}{', '.join(names)} off ({why}); terms on: {terms}. Silence this with {flags}"
        )

    def check_student(self, student: nn.Module, adopt_anchors: bool = False) -> None:
        """The objectness/class term compares scores anchor by anchor, so the student needs the teacher's anchor
        sizes: a student trained from scratch (adopt_anchors) takes them (its head is untrained, so nothing it learnt
        is lost; AutoAnchor must then leave them alone); a pretrained student with other anchors is one UserError
        naming both and the fix (distill.teacher.check_heads)."""
        student = getattr(student, "module", student)
        if not self.same_anchors:
            return
        t, s = self.teacher.model[-1], student.model[-1]
        if adopt_anchors and not torch.equal(t.anchors.float().cpu(), s.anchors.float().cpu()):
            s.anchors[:] = t.anchors.to(s.anchors)
            LOGGER.info(f"{colorstr('Distillation: ')}the student takes the teacher's anchors (--kd-weight)")
        try:
            check_heads(self.teacher, student, self.teacher_path, same_anchors=True)
        except UserError:
            if any(TERMS[k].same_anchors and k in self.explicit for k in self.loss_weights):
                raise
            # terms that compare scores anchor by anchor go; box_kd (decoded boxes, each with its own anchors) stays
            names = [k for k in self.loss_weights if TERMS[k].same_anchors]
            self._drop(names, "the pretrained student's anchors differ from the teacher's; box_kd compares boxes")

    @property
    def pseudo(self) -> bool:
        """FGFI runs on unlabelled images too, its mask made from the teacher's boxes above pseudo_conf (< 1)."""
        return self.imitate and self.pseudo_conf < 1

    @property
    def unlabeled_terms(self) -> list[str]:
        """The terms that also run on unlabelled images (ComputeLoss(unlabeled=...)): the output terms, and FGFI
        with pseudo-boxes."""
        return [k for k in self.loss_weights if TERMS[k].outputs or (TERMS[k].features and self.pseudo)]

    def __call__(
        self,
        student: nn.Module,
        imgs: torch.Tensor,
        targets: torch.Tensor | None,
        adapters_only: bool = False,
    ) -> tuple[list, dict]:
        """Student forward plus what the distillation terms read: (preds, inputs for ComputeLoss).

        imgs: [B, 3, H, W] in 0..1; targets: [n, 6] (image, class, x, y, w, h), xywh normalized. With imitation, the
        inputs hold 'student', 'teacher', 'mask' (lists, one entry per layer pair): the adapted student feature and
        the teacher's (no grad), either as maps [B, C_t, h, w] (dense path) or at the N masked cells only, [N, C_t]
        each (sparse path, where the masked share is below sparse_max_share), the mask [B, 1, h, w], and
        'level_weights' (the adapted feature in bf16 under precision bf16, as under CUDA AMP in fp16). With an output
        term, 'teacher_preds' (the teacher's raw head outputs, [B, na, h, w, 5 + nc] per level, no grad, in the
        teacher's dtype), 'teacher_anchors' and 'temperature'. ComputeLoss takes them as loss(preds, targets,
        **inputs).
        adapters_only: the imitation term trains the adapters alone (the student's features are detached before
        them): the adapter warm-up, so that a random adapter's gradient never reaches the student.
        targets None: unlabelled images. The teacher then runs its whole forward; FGFI's mask is made from its
        boxes above pseudo_conf (distill.pseudo.pseudo_targets, handed back as inputs['pseudo']), or, with
        pseudo_conf 1, FGFI does not run on them (only the output terms' inputs are returned).
        """
        unlabeled = targets is None
        imitate = self.pseudo if unlabeled else self.imitate
        # Teacher first: its intermediate maps are freed before the student's forward keeps its own for backward,
        # which lowers peak memory (on CPU: 730 vs 753 ms a step and no page faults vs 6,400; benchmarks/RESULTS.md).
        layers = self.teacher_layers if imitate else []
        if self.outputs or unlabeled or self.gate:
            teacher, teacher_preds = teacher_outputs(self.teacher, imgs, layers)
        else:
            teacher = teacher_features(self.teacher, imgs, layers, float32=False)  # fp16 on CUDA
        inputs = {}
        if imitate and unlabeled:
            targets = pseudo_targets(self.teacher.model[-1], teacher_preds, imgs.shape[2:], self.pseudo_conf)
            inputs["pseudo"] = targets
        if imitate:
            preds, features, masks = student(
                imgs, target=targets, imitation_layers=self.student_layers, iou_factor=self.iou_factor,
                region=self.imitation_region, anchor_t=self.anchor_t if self.matched else None,
            )  # fmt: skip
            cells = masked_cells(masks, self.sparse_max_share)  # after both forwards are queued: the step's one sync
            # float32 after the gather: only the masked cells' copy, not the whole map (imitation_loss casts the rest)
            teacher = [t if c is None else gather_cells(t, c).float() for t, c in zip(teacher, cells)]
            if adapters_only:
                features = [f.detach() for f in features] if isinstance(features, list) else features.detach()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16):
                adapted = self.adapters(features, cells)
            inputs.update(student=adapted, teacher=teacher, mask=masks, level_weights=self.level_weights)
        else:
            preds = student(imgs)
        if self.outputs or self.gate:
            inputs.update(teacher_preds=teacher_preds, teacher_anchors=self.teacher.model[-1].anchors)
        return preds, inputs

    def _provided_inputs(self) -> set[str]:
        """The input keys a term's loss can read in this run: ComputeLoss's and what __call__ hands over."""
        extra = ("pseudo",) if self.pseudo else ()
        return {
            *LOSS_INPUTS,
            *(FEATURE_INPUTS if self.imitate else ()),
            *(OUTPUT_INPUTS if self.outputs else ()),
            *extra,
        }

    def _check_inputs(self) -> None:
        """Every term switched on reads only inputs this run provides: a misspelt or unprovided input key is an error
        here, not a term that is silently 0."""
        provided = self._provided_inputs()
        for name in self.loss_weights:
            missing = [k for k in TERMS[name].inputs if k not in provided]
            if missing:
                raise ValueError(
                    f"distillation term {name!r} reads {missing}, which are not provided; the inputs are "
                    f"{sorted(provided)} (distill/terms.py: set outputs=True for the teacher's head, features=True "
                    "for the imitated features)"
                )

    @property
    def balanced_terms(self) -> list[str]:
        """The terms ComputeLoss balances against the detection loss (balance): the output terms switched on."""
        return [k for k in self.loss_weights if TERMS[k].outputs] if self.balance else []

    @property
    def loss_terms(self) -> dict[str, tuple[float, Callable[..., torch.Tensor]]]:
        """The terms switched on, for ComputeLoss(terms=...): {name: (weight, loss function)}, in the table's order."""
        terms = {}
        for name in (n for n in TERMS if n in self.loss_weights):
            term = TERMS[name]
            own = {s.arg: self.term_settings[s.name] for s in term.settings}
            terms[name] = (self.loss_weights[name], functools.partial(term.loss, **own) if own else term.loss)
        return terms

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups for the adapters, as YOLOv5 groups the student's: weights decayed, biases not and warmed
        up from warmup_bias_lr like the student's biases (none without imitation)."""
        if not self.imitate:
            return []
        weights = [p for name, p in self.adapters.named_parameters() if not name.endswith("bias")]
        biases = [p for name, p in self.adapters.named_parameters() if name.endswith("bias")]
        # "bias": train.py's warmup starts this group at warmup_bias_lr, as YOLOv5's own bias group (group 0)
        return [
            {"params": weights, "weight_decay": weight_decay},
            {"params": biases, "weight_decay": 0.0, "bias": True},
        ]

    def parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def train(self, mode: bool = True) -> Distiller:
        """Adapters to train/eval mode; the teacher always stays in eval mode."""
        self.adapters.train(mode)
        return self

    def wrap(self, ddp: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the adapters for DDP (the teacher is replicated per rank, never wrapped; no adapters, nothing)."""
        if self.imitate:
            self.adapters = ddp(self.adapters)

    @property
    def settings(self) -> dict:
        """The distillation settings, under the names of train.py's flags (ft_weights: 'teacher')."""
        return {
            "teacher": self.teacher_path,
            "imitation_layers": list(self.student_layers),
            "teacher_layers": list(self.teacher_layers),
            "iou_factor": self.iou_factor,
            "imitation_region": self.imitation_region,
            **{f"{name}_weight": w for name, w in self.weights.items()},
            **self.term_settings,
            "adapter_kernel": self.adapter_kernel,
            "imitation_reduce": self.imitation_reduce,
            "imitation_boxes": self.imitation_boxes,
            "distill_precision": self.precision,
            "distill_precision_asked": self.precision_asked,
            "adapter_warmup": self.adapter_warmup,
            "distill_balance": self.balance,
            "pseudo_conf": self.pseudo_conf,
            "distill_gate": self.gate,
            "distill_decouple": self.decouple,
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
        keys = ("iou_factor", "imitation_region", "adapter_kernel", "imitation_reduce", "imitation_boxes",
                "distill_precision", "adapter_warmup", "distill_balance", "pseudo_conf", "distill_gate", "distill_decouple",
                "distill_cap", *_all_settings())  # fmt: skip
        keys += tuple(f"{name}_weight" for name in TERMS)
        opts = {k: state[k] for k in keys if k in state}
        for k, v in LEGACY_OPTIONS.items():  # what runs from before each option trained with
            opts.setdefault(k, v)
        if state.get("distill_precision_asked") == "auto":  # resolved again for the machine that resumes
            opts["distill_precision"] = "auto"
        for name, term in TERMS.items():  # and had only the terms they name (output terms were off by default)
            opts.setdefault(f"{name}_weight", term.default if name == "imitation" else 0.0)
        opts["ft_weights"] = state["teacher"]
        if "teacher_layers" in state:  # both lists: exactly the pairs the run trained with
            opts["imitation_layers"] = format_layers(state["imitation_layers"], state["teacher_layers"])
        return opts
