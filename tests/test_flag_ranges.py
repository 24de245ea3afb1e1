"""Out-of-range flags are one line naming the flag, before any data or model is loaded; a refused run leaves the disk
as it found it."""

from __future__ import annotations

import pytest

import detect
import export
import train
import val
from utils.general import UserError


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(label_smoothing=2.0), r"--label-smoothing 2.0: must be in \[0, 1\)"),
        (dict(label_smoothing=-0.1), r"--label-smoothing -0.1: must be in \[0, 1\)"),
        (dict(workers=-1), r"--workers -1: must be in \[0, inf\)"),
        (dict(seed=-1), r"--seed -1: must be in \[0, "),
        (dict(evolve=-3), r"--evolve -3: must be in \[1, inf\)"),
        (dict(cache="foo"), r"--cache foo: use ram, disk, val"),
        (dict(ft_weights="T", adapter_kernel=99), r"--adapter-kernel 99: must be in \[1, 7\]"),
        (dict(ft_weights="T", imitation_layers="16,16"), r"--imitation-layers '16,16': use"),
        (dict(ft_weights="T", imitation_layers=","), r"--imitation-layers ',': use"),
        (dict(ft_weights="T", distill_cap=-1.0), r"--distill-cap -1.0: must be in \[0, inf\)"),
    ],
)
def test_train_flags_out_of_range_are_one_line(tmp_path, tiny_data, teacher_pt, kwargs, message):
    kwargs = {k: str(teacher_pt) if v == "T" else v for k, v in kwargs.items()}
    with pytest.raises(UserError, match=message) as e:
        train.run(data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, imgsz=64, project=str(tmp_path), **kwargs)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # refused before a run folder was made


def test_refused_run_leaves_no_folder(tmp_path, tiny_data):
    """A corrupt teacher is refused after the run folder is made: the folder goes with the refusal."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    project = tmp_path / "runs"
    with pytest.raises(UserError, match="bad.pt"):
        train.run(
            data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, imgsz=64, project=str(project), ft_weights=str(bad),
            device="cpu", workers=0,
        )  # fmt: skip
    assert not project.exists() or list(project.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(conf_thres=2.0), r"--conf-thres 2.0: must be in \[0, 1\]"),
        (dict(iou_thres=-1.0), r"--iou-thres -1.0: must be in \[0, 1\]"),
        (dict(imgsz=[1, 2, 3]), r"--imgsz 1 2 3: give one size or height and width"),
    ],
)
def test_detect_flags_out_of_range_are_one_line(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        detect.run(weights=str(tmp_path / "missing.pt"), source=str(tmp_path), project=str(tmp_path), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(conf_thres=-1.0), r"--conf-thres -1.0: must be in \[0, 1\]"),
        (dict(iou_thres=1.5), r"--iou-thres 1.5: must be in \[0, 1\]"),
        (dict(workers=-1), r"--workers -1: must be in \[0, inf\)"),
    ],
)
def test_val_flags_out_of_range_are_one_line(tmp_path, tiny_data, kwargs, message):
    with pytest.raises(UserError, match=message):
        val.run(data=str(tiny_data), weights=str(tmp_path / "missing.pt"), project=str(tmp_path), **kwargs)


@pytest.mark.parametrize("opset", [1, 99])
def test_export_opset_out_of_range_is_one_line(tmp_path, opset):
    with pytest.raises(UserError, match=rf"--opset {opset}: must be in \[7, 20\]"):
        export.run(weights=str(tmp_path / "missing.pt"), include=("onnx",), opset=opset)


def test_experiment_arms_and_seeds_are_checked(tmp_path):
    import experiment

    for value in ("-1", "0,-2", "1,1", ""):
        with pytest.raises(UserError, match="--seeds"):
            experiment.parse_seeds(value)
    with pytest.raises(UserError, match="--arms names no arm"):
        experiment.run_experiment("cpu", project=tmp_path, arms=[])


def test_folder_given_as_a_file_and_img_size_floor_say_what_is_wrong(tmp_path, log_lines):
    from utils.general import check_file, check_img_size

    with pytest.raises(UserError, match=r"--ft_weights '.*' is a folder: pass the file in it"):
        check_file(tmp_path, "--ft_weights")
    assert check_img_size(64, 64, floor=128) == 128
    assert any("must be at least 128 (2 x the largest stride, 64)" in line for line in log_lines)
    assert check_img_size(100, 32) == 128
    assert any("must be a multiple of max stride 32" in line for line in log_lines)


def test_check_range_refuses_nan_and_inf_even_unbounded():
    from utils.general import check_range

    for value in (float("nan"), float("inf")):
        with pytest.raises(UserError, match=r"--adapter-warmup (nan|inf): must be in \[0, inf\)"):
            check_range("--adapter-warmup", value, 0)
    check_range("--adapter-warmup", 3.0, 0)
