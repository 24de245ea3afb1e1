"""FGFI distillation (Wang et al., "Distilling Object Detectors with Fine-grained Feature Imitation", CVPR 2019).

A small student detector learns to reproduce a frozen teacher's features near objects:

- mask.py     imitation_mask: per feature level, the cells whose anchors overlap a ground-truth box well
              (IoU > iou_factor * that box's best anchor IoU), as a [B, H, W] 0/1 map; or a baseline region
              (region="gtbox": cell centres inside a box, "full": the whole map).
- loss.py     imitation_loss: masked L2 between adapt(student feature) and teacher feature / (2 * masked cells);
              Adapter / FeatureAdapters: the 3x3 conv mapping student channels to teacher channels, run on the
              masked cells alone below SPARSE_MAX_SHARE of them (masked_cells, gather_cells, sparse_conv);
              feature_channels: channel counts of a model's imitated layers.
- teacher.py  load_teacher: the frozen, eval, outside-the-student teacher with compatibility checks;
              teacher_features: its features without grad; match_layers: student/teacher layer pairs.
- distiller.py Distiller: the above as one object beside a plain student (teacher, adapters, layer pairs, settings,
              the loss inputs, state_dict for --resume); parse_imitation_layers / check_settings for the flags.

Training adds imitation_weight * imitation_loss to the detection loss (utils/loss.py ComputeLoss).
"""

from distill.distiller import Distiller, check_settings, parse_imitation_layers
from distill.loss import Adapter, FeatureAdapters, feature_channels, imitation_loss
from distill.mask import REGIONS, imitation_mask
from distill.teacher import load_teacher, match_layers, teacher_features

__all__ = (
    "REGIONS",
    "Adapter",
    "Distiller",
    "FeatureAdapters",
    "check_settings",
    "feature_channels",
    "imitation_loss",
    "imitation_mask",
    "load_teacher",
    "match_layers",
    "parse_imitation_layers",
    "teacher_features",
)
