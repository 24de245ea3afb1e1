"""--distill-decouple: the distillation terms' gradient stepped apart from the detection loss's, under Adam and AdamW.

Adam divides each parameter's step by the root of its running mean squared gradient. When the terms' gradient is added
to the detection loss's on the student's shared layers, that mean grows and the detection loss's own step shrinks (and
where the terms' gradient dominates, it sets the step's sign): a student fine-tuned next to a teacher learns its boxes
slower than alone. Under SGD the step is linear in the gradient, so the two gradients add up unchanged.

Here one forward gives two backward passes into two gradient buffers of the student's parameters:

- the run's optimizer steps the detection loss's gradient exactly as for the student alone (and the adapters', which
  only the terms reach, as before);
- TermsAdam steps the terms' gradient with its own first and second moments, dividing by
  sqrt(max(v_detection, v_terms)): never larger than the terms' own Adam step, and in units of the detection loss's
  step where that gradient is the larger one, so the terms' weights keep their meaning.

With cap (--distill-cap K), each tensor's terms step is at most K x `share` (the batch's gate; 1 without the gate)
times the norm of the detection loss's own step of that tensor, measured as the parameter's change over the run's
optimizer step. Adam's step hardly shrinks when its gradient is scaled down (it divides by the root of the gradient's
own square), and the terms' gradient points the same way step after step where the detection loss's is noisy: on a
BCCD fine-tune with the gate at 0.24-0.38, the terms stepped the backbone by 0.73-0.93 of the detection loss's step.
The cap makes the gate (times K, 1 by default) a share of the student's own step.

A training loop uses it as

    decoupled = DecoupledStep(optimizer)                       # after the adapters' groups are added
    decoupled.backward(scaler, detection_loss, terms_loss)     # ComputeLoss.split; instead of loss.backward()
    with decoupled.terms_grads():                              # another terms-only loss (unlabelled images)
        terms_u.backward()
    scaler.step(optimizer); decoupled.step(scaler, share=gate)  # then scaler.update(), optimizer.zero_grad()
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from utils.torch_utils import clip_gradients

ADAM = (torch.optim.Adam, torch.optim.AdamW)


DEFAULT_CAP = 1.0  # --distill-cap: the terms' step at most the gate's share of the detection loss's (docs/results.md)


def decouple_refusal(optimizer: torch.optim.Optimizer, ddp: bool) -> str | None:
    """Why --distill-decouple cannot run with this optimizer or under DDP (None: it can)."""
    if ddp:
        return "not under DDP (two backward passes per forward); the terms' gradient is added to the detection loss's"
    if isinstance(optimizer, torch.optim.SGD):
        return "no effect under SGD (its step is linear in the gradient: the two steps add up to the same one)"
    if not isinstance(optimizer, ADAM):
        return f"only for Adam and AdamW, not {type(optimizer).__name__}; the terms' gradient is added as usual"
    return None


class TermsAdam(torch.optim.Optimizer):
    """Adam on the terms' gradient of the student's parameters, beside the run's Adam/AdamW (main) on the detection
    loss's gradient of the same parameters. Learning rate, betas and eps are main's, group by group, at every step
    (so its warmup and schedule apply); no weight decay (main applies it once).

    step: m, v <- Adam's moments of the terms' gradient g; p -= lr * m_hat / (sqrt(max(v_hat, main's v_hat)) + eps).
    """

    def __init__(self, main: torch.optim.Optimizer, groups: list[list[torch.nn.Parameter]]):
        beta1, beta2 = main.defaults["betas"]
        super().__init__(
            [{"params": params} for params in groups],
            dict(lr=main.defaults["lr"], betas=(beta1, beta2), eps=main.defaults["eps"]),
        )
        self.main = main

    @torch.no_grad()
    def step(self, closure=None, share: float | torch.Tensor | None = None, reference: dict | None = None) -> None:
        """One step; share and reference (parameter -> the detection loss's step of it): each tensor's step scaled
        down to at most share * ||reference[p]|| (DecoupledStep's cap)."""
        for group, ref in zip(self.param_groups, self.main.param_groups):
            lr, (beta1, beta2), eps = ref["lr"], ref["betas"], ref["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                v_hat = state["exp_avg_sq"] / (1 - beta2**t)
                main = self.main.state.get(p, {})
                if "exp_avg_sq" in main:  # the detection loss's second moment, bias-corrected at its own step
                    v_hat = torch.maximum(v_hat, main["exp_avg_sq"] / (1 - beta2 ** float(main["step"])))
                denominator = v_hat.sqrt_().add_(eps)
                if share is None:
                    p.addcdiv_(state["exp_avg"], denominator, value=-lr / (1 - beta1**t))
                    continue
                update = state["exp_avg"] / denominator * (-lr / (1 - beta1**t))
                limit, norm = share * torch.linalg.vector_norm(reference[p]), torch.linalg.vector_norm(update)
                p.add_(update.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-30), 1.0)))


class DecoupledStep:
    """The terms' gradient buffers of the student's parameters and their optimizer (see the module docstring).

    optimizer: the run's Adam/AdamW (utils.torch_utils.smart_optimizer); its first three groups are the student's
    (biases, decayed weights, normalization weights), the rest the adapters', which stay with it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cap: float = 0.0):
        groups = [[p for p in g["params"] if p.requires_grad] for g in optimizer.param_groups[:3]]
        self.params = [p for params in groups for p in params]
        self.grads: list[torch.Tensor | None] = [None] * len(self.params)
        self.optimizer = TermsAdam(optimizer, groups)
        self.cap = float(cap)  # > 0: each tensor's terms step at most cap x share x the detection loss's step of it
        self.before: list[torch.Tensor] | None = None  # the parameters before the run's optimizer step (cap only)

    def _swap(self) -> None:
        for i, p in enumerate(self.params):
            p.grad, self.grads[i] = self.grads[i], p.grad

    @contextmanager
    def terms_grads(self):
        """Inside the block the student's .grad are the terms' buffers: backward passes add to them."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def backward(self, scaler: torch.amp.GradScaler, detection: torch.Tensor, terms: torch.Tensor) -> None:
        """The detection loss's gradient into .grad, the terms' into their buffers (the adapters' into their .grad)."""
        if self.cap and self.before is None:  # the first backward of a step: the parameters the run's step starts from
            self.before = [p.detach().clone() for p in self.params]
        scaler.scale(detection).backward(retain_graph=terms.requires_grad)
        if terms.requires_grad:
            with self.terms_grads():
                scaler.scale(terms).backward()

    def step(self, scaler: torch.amp.GradScaler, max_norm: float = 10.0, share: float | torch.Tensor = 1.0) -> None:
        """The terms' step (their gradient clipped at max_norm, as the student's), after the run's optimizer step;
        then the buffers are emptied. Call before scaler.update(). share: the gate (how much better the teacher fits);
        with cap, each tensor's step is at most cap x share x the norm of its step by the run's optimizer."""
        with self.terms_grads():
            if any(p.grad is not None for p in self.params):
                scaler.unscale_(self.optimizer)
                clip_gradients([[p for p in self.params if p.grad is not None]], max_norm=max_norm)
                kwargs = {}
                if self.cap and self.before is not None:
                    reference = {p: p.detach() - b for p, b in zip(self.params, self.before)}
                    kwargs = dict(share=self.cap * share, reference=reference)
                scaler.step(self.optimizer, **kwargs)
        self.grads = [None] * len(self.params)
        self.before = None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
