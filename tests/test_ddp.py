"""Two-process DDP (gloo, CPU) training with distillation through torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.yolo import DetectionModel
from tests.test_downloads import Release
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.downloads import RELEASE_URL_ENV

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("unlabeled", [False, True])
def test_ddp_gloo_two_ranks_with_distillation(tmp_path, tiny_data, unlabeled):
    """The default recipe (FGFI + output terms, balanced) under the static-graph wrapping CUDA runs (smart_DDP); with
    unlabeled, a stream of unlabelled images beside it (each rank its own share, a second forward per step)."""
    torch.manual_seed(0)
    teacher = DetectionModel("yolov5s.yaml", nc=8)
    save_checkpoint({"epoch": -1, "model": teacher.half(), "ema": None, "optimizer": None}, tmp_path / "t.pt")
    # the student by an official name missing on disk: fetched once, by rank 0, from a local "release"
    student = DetectionModel("yolov5n.yaml", nc=8)
    save_checkpoint({"epoch": -1, "model": student.half(), "ema": None, "optimizer": None}, tmp_path / "s.pt")
    release = Release()
    release.serve("/v7.0/yolov5s.pt", (tmp_path / "s.pt").read_bytes())
    release.thread.start()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(ROOT / "tests/ddp_worker.py"), str(tmp_path),
        "--weights", str(tmp_path / "w/yolov5s.pt"), "--data", str(tiny_data), "--epochs", "1", "--imgsz", "96", "--batch-size", "8",
        "--device", "cpu", "--workers", "0", "--noplots", "--ft_weights", str(tmp_path / "t.pt"),
        "--project", str(tmp_path), "--name", "ddp", "--exist-ok", "--save-period", "1",
    ]  # fmt: skip
    if unlabeled:
        cmd += ["--unlabeled", str(tiny_data.parent / "images/val"), "--unlabeled-batch-size", "4"]
    env = {**os.environ, RELEASE_URL_ENV: release.url("/v7.0")}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        release.server.shutdown()
        release.server.server_close()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert release.requests == ["/v7.0/yolov5s.pt"]  # one download, not one per rank
    assert (tmp_path / "done_rank0").exists() and (tmp_path / "done_rank1").exists()
    a0, a1 = torch.load(tmp_path / "adapters_rank0.pt"), torch.load(tmp_path / "adapters_rank1.pt")
    assert a0.keys() == a1.keys()
    for k in a0:
        assert torch.equal(a0[k], a1[k]), f"adapter {k} differs across ranks"
    ckpt = load_checkpoint(tmp_path / "ddp/weights/epoch0.pt")  # written by rank 0, not stripped (unlike last.pt)
    for k in a0:
        assert torch.equal(ckpt["distill"]["adapters"][k].float(), a0[k].float())
    assert type(ckpt["model"]) is DetectionModel
    assert "distill" not in load_checkpoint(tmp_path / "ddp/weights/last.pt")  # finished: a plain YOLOv5 checkpoint
    columns = (tmp_path / "ddp/results.csv").read_text().splitlines()[0]
    assert "train/kd_loss" in columns and ("train/kd_u_loss" in columns) == unlabeled
