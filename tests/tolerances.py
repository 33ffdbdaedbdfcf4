"""Per-dtype tolerances for comparing an implementation against a higher-precision reference.

The comparisons this is meant for run an implementation in ``dtype`` and the reference in float64
on the *same* inputs (the half-precision inputs upcast, so both see identical rounded values).
The remaining error is then (a) the rounding of the result to ``dtype`` and (b) for float32 and
float64, the accumulated rounding of the arithmetic (the scans keep their state in float32 for
half-precision inputs, so (b) is float32-sized there and (a) dominates).

How the numbers were chosen: ``motion_scan(backend="torch")`` was compared against
``motion_scan_ref`` in float64 for y, the last state and the gradients of all nine inputs, over
shapes up to (batch, T, L, D, N) = (2, 16, 4, 8, 16), both scan directions and several seeds,
with inputs of magnitude ~1. Largest errors measured (relative error on elements at least a
tenth of the tensor's largest; absolute error divided by the tensor's largest magnitude):

    float64   relative 4e-15,  absolute 1e-15
    float32   relative 2e-6,   absolute 5e-7
    float16   relative 4.9e-4, absolute 4.6e-4   (= 2**-11, the rounding of the result)
    bfloat16  relative 3.9e-3, absolute 3.4e-3   (= 2**-8,  the rounding of the result)

``rtol`` is set about four times above the measured relative error (for half precision: four
units of the final rounding, so a result that is even one rounding step off systematically would
still pass, but a missing term or a wrong sign would not). ``atol`` only has to cover elements
near zero, whose error is that of the arithmetic, not of the final rounding; it is meant to be
scaled by the magnitude of the compared values (see :func:`assert_close`). float64 is held to
1e-12: far above its measured error (which grows with the sequence length), far below any bug.
"""

from __future__ import annotations

from typing import Optional

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-4, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """``dict(atol=..., rtol=...)`` for ``dtype``, ``atol`` multiplied by ``scale``."""
    tol = TOLERANCES[dtype]
    return dict(atol=tol["atol"] * scale, rtol=tol["rtol"])


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    scale: float = 1.0,
    msg: Optional[str] = None,
) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: ``actual``'s).

    ``scale`` is the magnitude of the compared values: ``atol`` is multiplied by it, because the
    absolute error of a floating-point computation grows with the size of its terms (a gradient
    summed over many positions, a long scan). When the dtypes differ (a half-precision result
    against a float64 reference) both are compared in float64; check dtypes separately.
    """
    tol = tolerance(dtype if dtype is not None else actual.dtype, scale)
    if actual.dtype != expected.dtype:
        actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    torch.testing.assert_close(actual, expected, **tol, msg=msg)
