"""A run killed with SIGKILL mid-epoch and resumed ends with the very weights of the same run left alone.

Real processes, real kills: train.py runs as a subprocess (FGFI on, two loader workers, --save-period 1) and is killed
one step into its second epoch, where tests/pause_worker.py holds it; `--resume` continues it. Every float tensor of
the final full-precision checkpoint (student, EMA, adapters, optimizer state) and every results.csv value must equal
the uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.general import UserError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3


def _command(data: Path, teacher: Path, project: Path, name: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "--data", str(data), "--cfg", "yolov5n.yaml", "--ft_weights",
        str(teacher), "--epochs", str(EPOCHS), "--img", "64", "--batch-size", "4", "--workers", "2", "--device", "cpu",
        "--noplots", "--save-period", "1", "--project", str(project), "--name", name, "--seed", "3",
        "--hyp", "hyp.scratch-low.yaml",
    ]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _epoch_of(last: Path) -> int:
    try:
        return int(load_checkpoint(last)["epoch"])
    except Exception:  # not written yet, or being replaced
        return -2


def _kill_during_epoch(cmd: list[str], last: Path, epoch: int) -> None:
    """Run train.py held still one step into `epoch` (tests/pause_worker.py), then SIGKILL it: the kill lands mid-epoch
    however fast the epoch is."""
    marker = last.parent.parent / "holding"
    worker = [cmd[0], str(ROOT / "tests/pause_worker.py"), str(marker), str(epoch), *cmd[2:]]
    log = last.parents[2] / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(worker, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert _epoch_of(last) == epoch - 1  # killed before the epoch finished: it is redone


def _float_tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in ckpt["model"].state_dict().items()}
    out.update({f"ema.{k}": v for k, v in ckpt["ema"].state_dict().items()})
    out.update({f"adapters.{k}": v for k, v in ckpt["distill"]["adapters"].items()})
    for i, state in ckpt["optimizer"]["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    for i, state in ((ckpt["distill"].get("decoupled") or {}).get("state") or {}).items():  # --distill-decouple
        out.update({f"decoupled.{i}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.parametrize("unlabeled", [False, True])
def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, tiny_data, teacher_pt, unlabeled):
    """unlabeled: with a stream of unlabelled images (the val images, 2 a step) beside the labelled ones, whose order
    and augmentations the resumed run must continue exactly (they reach the weights through the output terms); and
    under AdamW with --distill-decouple, whose terms' optimizer state the resumed run must continue too."""
    extra = ["--unlabeled", str(tiny_data.parent / "images/val"), "--unlabeled-batch-size", "2"] if unlabeled else []
    extra += ["--optimizer", "AdamW", "--distill-decouple"] if unlabeled else []
    _run(_command(tiny_data, teacher_pt, tmp_path, "alone") + extra)
    cmd = _command(tiny_data, teacher_pt, tmp_path, "killed") + extra
    wdir = tmp_path / "killed/weights"
    _kill_during_epoch(cmd, wdir / "last.pt", epoch=1)
    _run([sys.executable, str(ROOT / "train.py"), "--resume", str(wdir / "last.pt")])

    final = f"epoch{EPOCHS - 1}.pt"  # --save-period checkpoints stay full precision, with optimizer and adapters
    alone = _float_tensors(load_checkpoint(tmp_path / "alone/weights" / final))
    resumed = _float_tensors(load_checkpoint(wdir / final))
    assert alone.keys() == resumed.keys()
    assert next(v for k, v in alone.items() if k.startswith("model.")).dtype == torch.float32
    differ = [k for k in alone if not torch.equal(alone[k], resumed[k])]
    assert not differ, f"{len(differ)} of {len(alone)} tensors differ, e.g. {differ[:5]}"
    # the stripped final checkpoints too, and every logged value of every epoch
    for f in ("last.pt", "best.pt"):
        a, b = (load_checkpoint(d / f)["model"].state_dict() for d in (tmp_path / "alone/weights", wdir))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    csv_a, csv_b = (pd.read_csv(d / "results.csv") for d in (tmp_path / "alone", tmp_path / "killed"))
    pd.testing.assert_frame_equal(csv_a, csv_b, check_exact=True)
    assert ("train/kd_u_loss" in csv_a.columns.str.strip()) == unlabeled
    assert any(k.startswith("decoupled.") for k in alone) == unlabeled
    # --save-period: every epoch's file exists after the kill, the redone epoch included
    assert sorted(p.name for p in wdir.glob("epoch*.pt")) == [f"epoch{e}.pt" for e in range(EPOCHS)]
    assert not list(wdir.glob(".*.tmp"))


def test_resume_after_a_kill_during_the_first_last_pt_write(tmp_path, tiny_data):
    """Killed while last.pt of epoch 0 was being written: best.pt (written first) and a temp file are left. --resume
    of last.pt continues from best.pt, and the temp file of the dead process is removed."""
    import train

    common = dict(imgsz=64, batch_size=4, device="cpu", workers=0, noplots=True, exist_ok=True)
    train.run(
        data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, project=str(tmp_path), name="src", save_period=1, **common
    )
    wdir = tmp_path / "run/weights"
    wdir.mkdir(parents=True)
    epoch0 = load_checkpoint(tmp_path / "src/weights/epoch0.pt")
    epoch0["opt"]["epochs"] = 2
    epoch0["opt"]["save_dir"] = str(tmp_path / "run")
    save_checkpoint(epoch0, wdir / "best.pt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = wdir / f".last.pt.{dead.pid}.tmp"
    tmp.write_bytes(b"half a checkpoint")

    train.run(resume=str(wdir / "last.pt"))
    assert not tmp.exists()
    assert load_checkpoint(wdir / "last.pt")["epoch"] == -1  # finished: epoch 1 trained, then stripped
    df = pd.read_csv(tmp_path / "run/results.csv", skipinitialspace=True)
    assert list(df["epoch"]) == [1]  # the copied folder had no results.csv: only the resumed epoch is logged


def test_refused_resume_writes_nothing(tmp_path, tiny_data, teacher_pt):
    """--resume of a finished or stripped checkpoint, or --ft_weights added to a run without a teacher: one line,
    and nothing created or rewritten beside the checkpoint."""
    import train

    common = dict(imgsz=64, batch_size=4, device="cpu", workers=0, noplots=True, exist_ok=True)
    train.run(
        data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, project=str(tmp_path), name="r", save_period=1, **common
    )
    run_dir = tmp_path / "r"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(UserError, match="nothing to resume"):
        train.run(resume=str(run_dir / "weights/last.pt"))  # finished and stripped
    with pytest.raises(UserError, match="nothing to resume"):
        train.run(resume=str(teacher_pt))  # a plain model file
    assert not (teacher_pt.parent / "opt.yaml").exists() and not (teacher_pt.parent / "weights").exists()
    with pytest.raises(UserError, match=r"had no teacher.*--weights .*epoch0\.pt --ft_weights"):
        train.run(resume=str(run_dir / "weights/epoch0.pt"), ft_weights=str(teacher_pt))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


@pytest.mark.parametrize("flag", ["--multi-scale", "--image-weights"])
def test_resume_with_other_workers_is_exact(tmp_path, tiny_data, teacher_pt, flag):
    """--workers is a flag a resume may change: 0 -> 2 with --multi-scale or --image-weights gave other weights after
    the resume (the main process's RNG, reseeded by the loader with --workers 0, drew the sizes and images). The run
    resumed from its epoch-0 checkpoint with --workers 2 ends with the very weights of the run left alone."""
    import shutil

    cmd = _command(tiny_data, teacher_pt, tmp_path, "alone")
    cmd[cmd.index("--epochs") + 1] = "2"
    cmd[cmd.index("--workers") + 1] = "0"
    _run([*cmd, flag])
    alone = tmp_path / "alone"
    resumed = tmp_path / "resumed"
    shutil.copytree(alone, resumed)
    (resumed / "weights/epoch0.pt").replace(resumed / "weights/last.pt")  # the run as it was after epoch 0
    (resumed / "weights/best.pt").unlink()
    _run([sys.executable, str(ROOT / "train.py"), "--resume", str(resumed / "weights/last.pt"), "--workers", "2"])
    want = load_checkpoint(alone / "weights/last.pt")["model"].state_dict()
    got = load_checkpoint(resumed / "weights/last.pt")["model"].state_dict()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ, e.g. {differ[:3]}"
