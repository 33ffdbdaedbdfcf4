"""Shared fixtures."""

from __future__ import annotations

from typing import Callable

import pytest

from external_refs import load_selective_scan_ref


@pytest.fixture
def mamba_selective_scan_ref() -> Callable:
    """mamba-ssm's pure-PyTorch ``selective_scan_ref``; skips when mamba-ssm is unavailable."""
    fn, reason = load_selective_scan_ref()
    if fn is None:
        pytest.skip(reason)
    return fn
