"""What every module of the project shares and nothing else: the process's rank (DDP), the "yolov5" logger and
UserError. It imports nothing of the project, so any module (utils/downloads.py, utils/general.py) can build on it."""

from __future__ import annotations

import logging
import os
import sys

RANK = int(os.getenv("RANK", -1))
LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))

LOGGER = logging.getLogger("yolov5")
if not LOGGER.handlers:  # one handler, whatever imports us first; no change to the root logger
    _handler = logging.StreamHandler(sys.stdout)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(logging.INFO if RANK in {-1, 0} else logging.WARNING)
    LOGGER.propagate = False


class UserError(Exception):
    """A problem with the user's input (a file, a flag): entry points print the message alone, no traceback."""
