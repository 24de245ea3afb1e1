"""Bad hyp files, data YAMLs and --channels-last with a teacher: one line naming the file and key, or it works."""

from __future__ import annotations

import pytest
import yaml

import train
from utils.general import ROOT, UserError, check_dataset, load_hyp

HYP = ROOT / "data/hyps/hyp.scratch-low.yaml"


def write_hyp(tmp_path, text: str):
    file = tmp_path / "hyp.bad.yaml"
    file.write_text(text)
    return file


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: "lr0: [0.01\n", "not valid YAML"),
        (lambda h: "- 1\n- 2\n", "expected a mapping of hyperparameters"),
        (lambda h: yaml.safe_dump({k: v for k, v in h.items() if k != "weight_decay"}), "no 'weight_decay:' key"),
        (lambda h: yaml.safe_dump({**h, "kd_temperature": "abc"}), "kd_temperature: 'abc' is not a number"),
        (lambda h: yaml.safe_dump({**h, "lr0": None}), "lr0: None is not a number"),
    ],
)
def test_bad_hyp_file_is_one_line_naming_file_and_key(tmp_path, tiny_data, edit, message):
    file = write_hyp(tmp_path, edit(yaml.safe_load(HYP.read_text())))
    with pytest.raises(UserError, match=message) as e:
        load_hyp(file)
    assert str(file) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=message):  # train.py's own path
        train.run(data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, imgsz=64, project=str(tmp_path / "r"), hyp=file)


def test_every_shipped_hyp_file_loads():
    for file in sorted((ROOT / "data/hyps").glob("*.yaml")):
        assert load_hyp(file)["lr0"] > 0


def data_yaml(tmp_path, **fields):
    file = tmp_path / "d.yaml"
    base = {"path": str(tmp_path / "nowhere"), "train": "images/train", "val": "images/val", "names": ["a", "b"]}
    file.write_text(yaml.safe_dump({**base, **fields}))
    return file


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(names=5), r"names: 5 must list the class names"),
        (dict(download="ftp://example.org/x.zip"), r"download: 'ftp://example.org/x.zip' is neither"),
        (dict(download="raise RuntimeError('mirror gone')"), r"download: step failed \(RuntimeError: mirror gone\)"),
        (dict(download="def broken(:\n"), r"download: step is not valid Python"),
        (dict(download=7), r"download: 7 is neither"),
    ],
)
def test_bad_data_yaml_is_one_line(tmp_path, fields, message):
    file = data_yaml(tmp_path, **fields)
    with pytest.raises(UserError, match=message) as e:
        check_dataset(file)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_channels_last_trains_with_a_teacher(tmp_path, tiny_data, teacher_pt):
    """--channels-last with --ft_weights raised 'required rank 4 tensor' (Detect's 3-D anchors); now it trains, and
    the student's conv weights are channels_last while its anchors keep their shape."""
    train.run(
        data=str(tiny_data), cfg="yolov5n.yaml", ft_weights=str(teacher_pt), epochs=1, imgsz=64, batch_size=8,
        device="cpu", workers=0, noplots=True, noautoanchor=True, project=str(tmp_path), name="cl", channels_last=True,
    )  # fmt: skip
    assert (tmp_path / "cl/weights/last.pt").is_file()
