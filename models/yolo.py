"""YOLOv5 detection model: the Detect head, DetectionModel (alias Model) and parse_model, built from a YAML.

The model is data: every layer carries ``.i`` (its index), ``.f`` (where its input comes from: -1 = previous layer,
or a list of indices), ``.type`` and ``.np`` (parameter count), and the forward pass routes by ``.f``. Layers are
picked for feature imitation (FGFI distillation) the same way, by index.

Usage: python models/yolo.py --cfg yolov5s.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import math
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

from models.common import (
    C3,
    C3SPP,
    C3TR,
    SPP,
    SPPF,
    Bottleneck,
    BottleneckCSP,
    C3Ghost,
    C3x,
    Concat,
    Contract,
    Conv,
    CrossConv,
    DWConv,
    DWConvTranspose2d,
    Expand,
    Focus,
    GhostBottleneck,
    GhostConv,
)
from utils.general import LOGGER, UserError, check_yaml, colorstr, make_divisible, yaml_load
from utils.torch_utils import fuse_conv_and_bn, initialize_weights, model_info, scale_img, select_device, time_sync

try:
    import thop  # FLOPs counting for profile=True
except ImportError:
    thop = None


class Detect(nn.Module):
    """YOLOv5 head: one 1x1 conv per level to na * (5 + nc) channels.

    ``anchors`` buffer: [nl, na, 2] in grid cells of each level (pixels / stride, set by DetectionModel).
    Training: returns a list of [B, na, H, W, 5 + nc] raw outputs. Eval: (inference [B, N, 5 + nc] with xywh in
    input pixels and sigmoid objectness/class scores, the raw list); ``export`` returns only the inference tensor.
    """

    stride = None  # [nl] strides, set by DetectionModel
    dynamic = False  # rebuild grids on every call
    export = False  # export mode

    def __init__(self, nc=80, anchors=(), ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5  # outputs per anchor: x, y, w, h, objectness, classes
        self.nl = len(anchors)  # detection levels
        self.na = len(anchors[0]) // 2  # anchors per level
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = inplace  # kept for checkpoint compatibility; decoding below never writes in place

    def forward(self, x):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape  # [B, na*no, H, W] -> [B, na, H, W, no]
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.dynamic or self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + self.grid[i]) * self.stride[i]  # centre in pixels, offset range (-0.5, 1.5) cells
                wh = (wh * 2) ** 2 * self.anchor_grid[i]  # size in pixels, 0..4 anchors
                z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        return x if self.training else (torch.cat(z, 1),) if self.export else (torch.cat(z, 1), x)

    def _make_grid(self, nx=20, ny=20, i=0):
        """Cell offsets [1, na, ny, nx, 2] (minus 0.5) and anchor sizes in pixels [1, na, ny, nx, 2]."""
        d, t = self.anchors[i].device, self.anchors[i].dtype
        shape = 1, self.na, ny, nx, 2
        yv, xv = torch.meshgrid(torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t), indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5  # so that xy = 2 * sigmoid - 0.5 + cell
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


def _check_anchor_order(m: Detect) -> None:
    """Flip the anchors if their mean area does not grow with the stride (anchors still in pixels here)."""
    a = m.anchors.prod(-1).mean(-1).view(-1)
    da, ds = a[-1] - a[0], m.stride[-1] - m.stride[0]
    if da and (da.sign() != ds.sign()):
        LOGGER.info(f"{colorstr('AutoAnchor: ')}Reversing anchor order")
        m.anchors[:] = m.anchors.flip(0)


class DetectionModel(nn.Module):
    """YOLOv5 detection model built from a YAML file name/path or an already loaded dict.

    Attributes: yaml (dict), model (nn.Sequential of layers with .i/.f/.type/.np), save (indices whose outputs
    later layers read), names, inplace, stride ([nl] tensor), layer_strides (per-layer output stride, None for Detect).
    """

    layer_strides = None  # class default: YOLOv5's own pickles lack it, get_layer_strides() fills it in

    def __init__(self, cfg: str | Path | dict = "yolov5s.yaml", ch: int = 3, nc: int | None = None, anchors=None):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml = cfg
        else:
            self.yaml_file = Path(cfg).name
            self.yaml = yaml_load(check_yaml(cfg, "model --cfg"))

        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        if anchors:
            LOGGER.info(f"Overriding model.yaml anchors with anchors={anchors}")
            self.yaml["anchors"] = round(anchors)  # anchors per level; AutoAnchor computes their sizes
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch])
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.inplace = self.yaml.get("inplace", True)

        m = self.model[-1]
        if isinstance(m, Detect):
            s = 256  # 2x the largest stride of P6 models; every level gets a whole number of cells
            m.inplace = self.inplace
            out, feats = self._run(torch.zeros(1, ch, s, s), keep=set(range(len(self.model))))
            m.stride = torch.tensor([s / x.shape[-2] for x in out])
            self.layer_strides = [
                _as_number(s / f.shape[-2]) if isinstance(f, torch.Tensor) else None for f in feats.values()
            ]
            _check_anchor_order(m)
            m.anchors /= m.stride.view(-1, 1, 1)  # pixels -> grid cells of each level
            self.stride = m.stride
            self._initialize_biases()

        initialize_weights(self)
        self.info()
        LOGGER.info("")

    def forward(
        self,
        x: torch.Tensor,
        augment: bool = False,
        profile: bool = False,
        visualize: bool | str | Path = False,
        target: torch.Tensor | None = None,
        imitation_layers: int | list[int] | str | None = None,
        iou_factor: float = 0.5,
        region: str = "fgfi",
        anchor_t: float | None = None,
    ):
        """x: [B, C, H, W] images in 0..1, H and W multiples of the largest stride.

        Without ``target``: exactly YOLOv5 (training: list of [B, na, h, w, 5 + nc]; eval: (inference, list);
        augment: (TTA inference, None)).
        With ``target`` ([n, 6] (image, class, x, y, w, h), xywh normalized): returns (preds, feature, mask) for
        FGFI imitation; preds as above for the current mode, feature = output of the imitated layer [B, C, h, w]
        and mask = distill.mask.imitation_mask(...) [B, 1, h, w] (0/1 float) from the anchors of the Detect level
        with that layer's stride. ``imitation_layers``: None = the default point (imitation_points()), an int = that
        layer (tensors returned), a list of ints or 'detect' (Detect's inputs) = lists, one entry per layer.
        ``region``: the imitated region, "fgfi" (anchor IoU > iou_factor * best), "gtbox" or "full". ``anchor_t``:
        each level's mask from the boxes the loss assigns to that level (anchor ratio < anchor_t); None: every box.
        """
        if target is not None:
            return self._forward_imitation(x, target, imitation_layers, iou_factor, region, anchor_t)
        if augment:
            return self._forward_augment(x)
        return self._forward_once(x, profile, visualize)

    def _forward_once(self, x, profile=False, visualize=False):
        return self._run(x, profile=profile, visualize=visualize)[0]

    def _run(self, x, keep=frozenset(), stop=None, profile=False, visualize=False):
        """Route x through the layers by their ``.f``; returns (last output, {i: output for i in keep}).

        stop: last layer index to run (the remaining layers are skipped)."""
        y, dt, kept = [], [], {}
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if profile:
                self._profile_one_layer(m, x, dt)
            x = m(x)
            y.append(x if m.i in self.save or m.i in keep else None)
            if m.i in keep:
                kept[m.i] = x
            if visualize:
                _visualize(x, m, visualize)
            if stop is not None and m.i >= stop:
                break
        return x, kept

    def forward_intermediates(
        self, x: torch.Tensor, layers: list[int], stop_early: bool = False
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
        """Run x [B, C, H, W] and hand out the outputs of `layers` (indices as the model YAML numbers them).

        Returns (preds, features): preds as forward(x) gives them for the current mode, or None with stop_early (the
        layers after max(layers) are skipped: a cheap pass for a teacher's features); features [B, C_i, h_i, w_i]
        in the order of `layers`. The one way callers outside the model read its intermediate maps.
        """
        layers = [int(i) for i in layers]
        preds, kept = self._run(x, keep=set(layers), stop=max(layers) if stop_early and layers else None)
        return (None if stop_early else preds), [kept[i] for i in layers]

    def _forward_imitation(self, x, target, imitation_layers, iou_factor, region="fgfi", anchor_t=None):
        """forward(x, target=...): (preds, feature, mask), see forward. The mask comes from distill.mask, the only
        part of distill/ the model uses (imported here, not at the top: distill/ is built on this module)."""
        from distill.mask import imitation_mask, matched_boxes

        points = self.imitation_points(imitation_layers)
        levels = self.imitation_levels(points)
        preds, features = self.forward_intermediates(x, points)
        anchors = self.model[-1].anchors
        masks = []
        for f, level in zip(features, levels):
            boxes = target if anchor_t is None else matched_boxes(target, anchors[level], f.shape[2:], anchor_t)
            mask = imitation_mask(boxes, anchors[level], (f.shape[0], f.shape[2], f.shape[3]), iou_factor, region)
            masks.append(mask.to(f.device).unsqueeze(1))
        if imitation_layers is None or isinstance(imitation_layers, int):
            return preds, features[0], masks[0]
        return preds, features, masks

    def imitation_points(self, imitation_layers: int | list[int] | str | None = None) -> list[int]:
        """Layer indices of imitation_layers.

        None: the default FGFI point, the input of the layer that feeds Detect's first (highest resolution) input:
        layer 16 (the stride-8 Concat) in yolov5s.yaml, layer 22 in the P6 models. 'neck': the same point at every
        Detect level (16, 19, 22 in yolov5s.yaml: the Concats before each level's C3). 'detect': Detect's inputs
        (17, 20, 23). An int or a list of ints: those layers.
        """
        detect_i = len(self.model) - 1
        detect_from = [j % detect_i if j < 0 else j for j in _as_list(self.model[-1].f)]  # -1 -> detect_i - 1
        if imitation_layers is None:
            return [self._input_of(detect_from[0])]
        if isinstance(imitation_layers, str):
            kind = imitation_layers.strip().lower()
            if kind == "neck":
                return [self._input_of(j) for j in detect_from]
            if kind != "detect":
                raise UserError(
                    f"--imitation-layers '{imitation_layers}' is not valid: use 'detect', 'neck' or layer indices"
                )
            return detect_from
        layers = _as_list(imitation_layers)
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < detect_i:
                raise UserError(f"imitation layer {i!r} is not valid: use layer indices 0..{detect_i - 1}")
        if not layers:
            raise UserError("--imitation-layers is empty: give at least one layer index, or 'detect'")
        return layers

    def imitation_levels(self, points: list[int]) -> list[int]:
        """For each layer index, the Detect level with the same stride (whose anchors make its mask)."""
        strides = self.get_layer_strides()
        detect_strides = [float(s) for s in self.model[-1].stride]
        levels = []
        for i in points:
            hits = [k for k, s in enumerate(detect_strides) if strides[i] is not None and abs(s - strides[i]) < 1e-6]
            if not hits:
                raise UserError(
                    f"imitation layer {i} has stride {strides[i]}, but the Detect levels have strides "
                    f"{[_as_number(s) for s in detect_strides]}: pick layers at one of those strides"
                )
            levels.append(hits[0])
        return levels

    def _input_of(self, feeder: int) -> int:
        """The layer whose output feeds layer `feeder` (its single input), or feeder itself when it merges several."""
        src = self.model[feeder].f
        if not isinstance(src, int):
            return feeder
        return src % feeder if src < 0 else src

    def get_layer_strides(self) -> list:
        """Per-layer output strides (None for Detect); measured once with a dummy forward if not recorded at build."""
        if self.layer_strides is None:
            p = next(self.parameters())
            s = 2 * int(max(self.stride.max(), 32)) if getattr(self, "stride", None) is not None else 256
            training = self.training
            try:
                self.eval()
                with torch.no_grad():
                    _, feats = self._run(
                        torch.zeros(1, self.yaml.get("ch", 3) if hasattr(self, "yaml") else 3, s, s).to(p),
                        keep=set(range(len(self.model))),
                    )
            finally:
                self.train(training)
            self.layer_strides = [
                _as_number(s / f.shape[-2]) if isinstance(f, torch.Tensor) else None for f in feats.values()
            ]
        return self.layer_strides

    def extract_features(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Outputs [B, C, h, w] of the given layers, running the model only up to max(layers) (cheap teacher pass)."""
        return self.forward_intermediates(x, self.imitation_points(list(layers)), stop_early=True)[1]

    def _forward_augment(self, x):
        """Test-time augmentation: scales (1, 0.83, 0.67) with flips (none, left-right, none), merged."""
        img_size = x.shape[-2:]
        y = []
        for si, fi in zip((1, 0.83, 0.67), (None, 3, None)):  # flips: 2 up-down, 3 left-right
            xi = scale_img(x.flip(fi) if fi else x, si, gs=int(self.stride.max()))
            yi = self._forward_once(xi)[0]
            y.append(self._descale_pred(yi, fi, si, img_size))
        y = self._clip_augmented(y)
        return torch.cat(y, 1), None

    def _descale_pred(self, p, flips, scale, img_size):
        """Map predictions [B, N, 5 + nc] of a scaled/flipped image back to the original image."""
        if self.inplace:
            p[..., :4] /= scale
            if flips == 2:
                p[..., 1] = img_size[0] - p[..., 1]
            elif flips == 3:
                p[..., 0] = img_size[1] - p[..., 0]
        else:
            x, y, wh = p[..., 0:1] / scale, p[..., 1:2] / scale, p[..., 2:4] / scale
            if flips == 2:
                y = img_size[0] - y
            elif flips == 3:
                x = img_size[1] - x
            p = torch.cat((x, y, wh, p[..., 4:]), -1)
        return p

    def _clip_augmented(self, y):
        """Drop the smallest-stride predictions of the full-size pass and the largest of the smallest pass."""
        nl = self.model[-1].nl
        g = sum(4**x for x in range(nl))  # grid points, in units of the coarsest level
        e = 1  # levels to exclude
        i = (y[0].shape[1] // g) * sum(4**x for x in range(e))
        y[0] = y[0][:, :-i]
        i = (y[-1].shape[1] // g) * sum(4 ** (nl - 1 - x) for x in range(e))
        y[-1] = y[-1][:, i:]
        return y

    def _profile_one_layer(self, m, x, dt):
        c = m == self.model[-1]  # Detect edits its input list: give it a copy
        o = thop.profile(m, inputs=(x.copy() if c else x,), verbose=False)[0] / 1e9 * 2 if thop else 0
        t = time_sync()
        for _ in range(10):
            m(x.copy() if c else x)
        dt.append((time_sync() - t) * 100)
        if m == self.model[0]:
            LOGGER.info(f"{'time (ms)':>10s} {'GFLOPs':>10s} {'params':>10s}  module")
        LOGGER.info(f"{dt[-1]:10.2f} {o:10.2f} {m.np:10.0f}  {m.type}")
        if c:
            LOGGER.info(f"{sum(dt):10.2f} {'-':>10s} {'-':>10s}  Total")

    def _initialize_biases(self, cf=None):
        """Objectness prior of 8 objects per 640 image, class prior 0.6/nc (https://arxiv.org/abs/1708.02002 3.3).

        cf: optional class frequencies [nc]."""
        m = self.model[-1]
        for mi, s in zip(m.m, m.stride):
            b = mi.bias.view(m.na, -1)  # [na * no] -> [na, no]
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5 : 5 + m.nc] += math.log(0.6 / (m.nc - 0.99999)) if cf is None else torch.log(cf / cf.sum())
            mi.bias = torch.nn.Parameter(b.view(-1), requires_grad=True)

    def fuse(self):
        """Fold every Conv's BatchNorm into its conv weights (inference only)."""
        LOGGER.info("Fusing layers... ")
        for m in self.model.modules():
            if isinstance(m, (Conv, DWConv)) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
        self.info()
        return self

    def info(self, verbose: bool = False, img_size: int = 640) -> None:
        model_info(self, verbose, img_size)

    def _apply(self, fn):
        # .to()/.half()/.cuda() also for the tensors that are plain attributes, not parameters or buffers
        self = super()._apply(fn)
        m = self.model[-1]
        if isinstance(m, Detect):
            m.stride = fn(m.stride)
            m.grid = list(map(fn, m.grid))
            if isinstance(m.anchor_grid, list):
                m.anchor_grid = list(map(fn, m.anchor_grid))
            if isinstance(getattr(self, "stride", None), torch.Tensor):
                self.stride = m.stride
        return self


Model = DetectionModel  # YOLOv5 <= v6.1 checkpoints pickle the model under this name


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _as_number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-6 else x


def _visualize(x, m, save_dir) -> None:
    try:
        from utils.plots import feature_visualization
    except ImportError:
        LOGGER.warning("WARNING: --visualize needs utils.plots.feature_visualization, which is not available")
        return
    feature_visualization(x, m.type, m.i, save_dir=save_dir)


# Modules a model YAML may name; parse_model looks names up here instead of eval()-ing them.
MODULES = {
    c.__name__: c
    for c in (
        Conv,
        GhostConv,
        Bottleneck,
        GhostBottleneck,
        SPP,
        SPPF,
        DWConv,
        Focus,
        CrossConv,
        BottleneckCSP,
        C3,
        C3TR,
        C3SPP,
        C3Ghost,
        C3x,
        DWConvTranspose2d,
        Concat,
        Contract,
        Expand,
        Detect,
    )
}
MODULES.update({f"nn.{k}": v for k, v in vars(nn).items() if isinstance(v, type) and issubclass(v, nn.Module)})
_CHANNEL_MODULES = {
    Conv, GhostConv, Bottleneck, GhostBottleneck, SPP, SPPF, DWConv, Focus, CrossConv, BottleneckCSP, C3, C3TR,
    C3SPP, C3Ghost, nn.ConvTranspose2d, DWConvTranspose2d, C3x,
}  # fmt: skip
_REPEAT_MODULES = {BottleneckCSP, C3, C3TR, C3Ghost, C3x}


@contextlib.contextmanager
def _default_activation(act: str | None):
    """Use the YAML's `activation` (e.g. 'nn.LeakyReLU(0.1)') as Conv's default while building, then restore."""
    if not act:
        yield
        return
    previous = Conv.default_act
    try:
        Conv.default_act = eval(act, {"__builtins__": {}, "nn": nn})  # a constructor expression like nn.SiLU()
    except Exception as e:
        raise UserError(f"model YAML activation '{act}' is not valid: use e.g. nn.SiLU() or nn.LeakyReLU(0.1)") from e
    LOGGER.info(f"{colorstr('activation:')} {act}")
    try:
        yield
    finally:
        Conv.default_act = previous


def parse_model(d: dict, ch: list[int]) -> tuple[nn.Sequential, list[int]]:
    """Build the layers described by a model dict; ch = [input channels]. Returns (layers, sorted save list)."""
    LOGGER.info(f"\n{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
    anchors, nc, gd, gw = d["anchors"], d["nc"], d["depth_multiple"], d["width_multiple"]
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors, "na": na, "no": no, "None": None, "True": True, "False": False}

    layers, save, c2 = [], [], ch[-1]
    with _default_activation(d.get("activation")):
        for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):  # from, number, module, args
            if isinstance(m, str):
                if m not in MODULES:
                    raise UserError(f"model YAML layer {i}: unknown module '{m}'")
                m = MODULES[m]
            args = [names.get(a, a) if isinstance(a, str) else a for a in args]

            n = n_ = max(round(n * gd), 1) if n > 1 else n  # depth gain
            if m in _CHANNEL_MODULES:
                c1, c2 = ch[f], args[0]
                if c2 != no:  # not an output layer
                    c2 = make_divisible(c2 * gw, 8)
                args = [c1, c2, *args[1:]]
                if m in _REPEAT_MODULES:
                    args.insert(2, n)  # the module repeats internally
                    n = 1
            elif m is nn.BatchNorm2d:
                args = [ch[f]]
            elif m is Concat:
                c2 = sum(ch[x] for x in f)
            elif m is Detect:
                args.append([ch[x] for x in f])
                if isinstance(args[1], int):  # number of anchors only
                    args[1] = [list(range(args[1] * 2))] * len(f)
            elif m is Contract:
                c2 = ch[f] * args[0] ** 2
            elif m is Expand:
                c2 = ch[f] // args[0] ** 2
            else:
                c2 = ch[f]

            m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
            t = str(m)[8:-2].replace("__main__.", "")  # e.g. models.common.C3
            np_ = sum(x.numel() for x in m_.parameters())
            m_.i, m_.f, m_.type, m_.np = i, f, t, np_
            LOGGER.info(f"{i:>3}{str(f):>18}{n_:>3}{np_:10.0f}  {t:<40}{str(args):<30}")
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m_)
            if i == 0:
                ch = []
            ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg", type=str, default="yolov5s.yaml", help="model.yaml")
    parser.add_argument("--batch-size", type=int, default=1, help="total batch size for all GPUs")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--line-profile", action="store_true", help="profile model speed layer by layer")
    opt = parser.parse_args()
    try:
        device = select_device(opt.device)
        model = Model(opt.cfg).to(device)
        if opt.line_profile:
            model(torch.rand(opt.batch_size, 3, 640, 640).to(device), profile=True)
    except UserError as e:
        raise SystemExit(f"{e}") from None
