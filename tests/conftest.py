"""Shared fixtures: a tiny copy of the built-in dataset and small checkpoints, made once per test session."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_RELEASE_URL = "http://127.0.0.1:9/yolov5-release"  # port 9 (discard): nothing listens, refused at once
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    # two cores: more intra-op threads than cores only adds contention between test processes
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    # no test reaches the internet: a missing yolov5s.pt is "downloaded" from a closed local port, in subprocesses too
    os.environ["YOLOV5_RELEASE_URL"] = OFFLINE_RELEASE_URL


@pytest.fixture(scope="session", autouse=True)
def no_internet():
    """utils.downloads may open 127.0.0.1 / localhost only; any other host fails at once, as on an offline machine."""
    import urllib.error
    import urllib.parse

    import utils.downloads

    real_urlopen = utils.downloads.urlopen

    def local_only(request, *args, **kwargs):
        host = urllib.parse.urlparse(getattr(request, "full_url", request)).hostname
        if host not in {"127.0.0.1", "localhost"}:
            raise urllib.error.URLError(f"tests never reach the internet ({host})")
        return real_urlopen(request, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils.downloads, "urlopen", local_only)
        yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A few images of the built-in synthetic dataset and a data YAML pointing at them."""
    import yaml

    from data.synthetic import NAMES, generate_dataset

    root = tmp_path_factory.mktemp("tiny_synthetic")
    generate_dataset(root, n_train=16, n_val=8, seed=1)
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(NAMES))}
    file = root / "tiny.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def save_random_model(cfg: str, file: Path, nc: int = 8) -> Path:
    """A random-weight model (seed 0) saved as a fp16 checkpoint in YOLOv5's layout, as --ft_weights loads one."""
    import torch

    from models.yolo import DetectionModel
    from utils.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = DetectionModel(f"{cfg}.yaml", nc=nc)
    model.names = {i: str(i) for i in range(nc)}
    file.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"epoch": -1, "model": model.half(), "ema": None, "optimizer": None, "opt": {}}, file)
    return file


@pytest.fixture(scope="session")
def teacher_pt(tmp_path_factory) -> Path:
    """A random yolov5s teacher (8 classes), twice as wide as yolov5n, saved in YOLOv5's checkpoint layout."""
    return save_random_model("yolov5s", tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture
def log_lines():
    """Messages utils.general.LOGGER emits during the test."""
    from utils.general import LOGGER

    class ListHandler(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    handler = ListHandler()
    LOGGER.addHandler(handler)
    yield handler.lines
    LOGGER.removeHandler(handler)
