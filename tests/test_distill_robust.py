"""Distillation runs that never break (issue 9): teacher/student edge cases, exact resume after a kill at any point,
stripped checkpoints, adapter optimizer groups, flag checks, label classes beyond the data YAML, teacher indices."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import train
import val
from models.yolo import DetectionModel
from tests.conftest import save_random_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.general import UserError

pytestmark = pytest.mark.slow

COMMON = dict(batch_size=8, device="cpu", workers=0, noplots=True, exist_ok=True, hyp="hyp.scratch-low.yaml")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Teachers in YOLOv5's checkpoint layout: 'wide' yolov5s (P5), 'p6' yolov5n6, 'narrow' yolov5n."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        k: save_random_model(cfg, root / f"{k}.pt")
        for k, cfg in (("wide", "yolov5s"), ("p6", "yolov5n6"), ("narrow", "yolov5n"))
    }


def _epochs(run_dir: Path) -> list[int]:
    df = pd.read_csv(run_dir / "results.csv", skipinitialspace=True)
    df.columns = [c.strip() for c in df.columns]
    return [int(x) for x in df["epoch"]], df


class _Killed(Exception):
    """Stands for a kill: raised where the process would have died."""


def _kill_when_saving(monkeypatch, name: str, epoch: int) -> None:
    """Die just before train.py writes `name` (e.g. last.pt) for `epoch`: everything before it is on disk."""
    real = train.save_checkpoint

    def save(ckpt, path):
        if Path(path).name == name and ckpt["epoch"] == epoch:
            raise _Killed(f"{name} epoch {epoch}")
        real(ckpt, path)

    monkeypatch.setattr(train, "save_checkpoint", save)


def _kill_when_stripping(monkeypatch, name: str) -> None:
    real = train.strip_optimizer

    def strip(f):
        if Path(f).name == name:
            raise _Killed(f"strip {name}")
        real(f)

    monkeypatch.setattr(train, "strip_optimizer", strip)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_p6_teacher_p5_student_any_multiple_of_32(tmp_path, tiny_data, teachers, monkeypatch, log_lines):
    """Item 1: a P6 teacher beside a P5 student at --img 96, --rect and --multi-scale. The image grid is the teacher's
    (stride 64): --img 96 becomes 128 and every training batch, rectangular and rescaled, has sides that are multiples
    of 64, so the two default stride-8 points (student layer 16, teacher 22) line up cell for cell at every step."""
    from distill import Distiller

    steps = []
    real_call = Distiller.__call__

    def recording_call(self, student, imgs, targets, **kwargs):
        preds, inputs = real_call(self, student, imgs, targets, **kwargs)
        steps.append((self, tuple(imgs.shape), inputs))
        return preds, inputs

    monkeypatch.setattr(Distiller, "__call__", recording_call)
    train.run(
        data=str(tiny_data), cfg="yolov5n.yaml", ft_weights=str(teachers["p6"]), epochs=1, imgsz=96, rect=True,
        multi_scale=True, project=str(tmp_path), name="p6", **COMMON,
    )  # fmt: skip
    epochs, df = _epochs(tmp_path / "p6")
    assert epochs == [0] and (df["train/imitation_loss"] > 0).all()
    distiller = steps[0][0]
    assert (distiller.student_layers, distiller.teacher_layers, distiller.stride) == ([16], [22], 64)
    sizes = [m.split("\n")[0] for m in log_lines if m.startswith("Image sizes")]
    assert sizes == ["Image sizes 128 train, 128 val"], sizes  # --img 96 rounded up to the teacher's 64 grid
    assert len(steps) == 2  # 16 images, batch 8
    for _, (b, _, h, w), inputs in steps:
        assert h % 64 == 0 and w % 64 == 0 and max(h, w) in (64, 128, 192), (h, w)  # --multi-scale: 0.5-1.5 x 128
        (mask,), (s,), (t,) = inputs["mask"], inputs["student"], inputs["teacher"]
        assert mask.shape == (b, 1, h // 8, w // 8)  # the student's stride-8 map covers the whole image
        n = int(mask.sum())
        assert n > 0 and s.shape == t.shape and s.shape in ((n, t.shape[-1]), (b, t.shape[1], h // 8, w // 8))


def test_kill_at_any_point_then_resume(tmp_path, tiny_data, teachers, monkeypatch):
    """Items 2a-d, 3, 4, 5: a distillation run killed between the CSV row and last.pt, then after its last save,
    with its (relative) teacher moved; every resume ends with each epoch once and stripped checkpoints."""
    home = tmp_path / "home"
    shutil.copy(teachers["wide"], home.mkdir() or home / "teacher.pt")
    monkeypatch.chdir(home)  # a relative --ft_weights, stored absolute
    run_dir, wdir = tmp_path / "d", tmp_path / "d/weights"
    _kill_when_saving(monkeypatch, "last.pt", epoch=1)  # after epoch 1's CSV row (and best.pt), before last.pt
    with pytest.raises(_Killed):
        train.run(
            data=str(tiny_data), cfg="yolov5n.yaml", ft_weights="teacher.pt", epochs=2, imgsz=64, save_period=1,
            project=str(tmp_path), name="d", **COMMON,
        )  # fmt: skip
    monkeypatch.undo()
    last = wdir / "last.pt"
    ckpt = load_checkpoint(last)
    with torch.no_grad():  # an EMA far from the raw weights, so that resuming from one or the other shows
        for p in ckpt["ema"].parameters():
            p.add_(0.5)
    save_checkpoint(ckpt, last)
    assert ckpt["epoch"] == 0 and _epochs(run_dir)[0] == [0, 1]  # the row of the unsaved epoch 1 is on disk
    assert ckpt["distill"]["teacher"] == str(home / "teacher.pt")
    # 5: adapter weights decayed, adapter biases not (YOLOv5 never decays biases)
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) == 5 and groups[3]["weight_decay"] > 0 and groups[4]["weight_decay"] == 0
    assert len(groups[3]["params"]) == len(groups[4]["params"]) == 1  # one adapter: conv weight, conv bias
    stale = wdir / f".last.pt.{_dead_pid()}.tmp"
    stale.write_bytes(b"half a checkpoint")  # what a kill -9 inside torch.save leaves

    # 3: the teacher moved and the run is resumed from elsewhere
    moved = tmp_path / "moved/teacher.pt"
    moved.parent.mkdir()
    shutil.move(home / "teacher.pt", moved)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=rf"teacher .*teacher\.pt \(from {last}\) is not found; pass --ft_weights"):
        train.run(resume=str(last))
    with pytest.raises(UserError, match="another width"):  # a narrower teacher than the adapters were trained for
        train.run(resume=str(last), ft_weights=str(teachers["narrow"]))

    # 2a: the student resumes from ckpt['model'] (the optimizer's weights), not from the EMA
    seen = []
    real_optimizer = train.smart_optimizer

    def recording_optimizer(model, *args, **kwargs):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_optimizer(model, *args, **kwargs)

    monkeypatch.setattr(train, "smart_optimizer", recording_optimizer)
    _kill_when_stripping(monkeypatch, "last.pt")  # after best.pt is stripped: last.pt still holds epoch 1
    with pytest.raises(_Killed):
        train.run(resume=str(last), ft_weights=str(moved))
    monkeypatch.undo()
    raw, ema = ckpt["model"].float().state_dict(), ckpt["ema"].float().state_dict()
    assert all(torch.equal(seen[0][k], raw[k]) for k in raw)
    assert not all(torch.equal(raw[k], ema[k]) for k in raw)
    assert not stale.exists()  # 2d
    assert load_checkpoint(last)["distill"]["teacher"] == str(moved)  # the override is the run's teacher now

    # 2b: resumed after its last epoch's save (--save-period 1's epoch1.pt): nothing to train, only to finish
    train.run(resume=str(wdir / "epoch1.pt"), device="cpu", workers=0)
    epochs, df = _epochs(run_dir)
    assert epochs == [0, 1]  # 2c: each epoch exactly once
    assert {"x/lr0", "x/lr3", "x/lr4"} <= set(df.columns)  # 5: the adapters' learning rate is logged
    assert (df["x/lr4"] == df["x/lr0"]).all()  # the adapters' biases warm up from warmup_bias_lr, as the student's
    assert (df["x/lr4"] > 10 * df["x/lr3"]).all()  # still in warmup: weights rise from 0, biases fall from 0.1
    for f in "best.pt", "last.pt":  # 4: stripped to a plain YOLOv5 checkpoint
        final = load_checkpoint(wdir / f)
        assert "distill" not in final and final["optimizer"] is None and final["epoch"] == -1
    plain = save_random_model("yolov5n", tmp_path / "plain.pt")  # a stripped yolov5n without a teacher, for size
    assert os.path.getsize(wdir / "best.pt") < 1.1 * os.path.getsize(plain)
    assert not list(wdir.glob(".*.tmp"))


def test_resume_options_override_and_keep_one_source(tmp_path, teachers):
    """Item 3: --ft_weights/--device/--workers override the run's opt.yaml; the imitation settings come from the
    checkpoint's distill state."""
    from distill import Distiller
    from distill.options import resume_distill_options
    from utils.options import resume_options

    student = DetectionModel("yolov5n.yaml", nc=8)
    distiller = Distiller(
        student, teachers["wide"], "cpu", iou_factor=0.3, imitation_region="gtbox", imitation_boxes="matched"
    )
    last = tmp_path / "exp/weights/last.pt"
    opt = {**vars(train.parse_opt(True, args=[])), "ft_weights": "elsewhere.pt", "iou_factor": 0.9, "workers": 3}
    opt["imitation_boxes"] = "all"
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01).state_dict()  # a run in progress has one
    save_checkpoint(
        {"epoch": 0, "model": student, "optimizer": optimizer, "opt": opt, "distill": distiller.state_dict()}, last
    )
    (tmp_path / "exp/opt.yaml").write_text(yaml.safe_dump(opt))
    defaults = train.parse_opt(True, args=[])
    given = train.parse_opt(True, args=["--resume", str(last)])
    resumed = resume_options(given, defaults, state_options=resume_distill_options)
    assert resumed.ft_weights == str(teachers["wide"].resolve()) and resumed.iou_factor == 0.3
    assert resumed.imitation_region == "gtbox" and resumed.workers == 3 and resumed.imitation_boxes == "matched"
    state = {k: v for k, v in distiller.state_dict().items() if k != "imitation_boxes"}  # a run from before the flag
    assert Distiller.options_from_state(state)["imitation_boxes"] == "all"  # masked every level with every box
    given = train.parse_opt(True, args=["--resume", str(last), "--workers", "0", "--device", "cpu"])
    given.ft_weights = str(teachers["narrow"])
    resumed = resume_options(given, defaults, state_options=resume_distill_options)
    assert (resumed.workers, resumed.device, resumed.ft_weights) == (0, "cpu", str(teachers["narrow"].resolve()))


def test_bad_flags_one_line_before_data(tmp_path, tiny_data, teachers, monkeypatch):
    """Item 6: each bad flag is one UserError naming it and its range, before any data is loaded."""

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the flag was checked")

    monkeypatch.setattr(train, "create_dataloader", no_data)
    base = dict(data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, imgsz=64, project=str(tmp_path), **COMMON)
    cases = [
        (dict(epochs=0), "--epochs 0"),
        (dict(epochs=-1), "--epochs -1"),
        (dict(batch_size=0), "--batch-size 0"),
        (dict(batch_size=-2), "--batch-size -2"),
        (dict(batch_size=-1), "AutoBatch"),
        (dict(ft_weights=str(teachers["wide"]), adapter_kernel=2), "--adapter-kernel 2: use an odd size"),
        (dict(ft_weights=str(teachers["wide"]), adapter_kernel=0), "--adapter-kernel 0"),
        (dict(ft_weights=str(teachers["wide"]), iou_factor=-0.5), r"--iou-factor -0.5: .* \[0, 1\)"),
        (dict(ft_weights=str(teachers["wide"]), iou_factor=2.0), "--iou-factor 2.0"),
        (dict(ft_weights=str(teachers["wide"]), imitation_weight=-0.01), "--imitation-weight -0.01: must be >= 0"),
        (dict(cfg="yolov5n6.yaml", ft_weights=str(teachers["wide"]), imitation_layers="30"), "the teacher .* no such"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            train.run(**{**base, **kwargs})
    for text, message in (("train: [images\nval: x", "not valid YAML"), ("- a\n- b\n", "expected a mapping")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(UserError, match=rf"--data {bad}: {message}"):
            train.run(**{**base, "data": str(bad)})
    weights = save_random_model("yolov5n", tmp_path / "n.pt")
    for kwargs, message in ((dict(batch_size=0), "--batch-size 0"), (dict(imgsz=0), "--imgsz 0")):
        with pytest.raises(UserError, match=message):
            val.run(data=str(tiny_data), weights=str(weights), device="cpu", workers=0, **kwargs)


def test_label_class_beyond_names_stops(tmp_path, tiny_data):
    """Item 7: a data YAML with fewer names than the labels' classes stops, naming the label file, class and nc."""
    root = tmp_path / "data"
    source = yaml.safe_load(tiny_data.read_text())
    shutil.copytree(source["path"], root, ignore=shutil.ignore_patterns("*.cache", "*.yaml"))
    data = root / "two.yaml"
    data.write_text(yaml.safe_dump({**source, "path": str(root), "names": {0: "a", 1: "b"}}))
    with pytest.raises(UserError, match=r"labels/train/\S+\.txt: class \d exceeds nc=2"):
        train.run(data=str(data), cfg="yolov5n.yaml", epochs=1, imgsz=64, project=str(tmp_path), **COMMON)


def test_separate_teacher_layer_indices(teachers):
    """Item 8: teacher indices of their own, checked pair by pair; shared indices must name the same kind of layer."""
    from distill import Distiller, parse_imitation_layers

    assert parse_imitation_layers("17,20,23:23,26,29") == ([17, 20, 23], [23, 26, 29])
    assert parse_imitation_layers("detect") == ("detect", None) and parse_imitation_layers("default") == (None, None)
    assert parse_imitation_layers("neck") == ("neck", None)
    with pytest.raises(UserError, match="--imitation-layers"):
        parse_imitation_layers("17,20:x")
    student = DetectionModel("yolov5n.yaml", nc=8)
    distiller = Distiller(student, teachers["p6"], "cpu", [17, 20, 23], [23, 26, 29])
    assert (distiller.student_layers, distiller.teacher_layers, distiller.stride) == ([17, 20, 23], [23, 26, 29], 64)
    assert distiller.state_dict()["teacher_layers"] == [23, 26, 29]
    # layer 18 has stride 16 in both, but is a Conv in yolov5n and a Concat in yolov5n6: unrelated layers
    with pytest.raises(UserError, match="another architecture.*colon"):
        Distiller(student, teachers["p6"], "cpu", [18])
    with pytest.raises(UserError, match="teacher layer 26 has stride 16 .* layer 17 has stride 8"):
        Distiller(student, teachers["p6"], "cpu", [17], [26])
    with pytest.raises(UserError, match="teacher"):
        Distiller(student, teachers["wide"], "cpu", [17], [40])
