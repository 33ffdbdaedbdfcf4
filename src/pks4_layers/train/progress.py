"""A dependency-free progress line for long loops (rank 0 only, to stderr)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """``with Progress(total, "epoch 1/10") as bar: bar.update(loss=0.7)`` prints
    ``epoch 1/10 [#####.....] 12/24 loss 0.7000 1.3 it/s eta 9s``, in place on a terminal and
    every ``every`` steps (plus the last) otherwise, so logs stay readable."""

    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        stream: Optional[TextIO] = None,
        every: int = 10,
        width: int = 20,
    ) -> None:
        self.total = max(total, 1)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.width = width
        self.count = 0
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def update(self, **values: float) -> None:
        self.count += 1
        if not self.enabled:
            return
        if not self.tty and self.count % self.every and self.count != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        filled = int(self.width * min(self.count, self.total) / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        stats = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        line = f"{self.desc} [{bar}] {self.count}/{self.total} {stats}"
        line += f" {rate:.2f} it/s eta {eta:.0f}s"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()
