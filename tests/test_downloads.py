"""Weights and datasets by name (utils/downloads.py) against a local HTTP server: downloads land where YOLOv5 puts
them and load through the real entry points; every failure is one UserError line and leaves nothing behind."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
import zipfile
from copy import deepcopy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

import utils.downloads as downloads
from utils.checkpoint import attempt_load, load_checkpoint, save_checkpoint
from utils.general import UserError, check_dataset, check_file

ROOT = Path(__file__).resolve().parents[1]


class Release:
    """A local HTTP server: routes {path: (body, Content-Length sent)}, anything else a 404; records request paths."""

    def __init__(self):
        self.routes: dict[str, tuple[bytes, int]] = {}
        self.requests: list[str] = []
        release = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                release.requests.append(self.path)
                if self.path not in release.routes:
                    self.send_error(404)
                    return
                body, length = release.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)  # HTTP/1.0: the connection closes here, so a short body is a truncated one

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def serve(self, path: str, body: bytes, length: int | None = None) -> str:
        self.routes[path] = (body, len(body) if length is None else length)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    """A narrow random yolov5n (8 classes, as the tiny dataset) saved in YOLOv5's checkpoint layout."""
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "models/yolov5n.yaml").read_text()) | {"width_multiple": 0.125}  # 2 CPU cores
    model = DetectionModel(cfg, nc=8)
    model.names = {i: f"class{i}" for i in range(8)}
    file = tmp_path_factory.mktemp("served") / "model.pt"
    save_checkpoint({"epoch": -1, "model": deepcopy(model).half(), "ema": None, "optimizer": None, "opt": {}}, file)
    return file.read_bytes()


@pytest.fixture(scope="module")
def server(checkpoint_bytes):
    release = Release()
    release.thread.start()
    for name in "yolov5n.pt", "yolov5s.pt", "yolov5x.pt":
        release.serve(f"/v7.0/{name}", checkpoint_bytes)
    release.serve("/v7.0/yolov5l.pt", checkpoint_bytes[:100_000], length=len(checkpoint_bytes))  # cut off
    yield release
    release.server.shutdown()
    release.server.server_close()


@pytest.fixture
def release(server, checkpoint_bytes, monkeypatch):
    """The server as the YOLOv5 release; yolov5n.pt's known size and hash are those of the served file."""
    monkeypatch.setenv(downloads.RELEASE_URL_ENV, server.url("/v7.0"))
    known = (len(checkpoint_bytes), hashlib.sha256(checkpoint_bytes).hexdigest())
    monkeypatch.setattr(downloads, "KNOWN_FILES", {"yolov5n.pt": known})
    server.requests.clear()
    return server


@pytest.fixture(scope="module")
def closed_port():
    """A local port that refuses connections: bound, never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def assert_nothing_left(folder: Path) -> None:
    """No temporary file, no target, no staging folder: the folder is empty (or was never made)."""
    assert not folder.exists() or sorted(p.name for p in folder.iterdir()) == []


def test_names_urls_and_the_suite_stays_offline(monkeypatch):
    assert len(downloads.RELEASE_ASSETS) == 10 and {"yolov5n.pt", "yolov5x6.pt"} <= set(downloads.RELEASE_ASSETS)
    assert downloads.KNOWN_FILES["yolov5n.pt"][0] == 4_062_133
    assert os.environ[downloads.RELEASE_URL_ENV].startswith("http://127.0.0.1:")  # conftest: nothing reaches out
    monkeypatch.setenv(downloads.RELEASE_URL_ENV, "http://127.0.0.1:1/mirror/")
    assert downloads.release_url() == "http://127.0.0.1:1/mirror"
    monkeypatch.delenv(downloads.RELEASE_URL_ENV)
    assert downloads.release_url() == "https://github.com/ultralytics/yolov5/releases/download/v7.0"


def test_internet_is_refused_in_tests(tmp_path):
    with pytest.raises(downloads.DownloadError, match="never reach the internet"):
        downloads.fetch("https://example.com/yolov5s.pt", tmp_path / "yolov5s.pt")
    assert_nothing_left(tmp_path)


def test_weights_by_name_download_and_validate(release, tiny_data, checkpoint_bytes, tmp_path):
    import val

    weights = tmp_path / "weights" / "yolov5n.pt"
    results, maps, _ = val.run(str(tiny_data), weights=str(weights), batch_size=8, imgsz=64, workers=0,
                               project=tmp_path / "runs", plots=False, conf_thres=0.5)  # fmt: skip
    assert len(results) == 4 and maps.shape == (8,)
    assert weights.read_bytes() == checkpoint_bytes  # checked against the (patched) known size and sha256
    assert sorted(p.name for p in weights.parent.iterdir()) == ["yolov5n.pt"]  # no temporary file left
    assert release.requests == ["/v7.0/yolov5n.pt"]
    attempt_load(weights)  # there now: not fetched again
    assert release.requests == ["/v7.0/yolov5n.pt"]


def test_every_entry_point_fetches_by_name(release, checkpoint_bytes, tmp_path, monkeypatch):
    import detect
    import export

    monkeypatch.chdir(tmp_path)
    assert check_file("yolov5s.pt", "--ft_weights") == "yolov5s.pt"  # train.py's --ft_weights (and --weights)
    assert Path("yolov5s.pt").read_bytes() == checkpoint_bytes
    model, names = detect._load_model("d/yolov5n.pt", torch.device("cpu"), None)
    assert model.pt and len(names) == 8 and Path("d/yolov5n.pt").is_file()
    export.load_for_export("e/yolov5x.pt", torch.device("cpu"), inplace=False, dynamic=False)
    hub_model = torch.hub.load(str(ROOT), "yolov5n", source="local")  # into the current folder, as YOLOv5
    assert hub_model.model.model[-1].nc == 8 and Path("yolov5n.pt").read_bytes() == checkpoint_bytes
    assert sorted(release.requests) == ["/v7.0/yolov5n.pt", "/v7.0/yolov5n.pt", "/v7.0/yolov5s.pt", "/v7.0/yolov5x.pt"]


def test_other_missing_paths_keep_not_found(release, tmp_path):
    with pytest.raises(UserError, match="'yolov5z.pt' not found: check the path"):
        check_file("yolov5z.pt", "--weights")
    with pytest.raises(UserError, match=r"checkpoint .*best\.pt not found"):
        load_checkpoint(tmp_path / "best.pt")
    assert release.requests == []


@pytest.mark.parametrize(
    "name, reason",
    [("yolov5m.pt", "HTTP 404"), ("yolov5l.pt", "truncated: 100000 of"), ("yolov5x.pt", "sha256"), ("yolov5s.pt", "")],
)
def test_failed_weights_download_is_one_line_and_leaves_nothing(
    release, closed_port, checkpoint_bytes, tmp_path, monkeypatch, name, reason
):
    monkeypatch.setattr(downloads, "KNOWN_FILES", {"yolov5x.pt": (len(checkpoint_bytes), "0" * 64)})
    if not reason:  # offline
        monkeypatch.setenv(downloads.RELEASE_URL_ENV, f"http://127.0.0.1:{closed_port}/v7.0")
    target = tmp_path / "weights" / name
    with pytest.raises(UserError) as e:
        attempt_load(target)
    message = str(e.value)
    assert "\n" not in message and reason in message, message
    assert f"{downloads.release_url()}/{name}" in message and f"save it as {target.resolve()}" in message
    assert_nothing_left(target.parent)


# ---------------------------------------------------------------------------------------------- datasets


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dataset_files(tiny_data) -> dict[str, bytes]:
    """The tiny dataset's images and labels as zip entries under tinyset/ (coco128.zip's layout)."""
    root = tiny_data.parent
    files = [p for sub in ("images", "labels") for p in sorted((root / sub).rglob("*")) if p.is_file()]
    return {f"tinyset/{p.relative_to(root).as_posix()}": p.read_bytes() for p in files}


def data_yaml(folder: Path, download, path: str = "../datasets/tinyset") -> Path:
    file = folder / "tiny.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    names = dict(enumerate(f"class{i}" for i in range(8)))
    fields = {"path": path, "train": "images/train", "val": "images/val", "names": names, "download": download}
    file.write_text(yaml.safe_dump(fields, sort_keys=False))
    return file


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """YOLOv5's layout: the current folder tmp/repo, datasets in tmp/datasets (the YAML's ../datasets)."""
    import utils.general

    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setattr(utils.general, "DATASETS_DIR", tmp_path / "datasets")
    return tmp_path


def test_dataset_zip_is_unpacked_beside_its_path(server, dataset_files, workdir):
    url = server.serve("/data/tinyset.zip", zip_bytes(dataset_files))
    data = check_dataset(data_yaml(workdir / "repo", url))
    root = (workdir / "datasets" / "tinyset").resolve()
    assert (
        data["path"] == root and data["val"] == str(root / "images/val") and data["train"] == str(root / "images/train")
    )
    assert len(list((root / "images/val").iterdir())) == 8 and len(list((root / "labels/train").iterdir())) == 16
    assert sorted(p.name for p in (workdir / "datasets").iterdir()) == ["tinyset"]  # zip and staging folder gone


def test_dataset_from_several_zips_is_merged(server, dataset_files, workdir):
    images = {k: v for k, v in dataset_files.items() if "/images/" in k}
    labels = {k: v for k, v in dataset_files.items() if "/labels/" in k}
    urls = [server.serve("/data/images.zip", zip_bytes(images)), server.serve("/data/labels.zip", zip_bytes(labels))]
    data = check_dataset(data_yaml(workdir / "repo", urls))
    root = Path(data["val"]).parents[1]
    assert len(list((root / "images/train").iterdir())) == 16 and len(list((root / "labels/val").iterdir())) == 8
    assert sorted(p.name for p in (workdir / "datasets").iterdir()) == ["tinyset"]


@pytest.mark.parametrize(
    "case, reason",
    [
        ("slip", "outside"),
        ("absolute", "outside"),
        ("bad zip", "not a readable zip"),
        ("truncated", "truncated"),
        ("404", "HTTP 404"),
        ("second fails", "HTTP 404"),
    ],
)
def test_failed_dataset_download_is_one_line_and_leaves_nothing(server, dataset_files, workdir, case, reason):
    good = zip_bytes(dataset_files)
    urls = {
        "slip": server.serve("/data/slip.zip", zip_bytes({**dataset_files, "../evil.txt": b"x"})),
        "absolute": server.serve("/data/abs.zip", zip_bytes({"/tmp/yolov5-fgfi-evil.txt": b"x", **dataset_files})),
        "bad zip": server.serve("/data/bad.zip", b"not a zip" * 100),
        "truncated": server.serve("/data/cut.zip", good[: len(good) // 2], length=len(good)),
        "404": server.url("/data/missing.zip"),
        "second fails": [server.serve("/data/tinyset.zip", good), server.url("/data/missing.zip")],
    }[case]
    with pytest.raises(UserError) as e:
        check_dataset(data_yaml(workdir / "repo", urls))
    message = str(e.value)
    failed = urls[-1] if isinstance(urls, list) else urls
    assert "\n" not in message and reason in message and failed in message, message
    assert f"unzip it into {(workdir / 'datasets').resolve()}" in message
    assert_nothing_left(workdir / "datasets")
    assert not (workdir / "evil.txt").exists() and not Path("/tmp/yolov5-fgfi-evil.txt").exists()


def test_users_own_archive_is_unpacked_not_downloaded_and_kept(server, dataset_files, workdir):
    """An archive put in the datasets folder by hand (offline) is used as it is and never deleted, even when the URL
    would fail (404); before, the failed fetch deleted it."""
    url = server.url("/data/tinyset.zip")  # not served: a 404 if fetched
    own = workdir / "datasets" / "tinyset.zip"
    own.parent.mkdir(parents=True)
    own.write_bytes(archive := zip_bytes(dataset_files))
    requests = len(server.requests)
    data = check_dataset(data_yaml(workdir / "repo", url))
    assert len(list(Path(data["val"]).iterdir())) == 8
    assert own.read_bytes() == archive and len(server.requests) == requests  # nothing fetched


def test_users_broken_archive_is_kept_with_one_line(server, workdir):
    own = workdir / "datasets" / "tinyset.zip"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"could not get tinyset.zip from .*tinyset.zip \(.*not a readable zip"):
        check_dataset(data_yaml(workdir / "repo", server.url("/data/tinyset.zip")))
    assert own.read_bytes() == b"not a zip"


def test_archive_colliding_with_a_file_moves_nothing(server, dataset_files, workdir):
    """An entry zzz/y.txt where the target has a file zzz: one line before anything is moved (before: a raw
    NotADirectoryError after part of the merge)."""
    root = workdir / "datasets" / "tinyset"
    (root / "zzz").parent.mkdir(parents=True)
    (root / "zzz").write_text("mine")
    url = server.serve("/data/tinyset.zip", zip_bytes({**dataset_files, "tinyset/zzz/y.txt": b"x"}))
    with pytest.raises(UserError, match=r"has a folder zzz where .*zzz is a file: move"):
        check_dataset(data_yaml(workdir / "repo", url))
    assert sorted(p.name for p in root.iterdir()) == ["zzz"] and (root / "zzz").read_text() == "mine"


@pytest.mark.parametrize(
    "body, length, reason",
    [
        (b"<!DOCTYPE html><html>rate limited</html>", None, "an HTML page"),
        (b"", None, "empty"),
        (b"CKPT", None, "not a complete PyTorch checkpoint"),
        ("cut", "short", "not a complete PyTorch checkpoint"),  # Content-Length smaller than the body
    ],
)
def test_a_bad_body_is_never_saved_as_the_weights(release, checkpoint_bytes, tmp_path, body, length, reason):
    """A 200 response that is not a checkpoint (an HTML page, an empty body, a body cut off at a too-small
    Content-Length) was renamed into place as yolov5m.pt and never fetched again; now it is refused before the
    rename, and a later run downloads it anew."""
    if body == "cut":
        body, length = checkpoint_bytes, len(checkpoint_bytes) // 2
    release.serve("/v7.0/yolov5m.pt", body, length)
    target = tmp_path / "yolov5m.pt"
    try:
        with pytest.raises(UserError, match=reason) as e:
            attempt_load(target)
        assert "\n" not in str(e.value)
        assert_nothing_left(tmp_path)
        release.serve("/v7.0/yolov5m.pt", checkpoint_bytes)  # the server is fixed: the next run gets the file
        assert attempt_load(target).model[-1].nc == 8 and target.read_bytes() == checkpoint_bytes
    finally:
        release.routes.pop("/v7.0/yolov5m.pt", None)


def test_an_unreadable_release_file_in_place_says_to_delete_it(tmp_path):
    bad = tmp_path / "yolov5s.pt"
    bad.write_bytes(b"<html>not weights</html>")
    with pytest.raises(UserError, match="delete it and run again to download yolov5s.pt anew"):
        load_checkpoint(bad)
    other = tmp_path / "mine.pt"
    other.write_bytes(b"junk")
    with pytest.raises(UserError) as e:
        load_checkpoint(other)
    assert "download" not in str(e.value)


def test_a_trickling_server_is_given_up(release, tmp_path, monkeypatch):
    """One byte every 0.2 s never trips the socket timeout; the minimum mean rate does (made small for the test)."""
    import http.server

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(downloads, "MIN_RATE_AFTER_S", 1.0)
    try:
        monkeypatch.setenv(downloads.RELEASE_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}/v7.0")
        with pytest.raises(UserError, match=r"too slow: \d+ bytes in \d+ s"):
            attempt_load(tmp_path / "yolov5s.pt")
        assert_nothing_left(tmp_path)
    finally:
        server.shutdown()
        server.server_close()


def test_stale_temp_files_of_killed_runs_are_removed(release, checkpoint_bytes, tmp_path):
    dead = subprocess_pid_that_exited()
    stale = tmp_path / f".yolov5s.pt.{dead}.tmp"
    stale.write_bytes(b"half a download")
    staging = tmp_path / "datasets" / f".unzip.{dead}.tmp"
    staging.mkdir(parents=True)
    (staging / "stale.txt").write_text("x")
    attempt_load(tmp_path / "yolov5s.pt")
    assert not stale.exists()
    assert downloads.remove_stale(tmp_path / "datasets", ".unzip.*.tmp") == [staging] and not staging.exists()


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_zip_bomb_is_refused(tmp_path, monkeypatch):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(zip_bytes({"a.txt": b"0" * 10_000}))
    monkeypatch.setattr(downloads, "MAX_UNZIPPED", 1000)
    with pytest.raises(downloads.DownloadError, match="unpack to .* over the 0 GiB limit"):
        downloads.unzip_into(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
