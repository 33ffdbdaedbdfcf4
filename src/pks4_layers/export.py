"""Choosing the scan backend of a whole model, and ``torch.export`` of PKS4 models.

Every selective scan of a model lives in a :class:`~pks4_layers.layers.temporal_scan.
DirectionalScan` with a ``backend`` attribute (``"auto"`` by default: the compiled kernel of the
inputs' device). :func:`set_scan_backend` sets all of them at once, :func:`scan_backend` does so
for the duration of a ``with`` block, and :func:`export_program` runs ``torch.export.export``
with the scans on a chosen backend (``"torch"`` by default).

What exports, with torch 2.14 (both are checked in ``tests/test_guarantees.py``):

* ``backend="torch"``: the exported graph holds ATen operators only, so the program runs
  wherever torch does, without this package's compiled extension. The number of frames ``T``
  is specialised (the backward's recompute segment length is chosen from ``T`` in Python);
  the batch can be a dynamic dimension.
* the compiled op (``backend="auto"`` or ``"cpu"``): ``torch.export.export`` traces through it
  directly, because ``pks4::motion_scan_fwd`` has a fake kernel; the graph then calls
  ``torch.ops.pks4.motion_scan_fwd``, so running or loading the program needs
  ``pks4_layers`` imported with the compiled extension loaded, on the device it was exported
  for. Batch and ``T`` (``T >= 3``) can both be dynamic dimensions.

So no model needs to be changed for export; the ``torch`` backend is the default of
:func:`export_program` because its program is self-contained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from .layers.temporal_scan import DirectionalScan
from .ops.motion_scan import KNOWN_BACKENDS

__all__ = ["SCAN_BACKENDS", "export_program", "scan_backend", "scan_modules", "set_scan_backend"]

# What a DirectionalScan's ``backend`` may be set to.
SCAN_BACKENDS = ("auto", *KNOWN_BACKENDS)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def _check_backend(backend: object) -> str:
    if not isinstance(backend, str) or backend not in SCAN_BACKENDS:
        raise ValueError(f"backend: expected one of {list(SCAN_BACKENDS)}, got {backend!r}")
    return backend


def scan_modules(model: nn.Module) -> list[DirectionalScan]:
    """Every scan of ``model`` (in ``model.modules()`` order; wrappers such as
    DistributedDataParallel or ``torch.compile``'s hold the model as a submodule, so they are
    searched too)."""
    _check_model(model)
    return [m for m in model.modules() if isinstance(m, DirectionalScan)]


def set_scan_backend(model: ModuleT, backend: str) -> ModuleT:
    """Set the backend of every scan in ``model``; returns ``model`` (changed in place).

    Args:
        model: any module; one without scans is returned unchanged.
        backend: ``"auto"`` or one of :data:`pks4_layers.ops.motion_scan.KNOWN_BACKENDS`.
            Whether the backend can run on the model's device is checked at the next forward,
            as for a backend given to the constructor.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown backend name (nothing is changed then).
    """
    backend = _check_backend(backend)
    for m in scan_modules(model):
        m.backend = backend
    return model


@contextlib.contextmanager
def scan_backend(model: ModuleT, backend: str) -> Iterator[ModuleT]:
    """Run every scan of ``model`` on ``backend`` inside the ``with`` block; yields ``model``.

    Each scan's own backend is restored on exit, also when the block raises (scans with
    different backends before get them back individually).
    """
    backend = _check_backend(backend)
    scans = scan_modules(model)
    saved = [m.backend for m in scans]
    try:
        for m in scans:
            m.backend = backend
        yield model
    finally:
        for m, previous in zip(scans, saved):
            m.backend = previous


def export_program(
    model: nn.Module, *example_args: Any, backend: str = "torch", **export_kwargs: Any
) -> torch.export.ExportedProgram:
    """``torch.export.export(model, example_args, **export_kwargs)`` with every scan on
    ``backend``; the model's own backends are restored afterwards.

    Args:
        model: the model, in the mode (``train()`` / ``eval()``) to export.
        example_args: positional example inputs, e.g. a clip ``(B, T, 3, H, W)`` for a
            :class:`~pks4_layers.models.PKS4VideoClassifier` or a map ``(B, T, C, H, W)`` for
            a :class:`~pks4_layers.PKS4Block`.
        backend: ``"torch"`` (default) for a program of ATen operators only; ``"auto"`` or
            ``"cpu"`` to keep the compiled op in the graph (see the module docstring).
        export_kwargs: passed on to ``torch.export.export`` (``kwargs``, ``dynamic_shapes``,
            ``strict``, ...).

    Returns:
        the ``torch.export.ExportedProgram``; ``program.module()(*example_args)`` computes what
        ``model(*example_args)`` does.
    """
    _check_model(model)
    with scan_backend(model, backend):
        return torch.export.export(model, tuple(example_args), **export_kwargs)
