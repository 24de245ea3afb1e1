"""The main job: does distillation (FGFI, output distillation) beat the same student trained alone? One command.

    python experiment.py                            # shipped yolov5s teacher -> yolov5n, seed 0 (CPU, ~10 min)
    python experiment.py --seeds 0,1,2              # student and distilled student per seed: mean, std, gain
    python experiment.py --arms student,fgfi,kd,fgfi+kd --seeds 0,1,2   # + output distillation, alone and with FGFI
    python experiment.py --ablation --seeds 0,1,2   # + output terms, regions gtbox / full, 3 levels, psi, weights
    python experiment.py --data my.yaml --teacher big.pt --student-weights yolov5n.pt --imgsz 640  # your data
    python experiment.py --train-teacher            # reproduce weights/yolov5s-synthetic.pt (~25 min on 2 cores)
    python experiment.py --preset gpu               # bigger schedule for a GPU; trains its own yolov5m teacher

Every arm trains the same student (same schedule, same seed) and differs only in its distillation settings. Each
run lives in runs/experiment/<arm>-seed<seed>/ with an experiment.json of its settings and validated metrics; a
later call with the same settings reuses a finished run instead of training it again (so --ablation after --seeds
trains only the new arms); a finished run with other settings is moved aside to <name>-old, never deleted.
Results: results.md / results.csv (per run), summary.csv (per arm), map_curve.png (validation mAP50-95 per epoch)
and, with --ablation, ablation.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

FILE = Path(__file__).resolve()
ROOT = FILE.parents[0]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import train  # noqa: E402
import val  # noqa: E402
from distill import PRECISIONS  # noqa: E402
from utils.checkpoint import strip_optimizer  # noqa: E402
from utils.downloads import attempt_download  # noqa: E402
from utils.general import LOGGER, UserError, check_dataset, check_yaml, colorstr  # noqa: E402

TEACHER = ROOT / "weights/yolov5s-synthetic.pt"  # the shipped teacher for the built-in dataset
TEACHER_CARD = TEACHER.with_suffix(".json")  # its dataset fingerprint, training command and validated mAP
BUILTIN_DATA = "synthetic.yaml"

# Each preset: student (and, for a preset without a shipped teacher, teacher) models and the common schedule
_CPU = dict(
    student="yolov5n.yaml", teacher=str(TEACHER), imgsz=192, batch=16, epochs=9, data=BUILTIN_DATA, device="cpu",
    workers=2, hyp="hyp.short.yaml", optimizer="AdamW",
)  # fmt: skip
# Real photos (BCCD, beside the repo in ../shared/real): the student is yolov5n, fine-tuned from the official
# COCO-pretrained checkpoint (bccd) or from scratch (bccd-scratch); the teacher, trained here once and shared by both,
# is the same pretrained yolov5n fine-tuned on BCCD for a 3x longer schedule (a yolov5s from scratch was not clearly
# better within what 2 CPU cores allow: README, Results)
REAL = ROOT.parent / "shared/real"
COCO_YOLOV5N = str(REAL / "weights/yolov5n.pt")  # the official COCO-pretrained yolov5n v7.0 checkpoint
_BCCD = dict(
    _CPU, data=str(REAL / "bccd.yaml"), teacher="yolov5n.yaml", teacher_weights=COCO_YOLOV5N,
    teacher_epochs=36, imgsz=320, epochs=12, student_weights=COCO_YOLOV5N,
)  # fmt: skip
# Unlabelled images (train.py --unlabeled): a preset with `unlabeled` splits its data into labelled and unlabelled
# images (prepare_unlabeled); its arms then include the unlabelled stream and the fully labelled upper bound.
# builtin-4000: the built-in 1000 labelled images plus 4000 more drawn with another seed, used without their labels;
# quarter: the labels of a quarter of the train split kept (BCCD in bccd-quarter), the rest used as unlabelled (the
# preset's own teacher is trained on that quarter alone: no label leaks)
UNLABELED_SEED = 1  # the extra built-in images' generator seed (the built-in set is seed 0)
# A second synthetic set unlike the built-in one (data/glyphs.yaml: 6 other classes, smaller and more objects, 512
# train images): the COCO-pretrained yolov5n fine-tuned there beside a yolov5s trained there from scratch for half the
# shipped teacher's epochs, so that a recipe is measured where it was not tuned
_GLYPHS = dict(
    _CPU, data="glyphs.yaml", teacher="yolov5s.yaml", teacher_epochs=15, epochs=15, student_weights=COCO_YOLOV5N
)
# The same glyphs student beside a teacher better than it: the same COCO-pretrained yolov5n fine-tuned on glyphs
# first for 25 epochs (still fewer than the shipped teacher's 30), as the bccd preset's teacher is made
_GLYPHS_N = dict(_GLYPHS, teacher="yolov5n.yaml", teacher_weights=COCO_YOLOV5N, teacher_epochs=25)
PRESETS = {
    "unlabeled": dict(_CPU, unlabeled="builtin-4000"),  # the shipped teacher: trained on the 1000 labelled images
    "bccd-quarter": dict(_BCCD, epochs=30, unlabeled="quarter"),
    "cpu": _CPU,
    "cpu-long": dict(_CPU, epochs=15),
    "gpu": dict(_CPU, teacher="yolov5m.yaml", teacher_epochs=120, imgsz=320, epochs=60, batch=64, device="", workers=8),
    "bccd": _BCCD,
    "bccd-scratch": dict(_BCCD, student_weights=None, epochs=16),
    "glyphs": _GLYPHS,
    "glyphs-n": _GLYPHS_N,
}
# How the shipped teacher is made: `python experiment.py --train-teacher` (same as train.py with these flags)
TEACHER_RECIPE = dict(
    cfg="yolov5s.yaml", data=BUILTIN_DATA, hyp="hyp.short.yaml", optimizer="AdamW", epochs=30, imgsz=192,
    batch_size=16, device="cpu", workers=2, seed=0,
)  # fmt: skip

# The output-distillation weights README recommends (measured: README, "Output distillation")
KD = {"kd_weight": 1.0, "box_kd_weight": 0.05}

# Arms: train.run overrides on top of distillation from the teacher; None = the student alone
MAIN_ARMS = {"student": None, "default": {}}  # default: what --ft_weights alone gives (FGFI + kd + box_kd)
OUTPUT_ARMS = {
    "fgfi": {"kd_weight": 0.0, "box_kd_weight": 0.0},  # FGFI alone, the paper's method (FGFI variants below alike)
    "kd": {**KD, "imitation_weight": 0.0},  # output terms alone: no feature imitation
    "fgfi+kd": KD,  # the default recipe's terms, named (no fallback where the teacher's head differs)
    # without --distill-balance: the output terms at their weights whatever their gradient against the detection loss
    "kd-nobal": {**KD, "imitation_weight": 0.0, "distill_balance": False},
    "fgfi+kd-nobal": {**KD, "distill_balance": False},
    # the default recipe (under AdamW: the decoupled step, the gate and the cap) without some of its parts, and the
    # recipe before them, each with its flags named, so that a run is reused only for what it measured
    "default-gate": {"distill_gate": True, "distill_decouple": False},  # the gate, one step of the summed gradient
    "default-decouple": {"distill_gate": False, "distill_decouple": True, "distill_cap": 0.0},  # own Adam step only
    "default-gate-decouple": {"distill_gate": True, "distill_decouple": True, "distill_cap": 0.0},  # no cap
    "default-nocap": {"distill_cap": 0.0},  # the default without the cap: the terms' full Adam step, gated
    "default-cap": {"distill_cap": 1.0},  # the cap named: the terms' step at most the gate's share (the default)
    "default-cap2": {"distill_cap": 2.0},  # ... at twice the gate's share
    "default-cap3": {"distill_cap": 3.0},  # ... at three times
    "coupled": {"distill_gate": False, "distill_decouple": False},  # the recipe before both
}
ALL_BOXES = {"imitation_boxes": "all"}
ABLATION_ARMS = {
    **OUTPUT_ARMS,
    "kd-cls": {"kd_weight": KD["kd_weight"], "box_kd_weight": 0.0, "imitation_weight": 0.0},  # objectness + class
    "kd-box": {"box_kd_weight": KD["box_kd_weight"], "kd_weight": 0.0, "imitation_weight": 0.0},  # boxes alone
    "kd-w3": {**KD, "kd_weight": 3.0, "imitation_weight": 0.0},  # 3x the recommended objectness + class weight
    "kd-t2": {**KD, "kd_temperature": 2.0, "imitation_weight": 0.0},  # softer targets (temperature 2)
    "gtbox": {"imitation_region": "gtbox"},
    "full": {"imitation_region": "full"},
    # several levels with every box on every level (the paper's mask; before --imitation-boxes auto): collapse
    "fgfi-3levels-sum": {"imitation_layers": "detect", "imitation_reduce": "sum", **ALL_BOXES},
    "fgfi-3levels-mean": {"imitation_layers": "detect", "imitation_reduce": "mean", **ALL_BOXES},
    "fgfi-3levels-channel": {"imitation_layers": "detect", "imitation_reduce": "channel", **ALL_BOXES},
    "fgfi-3levels-w0.003": {"imitation_layers": "detect", "imitation_weight": 0.003, **ALL_BOXES},
    "fgfi-3levels-w0.001": {"imitation_layers": "detect", "imitation_weight": 0.001, **ALL_BOXES},
    "fgfi-neck3": {"imitation_layers": "16,19,22", **ALL_BOXES},  # the Concats before P3/P4/P5's C3
    "fgfi-p4": {"imitation_layers": "19"},  # one coarse level alone: the stride-16 Concat
    "fgfi-p5": {"imitation_layers": "22"},  # the stride-32 Concat
    "fgfi-neck3-matched": {"imitation_layers": "16,19,22", "imitation_boxes": "matched"},  # = auto
    "fgfi-p5-matched": {"imitation_layers": "22", "imitation_boxes": "matched"},
    "fgfi-p3p4": {"imitation_layers": "16,19", **ALL_BOXES},  # the two levels that help alone, without stride 32
    "fgfi-p3p4-matched": {"imitation_layers": "16,19", "imitation_boxes": "matched"},  # = auto
    "fgfi-psi0.3": {"iou_factor": 0.3},
    "fgfi-psi0.7": {"iou_factor": 0.7},
    "fgfi-w0.003": {"imitation_weight": 0.003},
    "fgfi-w0.03": {"imitation_weight": 0.03},
}
# the FGFI variants (regions, levels, psi, weights) are measured without the output terms, as FGFI alone
ABLATION_ARMS = {
    arm: {"kd_weight": 0.0, "box_kd_weight": 0.0, **extra} if arm.startswith(("fgfi", "gtbox", "full")) else extra
    for arm, extra in ABLATION_ARMS.items()
}
# The unlabelled stream (presets with `unlabeled`): the default recipe plus the unlabelled images, with FGFI on them
# (mask from the teacher's boxes) or on the labelled images alone; the student trained on every image with its label
# (the upper bound); and the labelled-only arms trained for as many more epochs as the +u arm's minutes allow
# ('@time': equal wall time, from the same seed's measured minutes)
UNLABELED_ARMS = {
    "default+u": {"unlabeled": True},
    "default+u-nopseudo": {"unlabeled": True, "pseudo_conf": 1.0},
    # without the cap: the cap bounds the terms' whole step, the unlabelled images' share included
    "default+u-nocap": {"unlabeled": True, "distill_cap": 0.0},
    "upper": None,  # the student alone on all labels
    "student@time": None,
    "default@time": {},
}
UNLABELED_MAIN = ["student", "default", "default+u", "upper", "student@time", "default@time"]
ARMS = {**MAIN_ARMS, **ABLATION_ARMS, **UNLABELED_ARMS}
MAP_COLUMN = "metrics/mAP_0.5:0.95"  # results.csv column of the per-epoch validation mAP50-95
BOX_COLUMN = "train/box_loss"  # and of the training box loss


def run_experiment(
    preset: str = "cpu",
    teacher: str = "",
    project: str | Path = "",
    epochs: int | None = None,
    seeds: tuple[int, ...] | list[int] = (0,),
    ablation: bool = False,
    arms: list[str] | None = None,
    noplots: bool = False,
    **overrides,
) -> pd.DataFrame:
    """Train every arm once per seed (the teacher shared), validate, save tables and plots; returns the per-run
    table (one row per arm and seed, the teacher first). noplots: no per-run training plots (the experiment's own
    plots are still drawn); overrides: preset keys (data, imgsz, batch, device, workers, ...)."""
    t0 = time.time()
    cfg = dict(PRESETS[preset])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs {epochs}: train for at least 1 epoch")
    cfg["epochs"] = epochs or cfg["epochs"]
    if arms is not None and not arms:
        raise UserError("--arms names no arm: give arms separated by commas, e.g. student,default")
    split = cfg.get("unlabeled")
    default_arms = UNLABELED_MAIN if split else list(MAIN_ARMS)
    arms = list(arms or ([*MAIN_ARMS, *ABLATION_ARMS] if ablation else default_arms))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms {','.join(unknown)}: unknown; choose from {', '.join(ARMS)}")
    if not split and any(a in UNLABELED_ARMS for a in arms):
        raise UserError(f"--arms {','.join(arms)}: the unlabelled arms need --preset unlabeled or bccd-quarter")
    arms.sort(key=lambda a: a.endswith("@time"))  # equal-time arms last: they read the +u arm's minutes
    if not seeds:
        raise UserError("--seeds is empty: give at least one seed, e.g. 0 or 0,1,2")
    for flag, key in (("--imgsz", "imgsz"), ("--batch-size", "batch")):
        if cfg[key] < 1:
            raise UserError(f"{flag} {cfg[key]}: must be >= 1")
    if cfg.get("student_weights"):  # an official name (yolov5n.pt) is downloaded, as train.py --weights does
        cfg["student_weights"] = str(attempt_download(cfg["student_weights"]))
        if not Path(cfg["student_weights"]).is_file():
            hint = "" if overrides.get("student_weights") else "; give --student-weights yolov5n.pt (downloaded)"
            raise UserError(f"--student-weights {cfg['student_weights']}: file not found{hint}")
    project = Path(project or ROOT / ("runs/experiment" if preset == "cpu" else f"runs/experiment-{preset}"))
    project.mkdir(parents=True, exist_ok=True)
    if split:  # the labelled/unlabelled split, and the data YAML of the upper bound (every label)
        cfg["data"], cfg["unlabeled_images"], cfg["upper_data"] = prepare_unlabeled(split, cfg["data"], project)
    common = dict(
        data=cfg["data"], imgsz=cfg["imgsz"], batch_size=cfg["batch"], device=cfg["device"], workers=cfg["workers"],
        hyp=cfg["hyp"], optimizer=cfg["optimizer"], epochs=cfg["epochs"], project=str(project), exist_ok=True,
        noplots=noplots,
    )  # fmt: skip

    teacher = teacher or cfg["teacher"]
    if teacher.endswith(".yaml"):  # a preset without a shipped teacher trains its own, once
        teacher = _train_teacher_for(project, teacher, cfg)
    elif not Path(teacher).is_file():
        hint = "run `python experiment.py --train-teacher`" if Path(teacher) == TEACHER else "check the path"
        raise UserError(f"--teacher {teacher}: file not found; {hint}")
    data_dict = check_dataset(cfg["data"])  # generates the built-in dataset before its fingerprint is read
    if Path(teacher).resolve() == TEACHER.resolve():
        check_teacher_fingerprint(cfg["data"], data_dict["path"])

    try:
        rows, curves = [_validate("teacher", None, teacher, cfg, project)], {}
    except UserError as e:  # val.py names its own flag (e.g. a teacher of other classes): here it is --teacher
        raise UserError(str(e).replace("--weights", "--teacher", 1)) from None
    teacher_sha = _sha256(teacher)
    for seed in seeds:
        for arm in arms:
            name = f"{arm}-seed{seed}"
            precision = cfg.get("distill_precision") or "auto"
            # train.py's defaults of these, recorded so that runs of the recipes before them are not reused
            distilled = {
                "ft_weights": str(teacher), "distill_precision": precision, "distill_decouple": None,
                "distill_gate": None, "distill_cap": None,
            }  # fmt: skip
            extra = {} if ARMS[arm] is None else {**distilled, **ARMS[arm]}
            if extra.get("unlabeled"):
                extra["unlabeled"] = cfg["unlabeled_images"]
            settings = {**common, **extra, "cfg": cfg["student"], "seed": seed, "name": name}
            if arm == "upper":
                settings["data"] = cfg["upper_data"]
            if arm.endswith("@time"):  # as many epochs as the same seed's +u arm took minutes
                settings["epochs"] = _equal_time_epochs(rows, arm.removesuffix("@time"), seed, cfg["epochs"])
            if cfg.get("student_weights"):  # a pretrained student: its weights (and its architecture)
                settings.update(cfg="", weights=str(Path(cfg["student_weights"]).resolve()))
                settings["student_sha256"] = _sha256(cfg["student_weights"])
            if extra:
                settings["teacher_sha256"] = teacher_sha
            rows.append(_train_arm(arm, seed, settings, cfg, project))
            curves[(arm, seed)] = _val_curve(project / name / "results.csv")

    df = pd.DataFrame(rows)
    student = df[df["arm"] == "student"].set_index("seed")["mAP50_95"]
    df["gain_vs_student"] = [m - student.get(s, math.nan) if a != "teacher" else math.nan
                             for a, s, m in zip(df["arm"], df["seed"], df["mAP50_95"])]  # fmt: skip
    summary = summarize(df)
    ahead = compare_curves(curves)
    df.to_csv(project / "results.csv", index=False)
    summary.to_csv(project / "summary.csv", index=False)
    ahead.to_csv(project / "curves.csv", index=False)
    plot_curves(curves, project / "map_curve.png")
    if len(set(arms) - set(MAIN_ARMS)):
        plot_ablation(summary, project / "ablation.png")
    report = _report(df, summary, preset, cfg, seeds, time.time() - t0, ahead)
    (project / "results.md").write_text(report)
    LOGGER.info(f"\n{report}\nSaved to {colorstr('bold', project)}")
    return df


def _equal_time_epochs(rows: list[dict], base: str, seed: int, epochs: int) -> int:
    """Epochs of arm `base` that take the minutes the default+u run of this seed took, from both runs' measured
    training minutes (at least `epochs`)."""
    minutes = {r["arm"]: r["train_min"] for r in rows if r["seed"] == seed}
    if not all(k in minutes for k in (base, "default+u")):
        raise UserError(f"{base}@time needs the {base} and default+u arms of seed {seed}: add them to --arms")
    return max(epochs, round(epochs * minutes["default+u"] / minutes[base]))


def prepare_unlabeled(split: str, data: str, project: Path) -> tuple[str, str, str]:
    """Make a preset's labelled / unlabelled split: (data YAML of the labelled images, the unlabelled images, data
    YAML of every image with its label). Idempotent: the same files every call."""
    import yaml

    folder = (project / "data").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    base = check_dataset(data)
    names = base["names"]
    if split == "builtin-4000":
        from data.synthetic import generate_dataset

        extra = ROOT.parent / "datasets/synthetic-extra"
        if not (extra / "images/train").is_dir() or len(list((extra / "images/train").glob("*.jpg"))) != 4000:
            generate_dataset(extra, n_train=4000, n_val=0, seed=UNLABELED_SEED)
        labelled, unlabeled = base["train"], str(extra / "images/train")
        upper = [base["train"], unlabeled]
    elif split == "quarter":
        images = sorted(str(f) for f in Path(base["train"]).rglob("*.*") if f.suffix[1:].lower() in ("jpg", "png"))
        order = np.random.default_rng(0).permutation(len(images))
        quarter = math.ceil(len(images) / 4)
        keep, rest = sorted(images[i] for i in order[:quarter]), sorted(images[i] for i in order[quarter:])
        (folder / "labelled.txt").write_text("\n".join(keep) + "\n")
        (folder / "unlabeled.txt").write_text("\n".join(rest) + "\n")
        labelled, unlabeled, upper = str(folder / "labelled.txt"), str(folder / "unlabeled.txt"), base["train"]
    else:
        raise ValueError(f"unknown split {split!r}")
    files = []
    for stem, train_images in ((f"{split}", labelled), (f"{split}-upper", upper)):
        file = folder / f"{stem}.yaml"
        file.write_text(yaml.safe_dump({"path": str(base["path"]), "train": train_images, "val": base["val"],
                                        "names": names}, sort_keys=False))  # fmt: skip
        files.append(str(file))
    return files[0], unlabeled, files[1]


def _train_arm(arm: str, seed: int, settings: dict, cfg: dict, project: Path) -> dict:
    """Train one arm at one seed and validate its best.pt, or reuse a finished run with identical settings."""
    run_dir = project / settings["name"]
    record_file = run_dir / "experiment.json"
    finished = record_file.is_file() and (run_dir / "weights/best.pt").is_file()
    if finished:
        record = json.loads(record_file.read_text())
        if _same_settings(record.get("settings", {}), settings):
            LOGGER.info(f"Reusing the finished run {run_dir} (same settings)")
            return record["result"]
        kept = _free_name(run_dir)  # a finished run is never deleted: it may be a teacher other runs were taught by
        LOGGER.warning(f"{run_dir} was trained with other settings: moved to {kept.name}, training again")
        run_dir.rename(kept)
    elif run_dir.exists():  # unfinished: train again from the start (results.csv would otherwise append)
        LOGGER.info(f"Replacing the unfinished {run_dir}")
        shutil.rmtree(run_dir)
    t = time.time()
    train.run(**{k: v for k, v in settings.items() if not k.endswith("_sha256")})
    minutes = (time.time() - t) / 60
    result = _validate(arm, seed, run_dir / "weights/best.pt", cfg, project, minutes)
    record_file.write_text(json.dumps({"settings": settings, "result": result}, indent=1))
    return result


def _same_settings(a: dict, b: dict) -> bool:
    """Whether two runs' settings are the same, however each spelled its paths: a file is compared by its content (the
    same teacher or data YAML in another checkout is the same setting), a folder by where it really is. The project
    folder is not compared: the run was found in it, whichever checkout wrote it there."""

    def canonical(v):
        if not (isinstance(v, str) and v and os.path.exists(v)):
            return v
        return ("sha256", _sha256(v)) if os.path.isfile(v) else os.path.realpath(v)

    # a checkpoint whose sha256 both runs recorded is compared by that alone: its path may be a checkout since removed
    hashed = {path for path, sha in (("ft_weights", "teacher_sha256"), ("weights", "student_sha256"))
              if sha in a and sha in b}  # fmt: skip

    def compared(settings: dict) -> dict:
        return {k: canonical(v) for k, v in settings.items() if k != "project" and k not in hashed}

    return compared(a) == compared(b)


def _free_name(run_dir: Path) -> Path:
    """run_dir with the first free suffix -old, -old2, ... beside it."""
    n = 1
    while (kept := run_dir.with_name(f"{run_dir.name}-old{n if n > 1 else ''}")).exists():
        n += 1
    return kept


def _validate(arm: str, seed: int | None, weights, cfg: dict, project: Path, minutes: float = math.nan) -> dict:
    (p, r, map50, map5095, *_), _, _ = val.run(
        data=cfg["data"], weights=str(weights), imgsz=cfg["imgsz"], batch_size=cfg["batch"], device=cfg["device"],
        workers=cfg["workers"], project=str(project / "val"), name=f"{arm}-seed{seed}" if seed is not None else arm,
        exist_ok=True, plots=False, half=False,
    )  # fmt: skip
    return dict(arm=arm, seed=seed, P=p, R=r, mAP50=map50, mAP50_95=map5095, train_min=minutes)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per arm: seeds, mean and std of mAP50 and mAP50-95, the mean gain over the student alone, that gain in units
    of the pooled std of the two arms, and the share of the teacher-student gap it closes
    ((arm - student) / (teacher - student), mAP50-95)."""
    runs = df[df["arm"] != "teacher"]
    teacher = df[df["arm"] == "teacher"].iloc[0]
    stats = runs.groupby("arm", sort=False).agg(
        seeds=("seed", "count"), mAP50=("mAP50", "mean"), mAP50_std=("mAP50", "std"),
        mAP50_95=("mAP50_95", "mean"), mAP50_95_std=("mAP50_95", "std"),
    ).reset_index()  # fmt: skip
    if "student" in set(stats["arm"]):
        base = stats.set_index("arm").loc["student"]
        stats["gain50"] = stats["mAP50"] - base["mAP50"]
        stats["gain50_95"] = stats["mAP50_95"] - base["mAP50_95"]
        pooled = ((stats["mAP50_95_std"] ** 2 + base["mAP50_95_std"] ** 2) / 2) ** 0.5
        stats["gain_in_pooled_std"] = stats["gain50_95"] / pooled.where(pooled > 0)
        gap = teacher["mAP50_95"] - base["mAP50_95"]
        stats["gap_closed"] = stats["gain50_95"] / gap if gap > 0 else math.nan
    top = pd.DataFrame([dict(arm="teacher", seeds=1, mAP50=teacher["mAP50"], mAP50_95=teacher["mAP50_95"])])
    return pd.concat([top, stats], ignore_index=True)


LAST_EPOCHS = 5  # compare_curves' gain_last: the mean difference over this many final epochs


def compare_curves(curves: dict) -> pd.DataFrame:
    """Per distilled run, against the student alone of the same seed, epoch by epoch (validation mAP50-95): the
    epochs it is ahead, the first epoch from which it stays at or above the student to the end (NaN: never), the
    mean difference over the last LAST_EPOCHS epochs (steadier than best.pt's on a small val set: one lucky epoch
    decides best.pt), and its training box loss at the last epoch beside the student's."""
    rows = []
    for (arm, seed), curve in curves.items():
        base = curves.get(("student", seed))
        if arm == "student" or base is None:
            continue
        diff = (curve[MAP_COLUMN] - base[MAP_COLUMN]).dropna()
        behind = diff.index[diff < 0]
        later = diff.index[diff.index > behind.max()] if len(behind) else diff.index
        rows.append(dict(
            arm=arm, seed=seed, epochs=len(diff), epochs_ahead=int((diff > 0).sum()),
            ahead_from_epoch=later.min() if len(later) else math.nan,
            gain_last=diff.iloc[-LAST_EPOCHS:].mean(),
            box_loss_last=curve[BOX_COLUMN].iloc[-1], student_box_loss_last=base[BOX_COLUMN].iloc[-1],
        ))  # fmt: skip
    return pd.DataFrame(rows)


def _report(df: pd.DataFrame, summary: pd.DataFrame, preset: str, cfg: dict, seeds, seconds: float, ahead=None) -> str:
    def markdown(table: pd.DataFrame) -> str:  # blanks, not "nan", where a value does not apply (the teacher)
        return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".4f", missingval="")

    per_run = markdown(df.assign(seed=[None if pd.isna(s) else str(int(s)) for s in df["seed"]]))
    table = markdown(summary)
    lines = [
        f"Preset {preset}: student {cfg['student']}, {cfg['epochs']} epochs, {cfg['imgsz']} px, batch {cfg['batch']}, "
        f"{cfg['optimizer']} + {cfg['hyp']}, data {cfg['data']}, seeds {','.join(map(str, seeds))}; "
        f"wall time {seconds / 60:.1f} min.",
        "",
        "Per run (best.pt of each run, validated on the val set):",
        "",
        per_run,
        "",
        "Per arm (mean and std over seeds; gains are against the student alone, in mAP50-95 unless named):",
        "",
        table,
        "",
    ]
    if ahead is not None and len(ahead):
        lines += [
            "Per epoch against the student alone of the same seed (validation mAP50-95; epochs count from 0; "
            f"gain_last: the mean gain over the last {LAST_EPOCHS} epochs):",
            "",
            markdown(ahead),
            "",
        ]
    stats = summary.set_index("arm")
    for arm in [a for a in stats.index if a not in ("teacher", "student")] if "student" in stats.index else []:
        row = stats.loc[arm]
        n = int(row["seeds"])
        if n < 2:
            noise = "one seed: run --seeds 0,1,2 to compare the gain with seed-to-seed noise"
        elif math.isnan(row["gain_in_pooled_std"]):
            noise = f"{n} seeds, but no seed-to-seed spread to compare it with (pooled std 0)"
        else:
            noise = f"{row['gain_in_pooled_std']:.1f} pooled standard deviations over {n} seeds"
        gap = (
            f"it closes {100 * row['gap_closed']:.0f}% of the teacher-student gap"
            if not math.isnan(row["gap_closed"])
            else "no teacher-student gap to close (the teacher is not above the student)"
        )
        lines.append(
            f"{arm} changes the student's mAP50-95 by {row['gain50_95']:+.4f} ({noise}) and mAP50 by "
            f"{row['gain50']:+.4f}; {gap}."
        )
    return "\n".join(lines) + "\n"


def _val_curve(results_csv: Path) -> pd.DataFrame:
    """Per epoch: the validation mAP50-95 and the training box loss of one run."""
    df = pd.read_csv(results_csv, skipinitialspace=True)
    df.columns = df.columns.str.strip()
    return df.set_index("epoch")[[MAP_COLUMN, BOX_COLUMN]]


def plot_curves(curves: dict, file: Path) -> None:
    """Two panels per epoch, one line per (arm, seed), one colour per arm: validation mAP50-95 and the training box
    loss (where a distilled student learns its boxes slower than the student alone, it shows here first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), tight_layout=True)
    colours = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(arm for arm, _ in curves))}
    for ax, column, label in zip(axes, (MAP_COLUMN, BOX_COLUMN), ("val mAP50-95", "train box loss")):
        labelled = set()
        for (arm, _), curve in curves.items():
            values = curve[column]
            ax.plot(values.index, values.values, color=colours[arm], alpha=0.8, label=None if arm in labelled else arm)
            labelled.add(arm)
        ax.set(xlabel="epoch", ylabel=label, title=f"{label} per epoch (one line per seed)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(file, dpi=150)
    plt.close(fig)


def plot_ablation(summary: pd.DataFrame, file: Path) -> None:
    """Bar chart of mean mAP50-95 per arm with std error bars; the teacher's score in the title (a line at its
    height would squash the students' bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary[summary["arm"] != "teacher"]
    teacher = float(summary.loc[summary["arm"] == "teacher", "mAP50_95"].iloc[0])
    fig, ax = plt.subplots(figsize=(8, 4.5), tight_layout=True)

    def colour(arm: str) -> str:  # grey: the student; blue: FGFI settings; green: output terms; orange: regions
        if arm == "student":
            return "0.6"
        return "C2" if "kd" in arm else "C0" if arm.startswith("fgfi") else "C1"

    colours = [colour(a) for a in arms["arm"]]
    ax.bar(arms["arm"], arms["mAP50_95"], yerr=arms["mAP50_95_std"].fillna(0), color=colours, capsize=4)
    ax.set(
        ylabel="val mAP50-95 (mean +/- std over seeds)",
        title=f"Distillation ablation (teacher: {teacher:.3f})",
    )
    ax.tick_params(axis="x", rotation=30)
    fig.savefig(file, dpi=150)
    plt.close(fig)


def check_teacher_fingerprint(data: str, root: str | Path) -> None:
    """Refuse the shipped teacher when the built-in dataset at root (check_dataset(data)["path"]) is not the one
    it was trained on."""
    from data.synthetic import dataset_fingerprint

    if Path(check_yaml(data, "--data")).resolve() != Path(check_yaml(BUILTIN_DATA, "--data")).resolve():
        return  # another dataset: the user chose the teacher for it
    expected = json.loads(TEACHER_CARD.read_text())["dataset"]
    found = dataset_fingerprint(root, expected["generator"]["seed"])
    if found != expected:
        raise UserError(
            f"{TEACHER} was trained on another version of the built-in dataset (fingerprint in {TEACHER_CARD}): "
            "delete datasets/synthetic to regenerate it, or retrain with `python experiment.py --train-teacher`"
        )


def train_teacher(project: str | Path = ROOT / "runs/teacher", name: str = "yolov5s-synthetic", **overrides) -> Path:
    """Train the shipped teacher with TEACHER_RECIPE, then ship it (see ship_teacher)."""
    recipe = {**TEACHER_RECIPE, **{k: v for k, v in overrides.items() if v is not None}}
    train.run(**recipe, project=str(project), name=name, exist_ok=True)
    return ship_teacher(Path(project) / name / "weights/best.pt", recipe)


def ship_teacher(best: Path, recipe: dict = TEACHER_RECIPE) -> Path:
    """Copy a finished run's best.pt to weights/ as a stripped fp16 checkpoint, with a card (JSON) holding the
    dataset fingerprint, the training command and its validated mAP on the built-in val set."""
    from data.synthetic import dataset_fingerprint

    TEACHER.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, TEACHER)
    strip_optimizer(TEACHER)
    data = check_dataset(recipe["data"])
    cfg = dict(data=recipe["data"], imgsz=recipe["imgsz"], batch=recipe["batch_size"], device=recipe["device"])
    metrics = _validate("teacher", None, TEACHER, {**cfg, "workers": recipe["workers"]}, ROOT / "runs")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items())
    card = {
        "command": f"python train.py {flags}  (python experiment.py --train-teacher)",
        "val": {"imgsz": recipe["imgsz"], **{k: round(float(metrics[k]), 4) for k in ("P", "R", "mAP50", "mAP50_95")}},
        "dataset": dataset_fingerprint(data["path"]),  # generated by generate_dataset's defaults (seed 0)
    }
    TEACHER_CARD.write_text(json.dumps(card, indent=1) + "\n")
    LOGGER.info(f"Shipped teacher {TEACHER} ({TEACHER.stat().st_size / 1e6:.1f} MB): {card['val']}")
    return TEACHER


def _train_teacher_for(project: Path, cfg_yaml: str, cfg: dict) -> str:
    """A preset's own teacher (no shipped one), trained once per (data, model, size, schedule) under
    runs/teachers/ and reused by every later call and preset that asks for the same one."""
    name = f"{Path(cfg['data']).stem}-{Path(cfg_yaml).stem}-{cfg['imgsz']}px-{cfg['teacher_epochs']}e"
    folder = ROOT / "runs/teachers"
    settings = dict(
        cfg=cfg_yaml, data=cfg["data"], hyp=cfg["hyp"], optimizer=cfg["optimizer"], epochs=cfg["teacher_epochs"],
        imgsz=cfg["imgsz"], batch_size=cfg["batch"], device=cfg["device"], workers=cfg["workers"], seed=0,
        project=str(folder), name=name, exist_ok=True,
    )  # fmt: skip
    if cfg.get("teacher_weights"):  # fine-tuned from a pretrained checkpoint (its architecture)
        settings.update(cfg="", weights=str(Path(cfg["teacher_weights"]).resolve()))
    best = folder / name / "weights/best.pt"
    if not best.is_file():
        LOGGER.info(f"Training the teacher first ({cfg_yaml}, {cfg['teacher_epochs']} epochs): {folder / name}")
    _train_arm("teacher", 0, settings, cfg, folder)
    return str(best)


def _sha256(file) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(value).replace(" ", "").split(",") if s]
    except ValueError:
        raise UserError(f"--seeds '{value}': use integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds '{value}': give one or more distinct seeds >= 0, e.g. 0,1,2")
    return seeds


def parse_opt() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu", help="schedule and models")
    parser.add_argument("--teacher", default="", help="teacher checkpoint (default: the preset's)")
    parser.add_argument("--project", default="", help="save to this folder (default: runs/experiment[-<preset>])")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (override the preset)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="epochs of a preset's own teacher (gpu)")
    parser.add_argument("--device", default=None, help="cpu, 0, 0,1 (override the preset)")
    parser.add_argument("--data", default=None, help="any YOLOv5 data YAML (default: the built-in synthetic.yaml)")
    parser.add_argument("--imgsz", "--img", type=int, default=None, help="train and val image size (override)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (override the preset)")
    parser.add_argument("--student-weights", default=None, help="a pretrained student .pt (default: from scratch)")
    parser.add_argument(
        "--distill-precision", choices=PRECISIONS, default=None,
        help="train.py's --distill-precision for the distillation arms (default auto: bf16 on a CPU with AMX)",
    )  # fmt: skip
    parser.add_argument("--seeds", "--seed", default="0", help="training seeds, e.g. 0 or 0,1,2")
    parser.add_argument("--ablation", action="store_true", help="also the imitation region/level/psi/weight arms")
    parser.add_argument("--arms", default="", help=f"train only these arms, comma-separated: {', '.join(ARMS)}")
    parser.add_argument("--train-teacher", action="store_true", help="train and ship weights/yolov5s-synthetic.pt")
    return parser.parse_args()


if __name__ == "__main__":
    opt = parse_opt()
    try:
        if opt.train_teacher:
            train_teacher(device=opt.device)
        else:
            run_experiment(
                opt.preset, opt.teacher, opt.project, opt.epochs, parse_seeds(opt.seeds), opt.ablation,
                None if not opt.arms else [a for a in opt.arms.split(",") if a], device=opt.device,
                teacher_epochs=opt.teacher_epochs,
                data=opt.data, imgsz=opt.imgsz, batch=opt.batch_size, student_weights=opt.student_weights,
                distill_precision=opt.distill_precision,
            )  # fmt: skip
    except UserError as e:
        LOGGER.error(f"ERROR: {e}")
        sys.exit(1)
