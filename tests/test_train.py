"""End-to-end training on CPU: plain, resumed, distilled (teacher wider than student) and distilled + resumed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import distill.distiller
import train
import val
from distill.distiller import parse_imitation_layers
from distill.sparse import default_max_share
from models.yolo import DetectionModel
from utils.checkpoint import attempt_load, load_checkpoint
from utils.general import UserError
from utils.torch_utils import cpu_has_bf16_matmul

pytestmark = pytest.mark.slow

COMMON = dict(imgsz=96, batch_size=8, device="cpu", workers=0, noplots=True, exist_ok=True, hyp="hyp.scratch-low.yaml")


def _results(run_dir):
    df = pd.read_csv(run_dir / "results.csv", skipinitialspace=True)
    df.columns = [c.strip() for c in df.columns]
    return df


class _Interrupt(Exception):
    pass


def _interrupt_after_first_epoch(monkeypatch):
    """Make the second per-epoch validation raise, as if the run was killed after epoch 0 was saved."""
    real_run, calls = val.run, []

    def fake_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Interrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(train.validate, "run", fake_run)


def test_train_one_epoch_end_to_end(tmp_path, tiny_data):
    train.run(data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, project=str(tmp_path), name="plain", **COMMON)
    run_dir = tmp_path / "plain"
    df = _results(run_dir)
    assert list(df["epoch"]) == [0]
    assert {"train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/mAP_0.5:0.95", "x/lr0"} <= set(df.columns)
    assert "train/imitation_loss" not in df.columns
    assert (run_dir / "opt.yaml").is_file() and (run_dir / "hyp.yaml").is_file()
    for f in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run_dir / "weights" / f)
        assert ckpt["optimizer"] is None and ckpt["epoch"] == -1  # stripped at the end, as YOLOv5
        assert type(ckpt["model"]) is DetectionModel and ckpt["model"].nc == 8
    model = attempt_load(run_dir / "weights/best.pt")
    out = model(torch.zeros(1, 3, 96, 96))[0]
    assert out.shape[-1] == 5 + 8


def test_resume_continues_an_interrupted_run(tmp_path, tiny_data, monkeypatch, log_lines):
    _interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(_Interrupt):
        train.run(data=str(tiny_data), cfg="yolov5n.yaml", epochs=2, project=str(tmp_path), name="r", **COMMON)
    last = tmp_path / "r/weights/last.pt"
    assert load_checkpoint(last)["epoch"] == 0
    monkeypatch.undo()

    train.run(resume=str(last), epochs=5, imitation_weight=0.5, workers=0)
    assert any(
        "ignoring --epochs, --imitation-weight" in line and "only --ft_weights, --device, --workers" in line
        for line in log_lines
    ), log_lines  # the run's own 2 epochs, said in one line; --workers is an allowed override
    df = _results(tmp_path / "r")
    assert list(df["epoch"]) == [0, 1]  # the interrupted epoch kept, the next one appended, one header
    assert load_checkpoint(last)["epoch"] == -1  # finished and stripped
    with pytest.raises(UserError, match="nothing to resume"):
        train.run(resume=str(last))


def test_distillation_end_to_end_and_resume(tmp_path, tiny_data, teacher_pt, monkeypatch):
    teachers = []
    real_load_teacher = distill.distiller.load_teacher

    def recording_load_teacher(*args, **kwargs):
        t = real_load_teacher(*args, **kwargs)
        teachers.append((t, {k: v.clone() for k, v in t.state_dict().items()}))
        return t

    monkeypatch.setattr(distill.distiller, "load_teacher", recording_load_teacher)
    paths = []  # per training step: (masked share, the sparse_max_share used, sparse path taken) of the level
    real_masked_cells = distill.distiller.masked_cells

    def recording_masked_cells(masks, max_share):
        cells = real_masked_cells(masks, max_share)
        paths.extend((float(m.mean()), max_share, c is not None) for m, c in zip(masks, cells))
        return cells

    monkeypatch.setattr(distill.distiller, "masked_cells", recording_masked_cells)
    _interrupt_after_first_epoch(monkeypatch)
    # the random teacher fits no better than the student: ungated, so the adapters train in both epochs
    kwargs = dict(
        data=str(tiny_data), cfg="yolov5n.yaml", ft_weights=str(teacher_pt), project=str(tmp_path), distill_gate=False
    )
    with pytest.raises(_Interrupt):
        train.run(epochs=2, name="d", **kwargs, **COMMON)
    last = tmp_path / "d/weights/last.pt"
    ckpt = load_checkpoint(last)
    adapters_epoch0 = ckpt["distill"]["adapters"]
    assert ckpt["distill"]["imitation_layers"] == [16]
    # --distill-precision auto, resolved on this CPU and saved for --resume
    bf16 = cpu_has_bf16_matmul()
    assert ckpt["distill"]["distill_precision"] == ("bf16" if bf16 else "fp32")
    assert teachers[0][0].model[0].conv.weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
    # training takes the sparse adapter wherever the masked share is below the measured crossover (for the precision)
    limit_cpu = default_max_share("cpu", bf16=bf16)
    assert paths and all(limit == limit_cpu and sparse == (share < limit) for share, limit, sparse in paths)
    assert any(sparse for *_, sparse in paths), paths
    # teacher 2x wider than the student: the adapter maps 128 -> 256 channels at layer 16 of yolov5n/s
    weight = next(v for k, v in adapters_epoch0.items() if k.endswith("weight") and v.dim() == 4)
    assert weight.shape[:2] == (256, 128) and weight.shape[2:] == (3, 3)
    # the saved student is a plain YOLOv5 model: no adapter or teacher tensors inside it
    for key in ("model", "ema"):
        assert type(ckpt[key]) is DetectionModel
        sd = ckpt[key].state_dict()
        assert set(sd) == set(DetectionModel("yolov5n.yaml", nc=8).state_dict())
    # the frozen teacher: no parameter or BatchNorm statistic moved during the training epoch
    teacher, before = teachers[0]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k

    monkeypatch.setattr(train.validate, "run", val.run)
    restored, created = [], []
    real_adapters = distill.distiller.FeatureAdapters

    class RecordingAdapters(real_adapters):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

        def load_state_dict(self, state_dict, *args, **kwargs):
            restored.append({k: v.clone() for k, v in state_dict.items()})
            return super().load_state_dict(state_dict, *args, **kwargs)

    monkeypatch.setattr(distill.distiller, "FeatureAdapters", RecordingAdapters)
    train.run(resume=str(last))
    assert restored and all(torch.equal(restored[0][k], adapters_epoch0[k]) for k in adapters_epoch0)
    assert len(teachers) == 2  # the teacher was loaded again for the resumed run
    assert next(teachers[1][0].parameters()).dtype == next(teachers[0][0].parameters()).dtype  # same precision
    df = _results(tmp_path / "d")
    assert list(df["epoch"]) == [0, 1]
    assert "train/imitation_loss" in df.columns and (df["train/imitation_loss"] > 0).all()
    assert "val/imitation_loss" not in df.columns
    assert "distill" not in load_checkpoint(last)  # finished: stripped to a plain YOLOv5 checkpoint
    trained = created[-1].state_dict()
    assert not any(
        torch.equal(trained[k], adapters_epoch0[k].float()) for k in adapters_epoch0 if k.endswith("weight")
    )  # the adapter kept training after the resume


def test_bad_flags_give_one_line_errors(tmp_path, tiny_data):
    with pytest.raises(UserError, match="--cfg"):
        train.run(data=str(tiny_data), cfg="no_such_model.yaml", epochs=1, project=str(tmp_path), **COMMON)
    with pytest.raises(UserError, match="--ft_weights"):
        train.run(
            data=str(tiny_data),
            cfg="yolov5n.yaml",
            ft_weights=str(tmp_path / "missing.pt"),
            epochs=1,
            project=str(tmp_path),
            **COMMON,
        )
    with pytest.raises(UserError, match="--imitation-layers"):
        parse_imitation_layers("sixteen")


def test_output_distillation_end_to_end_and_resume(tmp_path, tiny_data, monkeypatch):
    """--kd-weight and --box-kd-weight beside FGFI: their own columns, the teacher's anchors on the student (AutoAnchor
    skipped at 96 px, where it would move them), the settings back on --resume, a stripped final checkpoint. The
    shipped teacher (trained on this data): a random one is confident nowhere, so its box term would be 0."""
    teacher_pt = Path(__file__).resolve().parents[1] / "weights/yolov5s-synthetic.pt"
    _interrupt_after_first_epoch(monkeypatch)
    kwargs = dict(data=str(tiny_data), cfg="yolov5n.yaml", ft_weights=str(teacher_pt), project=str(tmp_path))
    with pytest.raises(_Interrupt):
        train.run(epochs=2, name="kd", kd_weight=0.5, box_kd_weight=0.05, kd_temperature=2.0, **kwargs, **COMMON)
    last = tmp_path / "kd/weights/last.pt"
    state = load_checkpoint(last)["distill"]
    assert (state["kd_weight"], state["box_kd_weight"], state["kd_temperature"]) == (0.5, 0.05, 2.0)
    teacher = attempt_load(teacher_pt)
    assert torch.equal(load_checkpoint(last)["model"].model[-1].anchors.float(), teacher.model[-1].anchors.float())

    monkeypatch.setattr(train.validate, "run", val.run)
    weights = []
    real_init = distill.distiller.Distiller.__init__

    def recording_init(self, *args, **kw):
        real_init(self, *args, **kw)
        weights.append((dict(self.loss_weights), self.term_settings["kd_temperature"]))

    monkeypatch.setattr(distill.distiller.Distiller, "__init__", recording_init)
    train.run(resume=str(last))
    assert weights == [({"imitation": 0.01, "kd": 0.5, "box_kd": 0.05}, 2.0)]  # the run's terms, from the checkpoint
    df = _results(tmp_path / "kd")
    assert list(df["epoch"]) == [0, 1]
    for name in ("imitation", "kd", "box_kd"):
        assert (df[f"train/{name}_loss"] > 0).all(), name
        assert f"val/{name}_loss" not in df.columns
    assert "distill" not in load_checkpoint(last)
