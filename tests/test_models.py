"""Model building (parameter counts, strides, anchors), forward shapes, fuse, TTA, the FGFI forward, torch_utils."""

from __future__ import annotations

import math
from copy import deepcopy

import pytest
import torch
import torch.nn as nn

from models.common import C3, SPPF, Bottleneck, Concat, Conv
from models.yolo import Detect, DetectionModel, Model, parse_model
from utils.general import UserError, yaml_load
from utils.torch_utils import (
    EarlyStopping,
    ModelEMA,
    fuse_conv_and_bn,
    scale_img,
    select_device,
    smart_optimizer,
)

ALL_CFGS = [f"yolov5{k}{p}.yaml" for p in ("", "6") for k in "nsmlx"]

# Parameter counts of ultralytics YOLOv5 v7.0 at nc=80: as built from the YAML (train.py's summary) and after
# fuse() (detect.py's summary of the released weights).
OFFICIAL_BUILT = {"yolov5s.yaml": 7_235_389}
OFFICIAL_FUSED = {
    "yolov5n.yaml": 1_867_405,
    "yolov5m.yaml": 21_172_173,
    "yolov5l.yaml": 46_533_693,
    "yolov5x.yaml": 86_705_005,
    "yolov5s6.yaml": 12_612_508,
    "yolov5x6.yaml": 140_730_220,
}
README_MILLIONS = {  # the README table, params (M) to 0.1 (its rounding mixes built and fused counts)
    "yolov5n.yaml": 1.9, "yolov5s.yaml": 7.2, "yolov5m.yaml": 21.2, "yolov5l.yaml": 46.5, "yolov5x.yaml": 86.7,
    "yolov5n6.yaml": 3.2, "yolov5s6.yaml": 12.6, "yolov5m6.yaml": 35.7, "yolov5l6.yaml": 76.8, "yolov5x6.yaml": 140.7,
}  # fmt: skip
OFFICIAL_ANCHORS_P5 = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
OFFICIAL_ANCHORS_P6 = [
    [19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137], [140, 301, 303, 264, 238, 542], [436, 615, 739, 380, 925, 792],
]  # fmt: skip


def _meta_layers(cfg: str) -> nn.Sequential:
    """Build the layers on the meta device: parameter shapes without memory or init cost."""
    with torch.device("meta"):
        layers, _ = parse_model(yaml_load(f"models/{cfg}"), ch=[3])
    return layers


def _meta_model(cfg: str) -> DetectionModel:
    """A DetectionModel shell with meta layers (enough for routing questions such as imitation_points)."""
    model = DetectionModel.__new__(DetectionModel)
    nn.Module.__init__(model)
    model.yaml = yaml_load(f"models/{cfg}")
    model.model = _meta_layers(cfg)
    return model


def _fused_count(layers: nn.Module) -> int:
    """Parameters after fuse(): each Conv loses its BatchNorm (2c) and gains a conv bias (c)."""
    n = sum(p.numel() for p in layers.parameters())
    return n - sum(m.bn.num_features for m in layers.modules() if isinstance(m, Conv))


@pytest.fixture(scope="module")
def nano() -> DetectionModel:
    torch.manual_seed(0)
    return Model("yolov5n.yaml")


def _thin(cfg: str, **changes) -> dict:
    """A model dict at a quarter of nano's width: same routing, anchors and strides, cheaper to build."""
    return yaml_load(f"models/{cfg}") | {"width_multiple": 0.0625} | changes


@pytest.fixture(scope="module")
def nano6() -> DetectionModel:
    torch.manual_seed(0)
    return Model(_thin("yolov5n6.yaml"), nc=2)


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics so that eval-mode tests exercise them."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ---------------------------------------------------------------- building


@pytest.mark.parametrize("cfg", ALL_CFGS)
def test_parameter_counts_match_official(cfg):
    layers = _meta_layers(cfg)
    built, fused = sum(p.numel() for p in layers.parameters()), _fused_count(layers)
    assert abs(built / 1e6 - README_MILLIONS[cfg]) <= 0.1
    if cfg in OFFICIAL_BUILT:
        assert built == OFFICIAL_BUILT[cfg]
    if cfg in OFFICIAL_FUSED:
        assert fused == OFFICIAL_FUSED[cfg]


def test_fused_count_formula_matches_fuse(nano):
    model = deepcopy(nano)
    expected = _fused_count(model)
    model.fuse()
    assert sum(p.numel() for p in model.parameters()) == expected == OFFICIAL_FUSED["yolov5n.yaml"]
    assert not any(hasattr(m, "bn") for m in model.modules() if isinstance(m, Conv))


@pytest.mark.parametrize(
    "fixture, strides, official",
    [("nano", [8, 16, 32], OFFICIAL_ANCHORS_P5), ("nano6", [8, 16, 32, 64], OFFICIAL_ANCHORS_P6)],
)
def test_strides_and_anchors_in_grid_units(request, fixture, strides, official):
    model = request.getfixturevalue(fixture)
    detect = model.model[-1]
    assert model.stride.tolist() == strides
    pixels = torch.tensor(official, dtype=torch.float32).view(len(strides), -1, 2)
    assert torch.allclose(detect.anchors * detect.stride.view(-1, 1, 1), pixels)
    areas = detect.anchors.mul(detect.stride.view(-1, 1, 1)).prod(-1).mean(-1)
    assert torch.all(areas[1:] > areas[:-1])  # anchor order follows stride order
    assert model.layer_strides[-1] is None  # Detect
    for i in detect.f:  # Detect's inputs have exactly the Detect strides
        assert model.layer_strides[i] in strides
    assert [model.layer_strides[i] for i in detect.f] == strides
    assert model.layer_strides[0] == 2 and model.layer_strides[1] == 4


def test_detect_bias_init(nano):
    detect = nano.model[-1]
    for conv, s in zip(detect.m, detect.stride):
        b = conv.bias.detach().view(detect.na, -1)
        # a default Conv2d bias is within +-1/sqrt(fan_in); the priors are shifted by log(8 / (640 / s)^2) and
        # log(0.6 / (nc - 0.99999)), far below that
        obj_prior, cls_prior = math.log(8 / (640 / float(s)) ** 2), math.log(0.6 / (80 - 0.99999))
        bound = 1 / math.sqrt(conv.in_channels)
        assert torch.all((b[:, 4] - obj_prior).abs() <= bound + 1e-6)
        assert torch.all((b[:, 5:] - cls_prior).abs() <= bound + 1e-6)


def test_yaml_activation_is_scoped_to_the_model():
    model = Model(_thin("yolov5n.yaml", activation="nn.LeakyReLU(0.1)"))
    assert isinstance(model.model[0].act, nn.LeakyReLU) and isinstance(model.model[2].cv1.act, nn.LeakyReLU)
    assert isinstance(Conv.default_act, nn.SiLU)  # restored for later models
    assert isinstance(Conv(3, 8).act, nn.SiLU)


def test_nc_override_and_unknown_module():
    model = Model(_thin("yolov5n.yaml"), nc=1)
    assert model.model[-1].no == 6 and model.model[-1].m[0].out_channels == 18 and model.names == ["0"]
    cfg = yaml_load("models/yolov5n.yaml")
    cfg["head"][0][2] = "NotAModule"
    with pytest.raises(UserError, match="NotAModule"):
        Model(cfg)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("hw", [(64, 64), (96, 128)])
def test_output_shapes_train_and_eval(nano, hw):
    model = deepcopy(nano)
    h, w = hw
    x = torch.rand(2, 3, h, w)
    model.train()
    out = model(x)
    assert [tuple(o.shape) for o in out] == [(2, 3, h // s, w // s, 85) for s in (8, 16, 32)]
    model.eval()
    with torch.no_grad():
        inf, raw = model(x)
    n = sum(3 * (h // s) * (w // s) for s in (8, 16, 32))
    assert inf.shape == (2, n, 85)
    assert [tuple(o.shape) for o in raw] == [(2, 3, h // s, w // s, 85) for s in (8, 16, 32)]


def test_eval_decoding_matches_independent_formula(nano):
    """xy = (2 sigmoid - 0.5 + cell) * stride, wh = (2 sigmoid)^2 * anchor pixels, scores = sigmoid."""
    model = deepcopy(nano).eval()
    h, w = 64, 96
    with torch.no_grad():
        inf, raw = model(torch.rand(1, 3, h, w))
    detect, parts = model.model[-1], []
    for i, p in enumerate(raw):
        s = float(detect.stride[i])
        ny, nx = p.shape[2:4]
        gy, gx = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
        sig = p.sigmoid()
        x = (sig[..., 0] * 2 - 0.5 + gx) * s
        y = (sig[..., 1] * 2 - 0.5 + gy) * s
        aw = detect.anchors[i][:, 0].view(1, -1, 1, 1) * s
        ah = detect.anchors[i][:, 1].view(1, -1, 1, 1) * s
        wh = torch.stack(((sig[..., 2] * 2) ** 2 * aw, (sig[..., 3] * 2) ** 2 * ah), -1)
        parts.append(torch.cat((x[..., None], y[..., None], wh, sig[..., 4:]), -1).view(1, -1, 85))
    assert torch.allclose(inf, torch.cat(parts, 1), atol=1e-4)


def test_fuse_keeps_outputs(nano):
    model = deepcopy(nano)
    _randomize_bn(model)
    model.eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        before = model(x)[0]
        after = model.fuse()(x)[0]
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_fuse_conv_and_bn_matches_eval_bn():
    conv, bn = nn.Conv2d(4, 6, 3, 2, 1, groups=2, bias=True), nn.BatchNorm2d(6)
    _randomize_bn(bn)
    bn.eval()
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        assert torch.allclose(fuse_conv_and_bn(conv, bn)(x), bn(conv(x)), atol=1e-5)


def test_tta_shape_and_full_scale_part(nano):
    model = deepcopy(nano).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)[0]
        aug, none = model(x, augment=True)
    assert none is None
    per_level = [3 * (64 // s) ** 2 for s in (8, 16, 32)]  # 0.83 and 0.67 pad back up to 64 px
    n = sum(per_level)
    assert aug.shape == (1, (n - per_level[2]) + n + (n - per_level[0]), 85)
    assert torch.allclose(aug[:, : n - per_level[2]], plain[:, : n - per_level[2]])  # scale 1, P5 dropped


def test_apply_moves_stride_and_grids(nano):
    model = deepcopy(nano).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))  # builds grids
    model.half()
    detect = model.model[-1]
    assert detect.stride.dtype == torch.float16 and model.stride.dtype == torch.float16
    assert all(g.dtype == torch.float16 for g in detect.grid)
    model.float()
    assert detect.stride.dtype == torch.float32


# ---------------------------------------------------------------- FGFI forward


@pytest.mark.parametrize("cfg, point", [("yolov5s.yaml", 16), ("yolov5n.yaml", 16), ("yolov5s6.yaml", 22)])
def test_default_imitation_point_from_routing(cfg, point):
    model = _meta_model(cfg)
    assert model.imitation_points() == [point]
    assert model.imitation_points("detect") == list(model.model[-1].f)
    assert isinstance(model.model[point], Concat)
    # 'neck': the default point's rule at every level: the Concat feeding each Detect input's C3, stride by stride
    neck = model.imitation_points("neck")
    assert neck[0] == point and len(neck) == model.model[-1].nl
    assert neck == [j - 1 for j in model.model[-1].f] and all(isinstance(model.model[j], Concat) for j in neck)


def _box_target(model, image, level=0, cell=(3, 5), size=(64, 64)):
    """A target [1, 6] whose box is anchor 0 of `level`, centred on cell (y, x) of that level."""
    detect = model.model[-1]
    s = float(detect.stride[level])
    h, w = size
    aw, ah = (detect.anchors[level][0] * s).tolist()
    cy, cx = ((cell[0] + 0.5) * s, (cell[1] + 0.5) * s)
    return torch.tensor([[image, 0, cx / w, cy / h, aw / w, ah / h]])


def test_imitation_forward_default_point(nano):
    model = deepcopy(nano).train()
    x = torch.rand(2, 3, 64, 96)
    target = _box_target(model, image=1, cell=(3, 5), size=(64, 96))
    preds, feature, mask = model(x, target=target)
    plain = model(x)
    assert all(torch.equal(a, b) for a, b in zip(preds, plain))  # predictions unchanged by the extra outputs
    assert feature.shape == (2, 128, 8, 12)  # yolov5n layer 16: Concat of 64 + 64 channels, stride 8
    assert feature.requires_grad
    assert mask.shape == (2, 1, 8, 12) and mask.dtype.is_floating_point
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask[0].sum() == 0  # image 0 has no boxes
    assert mask[1, 0, 3, 5] == 1  # the cell where the box sits exactly on an anchor
    assert mask[1, 0, 7, 0] == 0  # far away
    # the same feature as a plain forward records at layer 16
    captured = {}
    handle = model.model[16].register_forward_hook(lambda m, i, o: captured.setdefault("f", o))
    model(x)
    handle.remove()
    assert torch.equal(captured["f"], feature)


def test_imitation_forward_lists_and_levels(nano):
    model = deepcopy(nano).train()
    x = torch.rand(1, 3, 64, 64)
    target = _box_target(model, image=0, level=1, cell=(1, 2))
    _, features, masks = model(x, target=target, imitation_layers="detect")
    assert len(features) == len(masks) == 3
    assert [tuple(m.shape) for m in masks] == [(1, 1, 64 // s, 64 // s) for s in (8, 16, 32)]
    assert [f.shape[-1] for f in features] == [8, 4, 2]
    assert masks[1][0, 0, 1, 2] == 1  # the level whose anchor the box equals
    _, features, masks = model(x, target=target, imitation_layers=[4, 6])  # backbone C3s at strides 8 and 16
    assert [f.shape[-1] for f in features] == [8, 4] and masks[1][0, 0, 1, 2] == 1
    empty = torch.zeros(0, 6)
    _, feature, mask = model(x, target=empty, imitation_layers=17)
    assert isinstance(feature, torch.Tensor) and mask.shape == (1, 1, 8, 8) and mask.sum() == 0


def test_imitation_forward_uses_imitation_mask_with_that_levels_anchors(nano, monkeypatch):
    import distill.mask

    calls = []

    def fake_mask(targets, anchors, shape, iou_factor=0.5, region="fgfi"):
        calls.append((anchors.clone(), tuple(shape), iou_factor, region))
        return torch.ones(shape)

    monkeypatch.setattr(distill.mask, "imitation_mask", fake_mask)
    model = deepcopy(nano).train()
    model(torch.rand(2, 3, 64, 96), target=torch.zeros(0, 6), imitation_layers=[16, 20, 23], iou_factor=0.3)
    detect = model.model[-1]
    assert [c[1] for c in calls] == [(2, 8, 12), (2, 4, 6), (2, 2, 3)]
    assert all(torch.equal(c[0], detect.anchors[k]) for k, c in enumerate(calls))
    assert all(c[2] == 0.3 and c[3] == "fgfi" for c in calls)
    calls.clear()
    model(torch.rand(1, 3, 64, 64), target=torch.zeros(0, 6), imitation_layers=17, region="gtbox")
    assert [c[3] for c in calls] == ["gtbox"]


@pytest.mark.parametrize(
    "layers, message", [([0], "stride 2"), ([24], "not valid"), ([-1], "not valid"), ("P3", "not valid"), ([], "empty")]
)
def test_imitation_bad_layers(nano, layers, message):
    model = deepcopy(nano).train()
    with pytest.raises(UserError, match=message):
        model(torch.rand(1, 3, 64, 64), target=torch.zeros(0, 6), imitation_layers=layers)


def test_extract_features_equals_full_forward_and_stops_early(nano):
    model = deepcopy(nano).eval()
    x = torch.rand(1, 3, 64, 96)
    captured = {}
    hooks = [model.model[i].register_forward_hook(lambda m, i, o, k=i: captured.__setitem__(k, o)) for i in (4, 16, 20)]
    with torch.no_grad():
        model(x)
        full = dict(captured)
        captured.clear()
        feats = model.extract_features(x, [16, 4])
    for h in hooks:
        h.remove()
    assert torch.equal(feats[0], full[16]) and torch.equal(feats[1], full[4])
    assert 20 not in captured  # layers after max(layers) never ran


def test_layer_strides_measured_for_pickles_without_them(nano):
    model = deepcopy(nano).train()
    recorded = list(model.layer_strides)
    del model.layer_strides  # as a YOLOv5 pickle: the class default None
    assert model.layer_strides is None
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.get_layer_strides() == recorded
    assert model.training  # mode restored
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))  # BatchNorm statistics untouched


def test_without_target_forward_is_plain(nano):
    model = deepcopy(nano).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x)[0], model(x, target=None, imitation_layers="detect")[0]
    assert torch.equal(a, b)


# ---------------------------------------------------------------- YOLOv5 compatibility

# Attributes official YOLOv5 v7.0 code reads on each module (its fuse(), forward, _apply, export, attempt_load, ...)
OFFICIAL_ATTRS = {
    Conv: ("conv", "bn", "act", "forward_fuse", "default_act"),
    Bottleneck: ("cv1", "cv2", "add"),
    C3: ("cv1", "cv2", "cv3", "m"),
    SPPF: ("cv1", "cv2", "m"),
    Concat: ("d",),
    Detect: ("nc", "no", "nl", "na", "grid", "anchor_grid", "anchors", "m", "inplace", "stride", "dynamic", "export"),
    DetectionModel: ("yaml", "model", "save", "names", "inplace", "stride", "yaml_file"),
}


def test_modules_have_official_attributes(nano):
    seen = set()
    for m in nano.modules():
        for cls, attrs in OFFICIAL_ATTRS.items():
            if type(m) is cls:
                seen.add(cls)
                missing = [a for a in attrs if not hasattr(m, a)]
                assert not missing, f"{cls.__name__} lacks {missing}"
    assert seen == set(OFFICIAL_ATTRS)
    for layer in nano.model:
        assert {"i", "f", "type", "np"} <= set(vars(layer))
    assert nano.model[2].type == "models.common.C3" and nano.model[-1].type == "models.yolo.Detect"
    assert Model is DetectionModel


def test_new_attributes_have_class_defaults():
    shell = DetectionModel.__new__(DetectionModel)  # what unpickling creates before restoring __dict__
    assert shell.layer_strides is None
    assert Detect.stride is None and Detect.dynamic is False and Detect.export is False


# ---------------------------------------------------------------- torch_utils


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="not valid"):
        select_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            select_device("0")
        with pytest.raises(UserError, match="no CUDA"):
            select_device("0,1")


def test_smart_optimizer_groups(nano):
    opt = smart_optimizer(nano, "SGD", lr=0.01, momentum=0.9, decay=5e-4)
    biases, weights, norms = (set(map(id, g["params"])) for g in opt.param_groups)
    for module in nano.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                assert id(p) in biases
            elif isinstance(module, nn.BatchNorm2d):
                assert id(p) in norms
            else:
                assert id(p) in weights
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4, 0.0]
    assert opt.param_groups[0]["nesterov"] is True
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(nano.parameters()))
    for name, cls in (("Adam", torch.optim.Adam), ("AdamW", torch.optim.AdamW), ("RMSProp", torch.optim.RMSprop)):
        assert isinstance(smart_optimizer(nano, name), cls)
    with pytest.raises(UserError):
        smart_optimizer(nano, "Lion")


def test_model_ema_follows_decay_ramp():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, tau=2)
    w0 = ema.ema[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 2))
    assert torch.allclose(ema.ema[0].weight, d * w0 + (1 - d) * model[0].weight)
    assert ema.updates == 1 and not any(p.requires_grad for p in ema.ema.parameters())
    assert torch.equal(ema.ema[1].num_batches_tracked, torch.tensor(0))  # integer buffers are not averaged


def test_early_stopping():
    stopper = EarlyStopping(patience=2)
    assert [stopper(e, f) for e, f in enumerate([0.1, 0.2, 0.1, 0.15, 0.3])] == [False, False, False, True, False]
    never = EarlyStopping(patience=0)
    assert not any(never(e, 0.0 if e else 1.0) for e in range(50))


def test_scale_img_pads_to_grid():
    img = torch.rand(1, 3, 64, 96)
    out = scale_img(img, 0.67, gs=32)
    assert out.shape == (1, 3, 64, 96)  # 42 x 64 padded up to multiples of 32
    assert torch.all(out[..., 42:, :] == 0.447)
    assert scale_img(img, 1.0) is img
