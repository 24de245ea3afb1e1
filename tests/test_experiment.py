"""The main job end to end on a tiny dataset: teacher, student, distilled student, and the saved table."""

from __future__ import annotations

import pandas as pd
import pytest

import experiment
from utils.general import UserError

pytestmark = pytest.mark.slow


def test_experiment_trains_three_models_and_saves_a_table(tmp_path, tiny_data):
    stale = tmp_path / "student" / "results.csv"  # left by an earlier run in the same folder
    stale.parent.mkdir()
    stale.write_text("epoch,train/box_loss\n0,1.0\n1,1.0\n")
    df = experiment.run_experiment(
        "cpu", project=tmp_path, epochs=1, teacher_epochs=1, data=str(tiny_data), imgsz=96, batch=8, workers=0
    )
    assert list(df["model"]) == ["teacher", "student", "student + FGFI"]
    for run in ("teacher", "student", "distilled"):
        assert (tmp_path / run / "weights/best.pt").is_file()
    assert (
        "train/imitation_loss"
        in pd.read_csv(tmp_path / "distilled/results.csv", skipinitialspace=True).columns.str.strip()
    )
    assert len(pd.read_csv(stale)) == 1  # the rerun replaced the old run instead of appending to it
    saved = pd.read_csv(tmp_path / "results.csv")
    assert saved["mAP50_95"].between(0, 1).all() and len(saved) == 3
    assert "FGFI changes student mAP50-95" in (tmp_path / "results.md").read_text()


def test_experiment_reuses_a_given_teacher_or_says_it_is_missing(tmp_path):
    with pytest.raises(UserError, match="--teacher"):
        experiment.run_experiment("cpu", teacher=str(tmp_path / "missing.pt"), project=tmp_path)
