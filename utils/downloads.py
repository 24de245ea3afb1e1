"""Official YOLOv5 weights and zipped datasets by name: fetched over HTTP(S), checked, and moved into place atomically.

`--weights yolov5s.pt` that is not on disk comes from the YOLOv5 v7.0 release (RELEASE_URL, or the environment
variable YOLOV5_RELEASE_URL, read at each download so tests can point it at a local server). A data YAML whose
`download:` is the URL of a .zip (or a list of them) is unpacked into the parent of the YAML's `path`, as YOLOv5 does
(`path: ../datasets/coco128` -> coco128.zip unpacked into `../datasets`).

Every download streams into a temporary file beside its target (`.<name>.<pid>.tmp`), is checked against the
Content-Length header and, for the files in KNOWN_FILES, against their size and sha256, then renamed into place.
A failure (offline, HTTP error, truncated body, wrong checksum, bad zip) is one UserError line naming the URL and
where to put the file by hand, and leaves neither the temporary file nor a partial target or unzip behind.
Downloaded checkpoints are then read by utils.checkpoint.load_checkpoint like any other file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.request import Request, urlopen

from tqdm import tqdm

from utils.basics import LOGGER, RANK, UserError

RELEASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0"
RELEASE_URL_ENV = "YOLOV5_RELEASE_URL"
RELEASE_ASSETS = tuple(f"yolov5{size}{p6}.pt" for p6 in ("", "6") for size in "nsmlx")  # detection models only
# (bytes, sha256) of release assets we know for sure; the others are checked against Content-Length alone
KNOWN_FILES: dict[str, tuple[int, str]] = {
    "yolov5n.pt": (4_062_133, "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3"),
}
TIMEOUT_S = 30  # seconds without a byte (connecting or reading) before a download is given up
# a server that trickles bytes never trips TIMEOUT_S: after MIN_RATE_AFTER_S, a mean rate below MIN_RATE is given up
MIN_RATE, MIN_RATE_AFTER_S = 16 * 1024, 60.0  # bytes/s, s
MAX_UNZIPPED = 64 << 30  # a dataset zip that would unpack to more than 64 GiB (a zip bomb) is refused
CHUNK = 1 << 20


class DownloadError(Exception):
    """Why a download failed, in a few words; callers turn it into a UserError that says what to do by hand."""


def release_url() -> str:
    """The base URL of the weights release: $YOLOV5_RELEASE_URL if set, else RELEASE_URL (YOLOv5 v7.0)."""
    return (os.getenv(RELEASE_URL_ENV) or RELEASE_URL).rstrip("/")


def attempt_download(path: str | Path) -> Path:
    """Path of a weights file, downloaded first when it is missing and its name is an official YOLOv5 v7.0 asset.

    `yolov5s.pt`, `weights/yolov5l6.pt`, ... (RELEASE_ASSETS) land at that very path; any other path comes back
    unchanged, existing or not, for the caller's own "not found" error. Raises UserError when the download fails.
    """
    file = Path(str(path))
    if file.exists() or file.name not in RELEASE_ASSETS:
        return file
    url = f"{release_url()}/{file.name}"
    size, sha256 = KNOWN_FILES.get(file.name, (None, None))
    LOGGER.info(f"Downloading {url} to {file} ...")
    try:
        fetch(url, file, size=size, sha256=sha256, check=_check_checkpoint)
    except DownloadError as e:
        raise UserError(
            f"{file.name} not found: could not download {url} ({e}); download it by hand and save it as "
            f"{file.resolve()}"
        ) from None
    return file


def download_dataset(urls: str | list[str], folder: str | Path) -> None:
    """Fetch one or more .zip URLs and unpack them all into folder, or nothing at all.

    An archive already in folder under the URL's name (put there by hand, e.g. offline) is unpacked as it is, without
    a download, and kept; one this call downloads goes to folder (checked, atomic) and is deleted once unpacked.
    Every archive is unpacked into one staging folder first and only moved into folder when all of them are good and
    none of their entries collides with a file of folder (a file where the archive has a folder, or the reverse), so
    a failed download, a bad zip or an entry that would escape folder (zip-slip, refused) leaves folder as it was.
    Raises UserError.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    folder = Path(folder)
    by_hand = f"download it by hand and unzip it into {folder.resolve()}"
    staging = folder / f".unzip.{os.getpid()}.tmp"
    remove_stale(folder, ".unzip.*.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # a staging folder of a killed run whose PID this process reuses
    try:
        for url in urls:
            name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
            if not name.endswith(".zip"):
                raise UserError(f"dataset download {url}: only .zip archives are unpacked here; {by_hand}")
            archive = folder / name
            downloaded = not archive.is_file()
            try:
                if downloaded:
                    LOGGER.info(f"Downloading {url} to {folder} ...")
                    fetch(url, archive)
                else:
                    LOGGER.info(f"Unpacking {archive}, already there (not downloaded again)")
                unzip_into(archive, staging)
            except (DownloadError, OSError) as e:  # OSError: unpacking onto a full or read-only disk
                where = url if downloaded else archive
                raise UserError(f"could not get {name} from {where} ({_one_line(e)}); {by_hand}") from None
            finally:
                if downloaded:  # only what this call fetched: never the user's own archive
                    with contextlib.suppress(FileNotFoundError):
                        archive.unlink()
        entries = list(staging.iterdir()) if staging.is_dir() else []
        for entry in entries:
            _check_merge(entry, folder / entry.name, by_hand)
        for entry in entries:
            _merge(entry, folder / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_merge(src: Path, dst: Path, by_hand: str) -> None:
    """UserError before anything moves when _merge(src, dst) would meet a file where it needs a folder (or the
    reverse)."""
    if not dst.exists():
        return
    if src.is_dir() != dst.is_dir():
        kinds = ("folder", "file") if src.is_dir() else ("file", "folder")
        raise UserError(
            f"dataset archive has a {kinds[0]} {dst.name} where {dst} is a {kinds[1]}: move {dst} away, or {by_hand}"
        )
    if src.is_dir():
        for entry in src.iterdir():
            _check_merge(entry, dst / entry.name, by_hand)


def fetch(
    url: str,
    dest: str | Path,
    size: int | None = None,
    sha256: str | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Stream url into dest through `.<name>.<pid>.tmp` beside it, with a progress bar; return dest.

    Checks the byte count against the Content-Length header and, when given, against size and the body's sha256
    (hex), then check(tmp) (raises DownloadError for a body that is not what was asked for). Temporary files of the
    same name left by killed processes are removed first; SIGTERM during the download removes this one. Raises
    DownloadError (dest untouched, the temporary file removed) on any failure.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dest.parent, f".{dest.name}.*.tmp")
        with _sigterm_raises():
            got, digest = _stream(url, tmp, dest.name)
        if size is not None and got != size:
            raise DownloadError(f"{got} bytes, but the known file has {size}")
        if sha256 and digest != sha256.lower():
            raise DownloadError(f"sha256 {digest[:16]}... differs from the known {sha256[:16]}...")
        if check is not None:
            check(tmp)
        os.replace(tmp, dest)
    except OSError as e:  # a local problem: folder not writable, disk full
        raise DownloadError(_one_line(e)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


def _check_checkpoint(file: Path) -> None:
    """A PyTorch checkpoint is a zip archive holding a data.pkl: an HTML page, an empty or a cut-off body is not."""
    try:
        with zipfile.ZipFile(file) as zf:
            if not any(name.endswith("data.pkl") for name in zf.namelist()):
                raise DownloadError("the body is a zip archive but not a PyTorch checkpoint")
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        head = file.read_bytes()[:64] if file.is_file() else b""
        what = "an HTML page" if b"<" in head[:16] else "empty" if not head else "not a complete PyTorch checkpoint"
        raise DownloadError(f"the body is {what} ({_one_line(e)})") from None


def remove_stale(folder: Path, pattern: str) -> list[Path]:
    """Remove the files or folders matching pattern (`name.<pid>.tmp`) left in folder by processes no longer alive."""
    removed = []
    for path in Path(folder).glob(pattern) if Path(folder).is_dir() else ():
        pid = path.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _sigterm_raises():
    """While the block runs, SIGTERM raises SystemExit, so the callers' cleanup (finally) removes temporary files;
    the previous handler is restored after. Only in the main thread (signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stream(url: str, tmp: Path, desc: str) -> tuple[int, str]:
    """Write url's body into tmp; return (bytes, sha256 hex). Raises DownloadError, also when the mean rate stays
    below MIN_RATE past MIN_RATE_AFTER_S (a trickle never trips the socket timeout)."""
    digest, got, t0 = hashlib.sha256(), 0, time.monotonic()
    try:
        with urlopen(Request(url, headers={"User-Agent": "yolov5-fgfi"}), timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.strip().isdigit() else None
            bar = tqdm(total=expected, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=RANK > 0)
            with open(tmp, "wb") as f, bar:
                while chunk := response.read1(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                    elapsed = time.monotonic() - t0
                    if elapsed > MIN_RATE_AFTER_S and got / elapsed < MIN_RATE:
                        raise DownloadError(
                            f"too slow: {got} bytes in {elapsed:.0f} s (under {MIN_RATE // 1024} KiB/s); given up"
                        )
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(_one_line(e.reason) if not isinstance(e.reason, str) else e.reason) from None
    except (http.client.HTTPException, TimeoutError, ConnectionError) as e:
        raise DownloadError(_one_line(e)) from None
    if expected is not None and got != expected:  # http.client ends a cut-off body quietly
        raise DownloadError(f"truncated: {got} of {expected} bytes")
    return got, digest.hexdigest()


def unzip_into(archive: str | Path, folder: str | Path) -> None:
    """Extract archive into folder, refusing the whole archive if any entry would land outside folder.

    Raises DownloadError for a zip-slip entry (absolute, `..`, a drive) or an unreadable archive (bad zip, CRC error).
    """
    folder = Path(folder)
    try:
        with zipfile.ZipFile(archive) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
            if unpacked > MAX_UNZIPPED:
                raise DownloadError(
                    f"it would unpack to {unpacked / (1 << 30):.0f} GiB, over the {MAX_UNZIPPED >> 30} GiB limit "
                    "(a zip bomb?); refused"
                )
            for name in zf.namelist():
                parts = PurePosixPath(name.replace("\\", "/"))
                escapes = parts.is_absolute() or ".." in parts.parts or PureWindowsPath(name).drive
                if escapes or not (folder / parts).resolve().is_relative_to(folder.resolve()):
                    raise DownloadError(f"its entry '{name}' would be written outside the folder; refused")
            zf.extractall(folder)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as e:
        raise DownloadError(f"not a readable zip archive: {_one_line(e)}") from None


def _merge(src: Path, dst: Path) -> None:
    """Move src to dst; a folder that exists on both sides is merged entry by entry (files in src win)."""
    if src.is_dir() and dst.is_dir():
        for entry in src.iterdir():
            _merge(entry, dst / entry.name)
    else:
        os.replace(src, dst)


def _one_line(e: object) -> str:
    """An exception or reason as a short single line."""
    text = " ".join(str(e).split())
    return text[:160] if text else type(e).__name__
