"""train.py's distillation flags: their checks, their values from the flag / hyp file / table defaults, the Distiller
they build, and what a checkpoint restores on --resume. The entry point reads argparse; this file turns the options
into plain values (utils/ never imports distill/: train.py passes these functions where they are needed)."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from distill.distiller import LEGACY_OPTIONS, Distiller, check_settings, parse_imitation_layers
from distill.optim import DEFAULT_CAP, DecoupledStep, decouple_refusal
from distill.terms import TERMS, term_settings, term_weights
from utils.general import LOGGER, UserError, check_range, colorstr

MAX_ADAPTER_KERNEL = 7  # an adapter conv of 9x9 and up costs many times the step for nothing the paper uses


def check_distill_options(opt: argparse.Namespace) -> None:
    """The distillation flags out of range: one line naming the flag (before any data or model is loaded); options of
    runs older than a flag get the value those runs trained with."""
    for k in ("imitation_region", "adapter_kernel", "imitation_boxes", "distill_precision"):
        setattr(opt, k, getattr(opt, k, LEGACY_OPTIONS[k]))
    opt.adapter_kernel = int(opt.adapter_kernel)
    check_range("--adapter-kernel", opt.adapter_kernel, 1, MAX_ADAPTER_KERNEL, hint="odd: 3 as in the paper, or 1")
    parse_imitation_layers(getattr(opt, "imitation_layers", None))
    weights = {name: getattr(opt, f"{name}_weight", None) for name in TERMS if name != "imitation"}
    if opt.ft_weights:
        settings = {name: getattr(opt, name, None) for name in term_settings()}
        check_settings(
            opt.iou_factor, opt.imitation_region, opt.imitation_weight, opt.adapter_kernel, weights, settings,
            opt.imitation_reduce, opt.imitation_boxes, opt.distill_precision,
        )  # fmt: skip
        warmup = getattr(opt, "adapter_warmup", None)
        if warmup is not None:
            check_range("--adapter-warmup", warmup, 0, hint="epochs; 0 = from the first step")
        check_range("--pseudo-conf", getattr(opt, "pseudo_conf", 0.5), 0, 1, hint="1 = FGFI on labelled images only")
        cap = getattr(opt, "distill_cap", LEGACY_OPTIONS["distill_cap"])
        opt.distill_cap = None if cap is None else float(cap)  # None: the default; runs saved with the flag a bool: 1/0
        if cap is not None:
            check_range("--distill-cap", opt.distill_cap, 0, hint="a multiple of the gate; 0 = no cap")
    elif getattr(opt, "unlabeled", ""):
        raise UserError(
            f"--unlabeled {opt.unlabeled}: images without labels are learnt from a teacher: add --ft_weights teacher.pt"
        )
    else:
        given = [f"--{name.replace('_', '-')}-weight" for name, w in weights.items() if w]
        if given:
            raise UserError(f"{', '.join(given)}: output distillation needs a teacher: add --ft_weights teacher.pt")


def resolve_distill_options(opt: argparse.Namespace, hyp: dict) -> list[str]:
    """Fill in the distillation options a command line left unset (None): each term's weight and each of its settings
    from its flag, else the hyp file's key, else the table's default; the adapter warm-up from the hyp file's
    warmup_epochs. Returns the terms the user set by flag (the others may fall back, Distiller's explicit)."""
    given = {name: getattr(opt, f"{name}_weight", None) for name in TERMS}
    for name, weight in term_weights(given, hyp).items():
        setattr(opt, f"{name}_weight", weight)
    for name, setting in term_settings().items():
        if getattr(opt, name, None) is None:
            setattr(opt, name, float(hyp.get(name, setting.default)))
    if getattr(opt, "adapter_warmup", None) is None:  # the adapters warm up alone over the lr warmup
        opt.adapter_warmup = float(hyp["warmup_epochs"])
    return [name for name, w in given.items() if w is not None]


def build_distiller(
    opt: argparse.Namespace,
    student: nn.Module,
    device: torch.device,
    hyp: dict,
    explicit: list[str],
    resume_state: dict | None = None,
) -> Distiller:
    """The Distiller of train.py's options (resolve_distill_options first); resume_state: the checkpoint's 'distill'
    state of a resumed run (its adapters are restored; a precision that 'auto' now resolves otherwise is one line)."""
    student_layers, teacher_layers = parse_imitation_layers(opt.imitation_layers)
    distiller = Distiller(
        student, opt.ft_weights, device, imitation_layers=student_layers, teacher_layers=teacher_layers,
        iou_factor=opt.iou_factor, imitation_region=opt.imitation_region, imitation_weight=opt.imitation_weight,
        adapter_kernel=opt.adapter_kernel, channels_last=opt.channels_last,
        weights={name: getattr(opt, f"{name}_weight") for name in TERMS},
        term_settings={name: getattr(opt, name) for name in term_settings()},
        imitation_reduce=opt.imitation_reduce, imitation_boxes=opt.imitation_boxes, anchor_t=hyp["anchor_t"],
        precision=opt.distill_precision, explicit=explicit, adapter_warmup=opt.adapter_warmup,
        balance=getattr(opt, "distill_balance", LEGACY_OPTIONS["distill_balance"]),
        pseudo_conf=getattr(opt, "pseudo_conf", 0.5),
        gate=getattr(opt, "distill_gate", LEGACY_OPTIONS["distill_gate"]),
        decouple=getattr(opt, "distill_decouple", LEGACY_OPTIONS["distill_decouple"]),
    )  # fmt: skip
    if resume_state:
        distiller.load_state_dict(resume_state)
        before = resume_state.get("distill_precision", "fp32")
        if before != distiller.precision:
            LOGGER.info(
                f"--resume: the run trained its teacher and adapters in {before}; --distill-precision auto gives "
                f"{distiller.precision} on this machine, so the resumed run is not bit-exact"
            )
    return distiller


def decoupled_step(
    distiller: Distiller | None,
    optimizer: torch.optim.Optimizer,
    ddp: bool,
    ckpt: dict | None = None,
    cap: float | None = None,
) -> DecoupledStep | None:
    """--distill-decouple: the terms' own optimizer step, or None: off (--no-distill-decouple), or where it cannot
    run (SGD, RMSProp, DDP: one line when the flag asked for it, silently by default); ckpt: a resumed run's
    checkpoint, whose terms' optimizer state it continues from; cap: --distill-cap's multiple of the gate, 0 off, None
    the default (DEFAULT_CAP; one line where a cap asked for by name cannot run)."""
    if distiller is None:
        return None
    why = "--no-distill-decouple" if distiller.decouple is False else decouple_refusal(optimizer, ddp)
    if why:
        if distiller.decouple:  # asked for by name: say why it is off
            LOGGER.info(f"{colorstr('Distillation: ')}--distill-decouple off: {why}")
        if cap:
            LOGGER.info(f"{colorstr('Distillation: ')}--distill-cap off: it caps the decoupled step, which is off")
        return None
    cap = DEFAULT_CAP if cap is None else cap
    decoupled = DecoupledStep(optimizer, cap=cap)
    state = (ckpt or {}).get("distill") or {}
    if state.get("decoupled") is not None:
        decoupled.load_state_dict(state["decoupled"])
    times = "the gate's share" if cap == 1 else f"{cap:g} x the gate's share"
    capped = f", each tensor's step at most {times} of the detection loss's (--distill-cap)" if cap else ""
    LOGGER.info(
        f"{colorstr('Distillation: ')}the terms' gradient is stepped with its own Adam moments (--distill-decouple)"
        f"{capped}"
    )
    return decoupled


def distill_state(distiller: Distiller | None, decoupled: DecoupledStep | None) -> dict | None:
    """The checkpoint's 'distill' entry: the Distiller's state, the terms' optimizer state and the cap it stepped
    with (--distill-cap as resolved: a run resumed after the default changed keeps its own), None without one."""
    if distiller is None:
        return None
    return {
        **distiller.state_dict(),
        "decoupled": decoupled.state_dict() if decoupled else None,
        "distill_cap": decoupled.cap if decoupled else 0.0,
    }


def resume_distill_options(ckpt: dict) -> dict:
    """--resume: the options that rebuild a checkpoint's distillation exactly as it trained ({} without one)."""
    return Distiller.options_from_state(ckpt["distill"]) if ckpt.get("distill") else {}


def unlabeled_source(opt: argparse.Namespace, data: dict, distiller: Distiller | None) -> str | list | None:
    """The unlabelled images of a run: --unlabeled, else the data YAML's 'unlabeled:' (None: none). The YAML's key
    without a teacher is one line and no stream (the student alone trains on the labelled images, e.g. an
    experiment's student arm); a flag or setting that cannot go with the stream is one UserError."""
    source = getattr(opt, "unlabeled", "") or data.get("unlabeled")
    where = f"--unlabeled {opt.unlabeled}" if getattr(opt, "unlabeled", "") else f"data YAML unlabeled: {source}"
    if not source:
        return None
    if distiller is None:
        LOGGER.info(f"{where}: not used without a teacher (--ft_weights)")
        return None
    for flag, on in (("--rect", opt.rect), ("--quad", opt.quad)):
        if on:
            raise UserError(f"{where}: {flag} is not supported with unlabelled images; drop {flag}")
    if not distiller.unlabeled_terms:
        raise UserError(
            f"{where}: no distillation term reads unlabelled images (the output terms are off and --pseudo-conf "
            f"{distiller.pseudo_conf:g} keeps FGFI on the labelled ones): turn on --kd-weight / --box-kd-weight, or "
            "set --pseudo-conf below 1"
        )
    return source
