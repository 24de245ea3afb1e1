"""Training from the official YOLOv5n v7.0 checkpoint on COCO128 (../shared/real; skipped without it).

Fine-tuning (YOLOv5's tutorial, `train.py --weights yolov5n.pt --data coco128.yaml --img 320`, 1 epoch) writes a
YOLOv5 run folder and keeps the pretrained model's mAP; the real yolov5n as a distillation teacher (--ft_weights)
trains a student end to end with every distillation term on.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import train
import val
from utils.checkpoint import attempt_load, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real"
WEIGHTS, DATA = REAL / "weights/yolov5n.pt", REAL / "coco128.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (REAL / "coco128").is_dir(), reason="needs ../shared/real")]

# official YOLOv5's results.csv columns, in its order
YOLOV5_COLUMNS = ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
                  "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss", "val/cls_loss",
                  "x/lr0", "x/lr1", "x/lr2"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine OpenMP threads spin waiting for each other (measured at load 8: the
    fine-tuning fixture took 116 s with two threads, 34 s with one); an idle machine loses at most its second core's
    share. The results are the same (mAP50-95 0.276 with either)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _results(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "results.csv", skipinitialspace=True)
    df.columns = [c.strip() for c in df.columns]
    return df


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, float]:
    """One fine-tuning run shared by the tests below, and the pretrained checkpoint's mAP50-95 at the same 320 px.

    YOLOv5's tutorial command, without --noautoanchor: at 320 px a third of COCO128's boxes are small beside yolov5n's
    640-px anchors (BPR 0.957 < 0.98), so official YOLOv5's AutoAnchor replaces the anchors the pretrained head was
    trained with, and the first epoch's mAP50-95 falls to 0.196 (measured); train.py keeps a pretrained head's anchors
    (0.276)."""
    project = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the data YAML's path is relative to the project root, as YOLOv5's
        (_, _, _, pretrained, *_), _, _ = val.run(
            data=str(DATA), weights=str(WEIGHTS), imgsz=320, batch_size=32, device="cpu", workers=0,
            project=str(project), name="val", plots=False,
        )  # fmt: skip
        train.run(
            data=str(DATA), weights=str(WEIGHTS), imgsz=320, epochs=1, batch_size=16, device="cpu", workers=0,
            project=str(project), name="exp", noplots=True,
        )  # fmt: skip
    return project / "exp", pretrained


def test_finetune_writes_a_yolov5_run_folder(finetuned):
    run_dir, _ = finetuned
    df = _results(run_dir)
    assert list(df.columns) == YOLOV5_COLUMNS and list(df["epoch"]) == [0]
    opt = yaml.safe_load((run_dir / "opt.yaml").read_text())
    assert (opt["weights"], opt["imgsz"], opt["epochs"], opt["batch_size"]) == (str(WEIGHTS), 320, 1, 16)
    hyp = yaml.safe_load((run_dir / "hyp.yaml").read_text())
    assert hyp == yaml.safe_load((ROOT / "data/hyps/hyp.scratch-low.yaml").read_text())
    coco_names = yaml.safe_load(DATA.read_text())["names"]
    for f in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(run_dir / "weights" / f)
        assert ckpt["optimizer"] is None and ckpt["epoch"] == -1  # stripped at the end, as YOLOv5
        model = attempt_load(run_dir / "weights" / f)
        assert model.nc == 80 and model.names == coco_names


def test_finetune_first_epoch_keeps_the_pretrained_map(finetuned):
    """Measured (2-vCPU box, torch 2.14 CPU): pretrained 0.290, after the first epoch 0.276 (0.95x; mAP50 0.453 ->
    0.468). 0.85x leaves room for other CPUs and torch versions and still fails on a broken transfer, optimizer
    or loss, or on anchors replaced by AutoAnchor (0.196, 0.68x)."""
    run_dir, pretrained = finetuned
    assert pretrained == pytest.approx(0.290, abs=0.002)  # the checkpoint on COCO128 at 320 px, batch 32
    map5095 = float(_results(run_dir)["metrics/mAP_0.5:0.95"].iloc[0])
    assert map5095 >= 0.85 * pretrained, (map5095, pretrained)


def test_real_teacher_distills_a_student_end_to_end(tmp_path):
    """The real yolov5n (80 classes) teaches a yolov5n from scratch with FGFI and both output terms on; the student
    adopts the teacher's anchors (--kd-weight). 32 COCO128 images at 256 px keep it to two steps."""
    images = sorted((REAL / "coco128/images/train2017").glob("*.jpg"))[:32]
    (tmp_path / "subset.txt").write_text("".join(f"{f}\n" for f in images))  # label cache beside it, not in shared/
    data = yaml.safe_load(DATA.read_text()) | {"path": str(tmp_path), "train": "subset.txt", "val": "subset.txt"}
    (tmp_path / "subset.yaml").write_text(yaml.safe_dump(data))
    train.run(
        data=str(tmp_path / "subset.yaml"), cfg="yolov5n.yaml", ft_weights=str(WEIGHTS), kd_weight=1.0,
        box_kd_weight=0.05, imgsz=256, epochs=1, batch_size=16, device="cpu", workers=0, project=str(tmp_path),
        name="distill", noplots=True,
    )  # fmt: skip
    row = _results(tmp_path / "distill").iloc[0]
    for term in ("imitation", "kd", "box_kd"):
        loss = float(row[f"train/{term}_loss"])
        assert 0 < loss < float("inf"), (term, loss)
    student = attempt_load(tmp_path / "distill/weights/last.pt")
    teacher = attempt_load(WEIGHTS)
    assert (student.model[-1].anchors == teacher.model[-1].anchors).all()
