"""Build script.

All metadata lives in pyproject.toml. This file exists so that the compiled extension in
``csrc/`` can be built ahead of time (``PKS4_BUILD_EXT=1``); without that switch the package is
pure Python.
"""

from setuptools import setup

setup()
