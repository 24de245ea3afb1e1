"""Folders that cannot be written: one line naming the flag and the folder, before any work; nothing created.

As root (CI here) permission bits do not stop writes, so a read-only folder is simulated where needed by making
os.access deny it; a parent that is a file is a real failure for every user.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import detect
import export
import train
import val
from utils.checkpoint import save_checkpoint
from utils.general import UserError, check_writable

COMMON = dict(imgsz=64, batch_size=4, device="cpu", workers=0, noplots=True, exist_ok=True)


@pytest.fixture
def read_only(monkeypatch):
    """Make os.access deny writes under the folders added to the returned list (root ignores chmod)."""
    folders: list[Path] = []
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and any(Path(path).absolute().is_relative_to(f) for f in folders):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return folders


def test_check_writable(tmp_path, read_only):
    check_writable(tmp_path / "new/deeper", "--project")  # missing folders: their existing parent is checked
    assert not (tmp_path / "new").exists()  # nothing created
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^--project .*file/runs: .*file is a file, not a folder"):
        check_writable(tmp_path / "file/runs", "--project")
    read_only.append(tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    with pytest.raises(UserError, match=r"^--project .*ro/exp: .*ro is not writable; pick a folder"):
        check_writable(tmp_path / "ro/exp", "--project")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_real_permissions(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(UserError, match="is not writable"):
            check_writable(tmp_path / "ro/exp", "--project")
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_entry_points_refuse_a_folder_they_cannot_write(tmp_path, tiny_data, teacher_pt, read_only):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only.append(ro)
    with pytest.raises(UserError, match=r"^--project .*ro/exp: .*not writable"):
        train.run(data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, project=str(ro), name="exp", **COMMON)
    with pytest.raises(UserError, match=r"^--project .*ro/exp: .*not writable"):
        val.run(data=str(tiny_data), weights=str(teacher_pt), imgsz=64, device="cpu", project=str(ro), name="exp")
    source = next((tiny_data.parent / "images/val").glob("*"))
    with pytest.raises(UserError, match=r"^--project .*ro/exp: .*not writable"):
        detect.run(weights=str(teacher_pt), source=str(source), imgsz=64, device="cpu", project=str(ro), name="exp")
    weights = ro / "model.pt"
    shutil.copy(teacher_pt, weights)
    with pytest.raises(UserError, match=r"^--weights .*ro: .*not writable"):
        export.run(weights=str(weights), include=("torchscript",), imgsz=64)
    assert sorted(p.name for p in ro.iterdir()) == ["model.pt"]  # nothing written by any of them


def test_resume_of_a_run_in_a_folder_that_became_read_only(tmp_path, tiny_data, read_only):
    train.run(
        data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, project=str(tmp_path), name="r", save_period=1, **COMMON
    )
    read_only.append(tmp_path / "r")
    with pytest.raises(UserError, match=r"^--resume .*r: .*not writable"):
        train.run(resume=str(tmp_path / "r/weights/epoch0.pt"))


def test_checkpoint_folder_deleted_during_the_write(tmp_path, monkeypatch):
    folder = tmp_path / "run/weights"
    real_replace = os.replace

    def replace_after_deletion(src, dst):
        shutil.rmtree(folder)  # the run folder removed while torch.save wrote the temporary file
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_deletion)
    with pytest.raises(
        UserError, match=r"^could not write checkpoint .*last\.pt .*is its folder .*weights still there"
    ):
        save_checkpoint({"epoch": 0, "model": torch.nn.Linear(1, 1)}, folder / "last.pt")
    monkeypatch.undo()
    save_checkpoint({"epoch": 0}, folder / "last.pt")  # the folder is made again by the next write
    assert (folder / "last.pt").is_file()
