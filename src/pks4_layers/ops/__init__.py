"""The motion-gated selective scan and its implementations."""

from .motion_scan import available_backends, motion_scan
from .reference import motion_scan_ref

__all__ = ["available_backends", "motion_scan", "motion_scan_ref"]
