"""Distillation of a YOLOv5 student from a frozen teacher: FGFI (Wang et al., "Distilling Object Detectors with
Fine-grained Feature Imitation", CVPR 2019) and output distillation beside it.

A small student detector learns to reproduce a frozen teacher's features near objects, and optionally its head's
outputs:

- terms.py    the table of distillation terms (TERMS): one loss function each, with its weight key and log name.
              imitation_term (FGFI), kd_term (objectness + class, objectness-scaled), box_kd_term (boxes where the
              teacher is confident); level_weights: how several imitated layers combine.
- mask.py     imitation_mask: per feature level, the cells whose anchors overlap a ground-truth box well
              (IoU > iou_factor * that box's best anchor IoU), as a [B, H, W] 0/1 map; or a baseline region
              (region="gtbox": cell centres inside a box, "full": the whole map).
- loss.py     imitation_loss: masked L2 between adapt(student feature) and teacher feature / (2 * masked cells);
              Adapter / FeatureAdapters: the 3x3 conv mapping student channels to teacher channels;
              feature_channels: channel counts of a model's imitated layers.
- sparse.py   the adapter run on the masked cells alone below SPARSE_MAX_SHARE of them (masked_cells, gather_cells,
              sparse_conv).
- teacher.py  load_teacher: the frozen, eval, outside-the-student teacher with compatibility checks;
              teacher_features / teacher_outputs: its features (and head outputs) without grad; match_layers:
              student/teacher layer pairs; check_heads: the heads output distillation can compare.
- distiller.py Distiller: the above as one object beside a plain student (teacher, adapters, layer pairs, term
              weights and settings, the loss inputs, state_dict for --resume); parse_imitation_layers / check_settings
              for the flags.

Training adds sum(weight * term) over the terms switched on to the detection loss (utils/loss.py ComputeLoss, which
receives them from the Distiller: Distiller.loss_terms). distill/ uses the model through its public methods only
(DetectionModel.forward_intermediates, imitation_points, imitation_levels, and forward(x, target=...), which
returns (preds, feature, mask) with the mask from distill/mask.py).
"""

from distill.distiller import PRECISIONS, Distiller, check_settings, parse_imitation_layers
from distill.loss import Adapter, FeatureAdapters, feature_channels, imitation_loss
from distill.mask import BOXES, REGIONS, imitation_mask, matched_boxes
from distill.teacher import check_heads, load_teacher, match_layers, teacher_features, teacher_outputs
from distill.terms import TERMS, Term

__all__ = (
    "BOXES",
    "PRECISIONS",
    "REGIONS",
    "TERMS",
    "Adapter",
    "Distiller",
    "FeatureAdapters",
    "Term",
    "check_heads",
    "check_settings",
    "feature_channels",
    "imitation_loss",
    "imitation_mask",
    "load_teacher",
    "match_layers",
    "matched_boxes",
    "parse_imitation_layers",
    "teacher_features",
    "teacher_outputs",
)
