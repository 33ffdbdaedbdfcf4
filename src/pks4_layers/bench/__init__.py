"""Benchmarks that ship with the package: ``pks4-bench`` (:mod:`.scan_speed`) and the timing
and reporting helpers they share with the source checkout's other benchmarks (:mod:`.timing`).
"""
