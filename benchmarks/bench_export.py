"""CPU inference speed of a yolov5n checkpoint and its exports: PyTorch, TorchScript, ONNX Runtime (and OpenVINO).

Every runtime goes through models.backend.DetectMultiBackend, as val.py and detect.py use it, on batch-1 images
exported at a fixed shape. Speed does not depend on the weights, so the model is a freshly built yolov5n (80
classes); its checkpoint and exports go to a temporary folder. Prints a markdown table of median ms per image, as
process CPU time and as wall time: on a shared machine the wall time also counts the time other processes held
the CPU, the CPU time (with one thread) is the compute itself.

Usage:
    python benchmarks/bench_export.py                        # 1 thread, 320 and 640 px
    python benchmarks/bench_export.py --threads 2 --imgsz 320 --repeats 50
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def median_times(fn, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """(median process CPU time, median wall time) of fn() in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def build_checkpoint(folder: Path, cfg: str) -> Path:
    from models.yolo import DetectionModel
    from utils.checkpoint import save_checkpoint

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # the layer table
        model = DetectionModel(cfg)
    weights = folder / f"{Path(cfg).stem}.pt"
    save_checkpoint({"epoch": -1, "model": model.half(), "ema": None}, weights)
    return weights


def main(opt: argparse.Namespace) -> None:
    import export
    from models.backend import DetectMultiBackend
    from utils.general import LOGGER

    torch.set_num_threads(opt.threads)  # DetectMultiBackend gives ONNX Runtime and OpenVINO the same count
    LOGGER.setLevel("WARNING")
    formats = ["torchscript", "onnx"]
    with contextlib.suppress(ImportError):
        import openvino  # noqa: F401

        formats.append("openvino")
    device = torch.device("cpu")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for imgsz in opt.imgsz:
            folder = Path(tmp) / str(imgsz)
            folder.mkdir()
            weights = build_checkpoint(folder, opt.cfg)
            files = [str(weights), *export.run(weights=str(weights), imgsz=(imgsz, imgsz), include=formats)]
            im = torch.rand(1, 3, imgsz, imgsz)
            for name, f in zip(["PyTorch", "TorchScript", "ONNX Runtime", "OpenVINO"], files):
                backend = DetectMultiBackend(f, device=device)
                with torch.inference_mode():
                    cpu, wall = median_times(lambda b=backend, x=im: b(x), opt.repeats)
                rows.setdefault(name, {})[imgsz] = cpu * 1e3, wall * 1e3
                print(f"{name:>12} {imgsz:>4} px: {cpu * 1e3:7.1f} ms CPU, {wall * 1e3:7.1f} ms wall", file=sys.stderr)

    print(f"\n{Path(opt.cfg).stem}, batch 1, {opt.threads} thread(s), median of {opt.repeats} runs, ms/image")
    print("CPU time (wall time)\n")
    print("| runtime | " + " | ".join(f"{s} px" for s in opt.imgsz) + " |")
    print("|:--|" + "--:|" * len(opt.imgsz))
    for name, by_size in rows.items():
        print(f"| {name} | " + " | ".join(f"{by_size[s][0]:.1f} ({by_size[s][1]:.1f})" for s in opt.imgsz) + " |")
    print(f"\ntorch {torch.__version__}", end="")
    for module in ("onnxruntime", "openvino"):
        with contextlib.suppress(ImportError):
            print(f", {module} {__import__(module).__version__}", end="")
    print()


def parse_opt(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg", default="yolov5n.yaml", help="model YAML (models/)")
    parser.add_argument("--imgsz", nargs="+", type=int, default=[320, 640], help="square image sizes")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per runtime and size")
    return parser.parse_args(args)


if __name__ == "__main__":
    main(parse_opt())
