"""The one failure latch of the fused path's kernels.

A kernel that fails -- a Triton configuration whose first launch raises, the native C++ library whose
build fails -- is reported once, loudly (a ``RuntimeWarning`` and the ``dyrelu`` logger's error, both
naming the kernel and the error), and is not tried again in this process: the next module of the
backend chain (``backend.kernels``) computes the same function from then on.
"""
from __future__ import annotations

import logging
import warnings

FAILED: dict = {}  # key -> the error, for every kernel that failed


def failed(key) -> bool:
    return key in FAILED


def fail(key, what: str, err: Exception, instead: str, stacklevel: int = 4) -> None:
    """Latches ``key`` failed and says so once: ``what`` failed (``err``); ``instead`` runs from now on."""
    FAILED[key] = f"{type(err).__name__}: {err}"
    msg = f"dyrelu: {what} failed ({type(err).__name__}: {str(err).strip()[:500]}); {instead}"
    logging.getLogger("dyrelu").error(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
