"""Run train.py under torchrun and save each rank's adapter weights, so a test can compare them across ranks.

python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR <train.py flags>
"""

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distill.distiller  # noqa: E402
import train  # noqa: E402

out = Path(sys.argv[1])
sys.argv = [sys.argv[0], *sys.argv[2:]]
created = []


class RecordingAdapters(distill.distiller.FeatureAdapters):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        created.append(self)


distill.distiller.FeatureAdapters = RecordingAdapters
train.main(train.parse_opt())
rank = int(os.environ["RANK"])
torch.save({k: v.detach().cpu() for k, v in created[0].state_dict().items()}, out / f"adapters_rank{rank}.pt")
(out / f"done_rank{rank}").write_text("ok")
