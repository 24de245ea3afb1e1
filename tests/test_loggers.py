"""TensorBoard events beside results.csv: every column as a scalar with the CSV's values, and the images."""

from __future__ import annotations

import pandas as pd
import pytest

import train

pytestmark = pytest.mark.slow


def test_tensorboard_events_match_results_csv(tmp_path, tiny_data, teacher_pt):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.run(
        data=str(tiny_data), cfg="yolov5n.yaml", ft_weights=str(teacher_pt), epochs=2, imgsz=64, batch_size=8,
        device="cpu", workers=0, project=str(tmp_path), name="tb", hyp="hyp.scratch-low.yaml",
    )  # fmt: skip
    run_dir = tmp_path / "tb"
    assert list(run_dir.glob("events.out.tfevents.*"))
    df = pd.read_csv(run_dir / "results.csv", skipinitialspace=True)
    df.columns = df.columns.str.strip()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    columns = [c for c in df.columns if c != "epoch"]
    assert sorted(events.Tags()["scalars"]) == sorted(columns)
    assert "train/imitation_loss" in columns
    for column in columns:
        logged = events.Scalars(column)
        assert [e.step for e in logged] == df["epoch"].tolist(), column
        assert [e.value for e in logged] == pytest.approx(df[column].tolist(), rel=1e-4, abs=1e-9), column
    images = set(events.Tags()["images"])
    assert {"Images/train_batch0", "Images/imitation_masks0", "Results/results", "Results/labels"} <= images
