"""Run train.py until it is inside a given epoch, then hold still there, so a test can kill it at a known point.

python tests/pause_worker.py MARKER EPOCH <train.py flags>

Once last.pt of epoch EPOCH - 1 is written, the second loss of the next epoch writes MARKER and sleeps instead of
returning: the run has trained one step of EPOCH and holds there until it is killed. A test that waits for MARKER
kills it mid-epoch however fast the epoch is.
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils.checkpoint  # noqa: E402
import utils.loss  # noqa: E402

marker, epoch = Path(sys.argv[1]), int(sys.argv[2])
sys.argv = [str(ROOT / "train.py"), *sys.argv[3:]]
losses_since_commit = None  # counts once last.pt of epoch - 1 is written
save_checkpoint = utils.checkpoint.save_checkpoint


def save_and_watch(ckpt, file):
    global losses_since_commit
    save_checkpoint(ckpt, file)
    if Path(file).name == "last.pt" and ckpt["epoch"] == epoch - 1:
        losses_since_commit = 0


def holding(loss):
    def call(*args, **kwargs):
        global losses_since_commit
        if losses_since_commit is not None:
            losses_since_commit += 1
            if losses_since_commit == 2:
                marker.write_text("holding")
                while True:
                    time.sleep(60)
        return loss(*args, **kwargs)

    return call


utils.checkpoint.save_checkpoint = save_and_watch  # before train.py imports it
utils.loss.ComputeLoss.__call__ = holding(utils.loss.ComputeLoss.__call__)
utils.loss.ComputeLoss.split = holding(utils.loss.ComputeLoss.split)

import train  # noqa: E402

train.main(train.parse_opt())
