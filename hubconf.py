"""torch.hub entry points, as YOLOv5's:

    import torch
    model = torch.hub.load("path/to/yolov5-fgfi", "custom", path="runs/train/exp/weights/best.pt", source="local")
    model = torch.hub.load("path/to/yolov5-fgfi", "yolov5n", source="local")  # yolov5n.pt from the current folder,
                                                                              # the repository or its weights/, else
                                                                              # downloaded into the current folder
    model.conf, model.classes = 0.4, [0]  # NMS settings live on the model
    results = model("bus.jpg")            # paths, PIL images, HWC RGB numpy arrays, or lists of them
    results.print(); results.pandas().xyxy[0]

A distilled checkpoint loads like any other: its student is a plain YOLOv5 model.
"""

from __future__ import annotations

from pathlib import Path

dependencies = ["torch", "yaml", "cv2", "numpy"]

_ROOT = Path(__file__).resolve().parent


def _on_path() -> None:
    """Make this repository's packages importable (torch.hub imports hubconf.py from outside it)."""
    import sys

    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))


def _create(name: str, pretrained: bool = True, channels: int = 3, classes: int = 80, autoshape: bool = True,
            device=None):  # fmt: skip
    """A YOLOv5 model by architecture name: its .pt checkpoint (pretrained: found locally, else downloaded from the
    YOLOv5 v7.0 release into the current folder) or a fresh model from the YAML (pretrained=False, with `channels`
    and `classes`), wrapped in AutoShape unless autoshape=False."""
    _on_path()
    from models.autoshape import AutoShape
    from models.yolo import DetectionModel
    from utils.general import UserError
    from utils.torch_utils import select_device

    if pretrained:
        from utils.downloads import attempt_download

        file = Path(name).with_suffix(".pt")
        found = next((p for p in (file, _ROOT / file, _ROOT / "weights" / file.name) if p.is_file()), None)
        if found is None:  # an official name: fetched from the YOLOv5 v7.0 release into the current folder
            found = attempt_download(file)
        if not found.is_file():
            raise UserError(
                f"{file.name} not found in the current folder, {_ROOT} or {_ROOT / 'weights'}: download it from the "
                "YOLOv5 v7.0 release and put it there, or pass pretrained=False for an untrained model"
            )
        if channels == 3 and classes == 80:  # the checkpoint as it is
            return custom(str(found), autoshape, device)
        model = _transfer(found, channels, classes)  # another head or input: matching weights transferred
        model = model.to(select_device("" if device is None else str(device)))
        return AutoShape(model) if autoshape else model
    device = select_device("" if device is None else str(device))
    model = DetectionModel(f"{Path(name).stem}.yaml", ch=channels, nc=classes).to(device)
    return AutoShape(model) if autoshape else model


def _transfer(file: Path, channels: int, classes: int):
    """A model of the checkpoint's architecture with `channels` inputs and `classes` outputs, holding every
    checkpoint tensor whose name and shape match (all but the first conv for other channels, all but Detect's output
    convs for other classes), as YOLOv5's hub entries do. The names are the checkpoint's when their count matches."""
    from models.yolo import DetectionModel
    from utils.checkpoint import load_checkpoint
    from utils.general import LOGGER, intersect_dicts

    ckpt = load_checkpoint(file)
    source = (ckpt.get("ema") or ckpt["model"]).float()
    model = DetectionModel({**source.yaml, "ch": channels}, ch=channels, nc=classes)  # the YAML holds its own ch
    state = intersect_dicts(source.state_dict(), model.state_dict())
    model.load_state_dict(state, strict=False)
    LOGGER.info(f"Transferred {len(state)}/{len(model.state_dict())} tensors from {file} ({channels} channels, "
                f"{classes} classes)")  # fmt: skip
    names = getattr(source, "names", None)
    if names is not None and len(names) == classes:
        model.names = names
    return model


def custom(path: str = "best.pt", autoshape: bool = True, device=None):
    """Any YOLOv5 checkpoint, e.g. a run's best.pt (distilled or not)."""
    _on_path()
    from models.autoshape import AutoShape
    from utils.checkpoint import attempt_load
    from utils.torch_utils import select_device

    model = attempt_load(path, device=select_device("" if device is None else str(device)))
    return AutoShape(model) if autoshape else model


def _entry(name: str):
    """The torch.hub entry point of one architecture, e.g. yolov5n(pretrained=True, channels=3, classes=80, ...)."""

    def entry(pretrained=True, channels=3, classes=80, autoshape=True, device=None):
        return _create(name, pretrained, channels, classes, autoshape, device)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"{name}: {name}.pt found locally or downloaded (pretrained), or a fresh model from {name}.yaml."
    return entry


for _name in ("yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x", "yolov5n6", "yolov5s6", "yolov5m6", "yolov5l6",
              "yolov5x6"):  # fmt: skip
    globals()[_name] = _entry(_name)
