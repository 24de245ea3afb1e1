"""Output-term gradients added into the head outputs' own gradient, in place.

The output terms read the student's head outputs, per level [B, na, H, W, 5 + nc] (26 MB at P3 for nc 80, batch 16,
320 px), but touch few of their values: the objectness column and the teacher's top anchors' rows. Through autograd
alone each term returns a full-size gradient (zeros, then its values), which autograd then adds to the gradient of
YOLOv5's own losses: two full-size passes per term and level, every step. Instead the Distiller passes each level's
output through `tap`, an identity whose backward receives the sum of every other gradient of that output (YOLOv5's
box, objectness and class losses), and the terms hand their values to the tap (`sink_of(x).add(...)`) rather than
returning them; the tap's backward adds them into that sum in place and passes it on. The gradient is the same (to
float rounding: the order of the sums differs).

Autograd runs a tensor's consumers' backward before its producer's, so every term has handed over its values when
the tap's backward runs. A term called on an output that was not tapped (on its own, as the tests' references are)
returns the full-size gradient as before. Do not retain_grad() a tapped output: its gradient is updated in place.
"""

from __future__ import annotations

from typing import Callable

import torch


class GradSink:
    """The gradient updates handed to one tap: callables taking the output's gradient as a [n, 5 + nc] view of its
    rows (n = B * na * H * W), to update in place."""

    def __init__(self, width: int):
        self.width = width
        self.updates: list[Callable[[torch.Tensor], None]] = []

    def add(self, update: Callable[[torch.Tensor], None]) -> None:
        self.updates.append(update)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sink: GradSink):
        ctx.sink = sink
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        updates, ctx.sink.updates = ctx.sink.updates, []  # taken: a second backward (retain_graph) adds its own
        if updates:
            grad = grad.contiguous()  # the sum autograd made for this backward, written nowhere else
            rows = grad.view(-1, ctx.sink.width)
            for update in updates:
                update(rows)
        return grad, None


def tap(x: torch.Tensor) -> torch.Tensor:
    """x (a head output [..., 5 + nc]) as an identity whose gradient the output terms can add to in place."""
    sink = GradSink(x.shape[-1])
    out = _Tap.apply(x, sink)
    out._grad_sink = sink
    return out


def sink_of(x: torch.Tensor) -> GradSink | None:
    """The sink of a tapped output (tap), None for any other tensor."""
    return getattr(x, "_grad_sink", None)


def hand_over(
    sink: GradSink | None, update: Callable[[torch.Tensor], None], shape: torch.Size, dtype: torch.dtype, device
) -> torch.Tensor | None:
    """A term's backward: its gradient update for a tapped output, handed to the output's sink (returns None: the
    tap adds it in place), or, for an untapped output (sink None), applied to a fresh full-size zero gradient of
    `shape`, which it returns."""
    if sink is not None:
        sink.add(update)
        return None
    out = torch.zeros(shape, dtype=dtype, device=device)
    update(out.view(-1, shape[-1]))
    return out


def read_rows(x: torch.Tensor, rows: torch.Tensor, columns: int) -> torch.Tensor:
    """x.reshape(-1, x.shape[-1])[rows, :columns] ([K, columns]; rows distinct), whose backward adds into a tapped
    x's gradient in place (tap) or, for any other x, returns the full-size gradient autograd's indexing would."""
    return _ReadRows.apply(x, rows, columns)


class _ReadRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, columns: int):
        ctx.sink, ctx.shape, ctx.dtype, ctx.columns = sink_of(x), x.shape, x.dtype, columns
        ctx.save_for_backward(rows)
        return x.detach().reshape(-1, x.shape[-1])[rows, :columns]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        columns = ctx.columns

        def update(g: torch.Tensor) -> None:
            g[:, :columns].index_add_(0, rows, grad.to(g.dtype))

        return hand_over(ctx.sink, update, ctx.shape, ctx.dtype, grad.device), None, None
