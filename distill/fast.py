"""The one switch for the hand-written fast kernels of distill/, each with its plain-autograd reference beside it:

- the sparse adapter (distill/sparse.py: the adapter conv at the masked cells only; reference: the dense conv,
  Distiller(sparse_max_share=0));
- _LogitKL (distill/terms.py: kd's objectness + class KL with a written-out backward; reference:
  _logit_kl_reference) and _CellConv (distill/sparse.py: the sparse conv's chunked products; reference:
  neighbourhoods + F.linear).

On by default; FGFI_FAST_KERNELS=0 in the environment (or fast_kernels(False) around a call) runs the references,
which read as the method's formulas. tests/test_distill_fast.py holds each kernel equal to its reference in values
and gradients. bf16 is not a kernel but a precision (--distill-precision).
"""

from __future__ import annotations

import contextlib
import os

_FAST = os.getenv("FGFI_FAST_KERNELS", "1") != "0"


def use_fast_kernels() -> bool:
    """Whether distill/ runs its fast kernels (True by default) or their plain-autograd references."""
    return _FAST


@contextlib.contextmanager
def fast_kernels(on: bool):
    """Run the block with the fast kernels on or off, then restore the switch."""
    global _FAST
    before, _FAST = _FAST, bool(on)
    try:
        yield
    finally:
        _FAST = before
