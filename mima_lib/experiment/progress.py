"""Progress lines with an ETA for the stages, and their way out of a headless kernel.

A stage prints one timestamped line per unit of work (an immunization step group, an attack run) through
:func:`mima_lib.experiment.stages.common.log`. Inside JupyterLab these lines are the cell's output; under
the runner (:mod:`mima_lib.experiment.run`) papermill hands the kernel's stdout to :class:`LogForwarder`,
which passes the timestamped lines on, so a long notebook no longer shows only "[4/5] ... done in 629 s".
"""
from __future__ import annotations

import re
import time

__all__ = ["Progress", "LogForwarder", "format_seconds"]

STAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ")  # the stages' log lines (stages/common.py: log)


def format_seconds(s: float) -> str:
    if s != s:  # nan: nothing measured yet
        return "?"
    s = int(round(s))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class Progress:
    """Counts units of work and reports `what: k/n (p%), elapsed, ETA` through ``log``.

    The ETA is the mean time per unit so far times the units left. ``every`` units (default: about a tenth
    of the total) or ``min_interval`` seconds, whichever comes first, pass between two lines; the last
    unit always reports."""

    def __init__(self, what: str, total: int, log, every: int | None = None, min_interval: float = 30.0,
                 clock=time.perf_counter):
        self.what, self.total, self.log, self.clock = what, max(0, int(total)), log, clock
        self.every = every or max(1, self.total // 10)
        self.min_interval = min_interval
        self.t0 = self.last = clock()
        self.done, self.first = 0, None  # first: units already done when counting began (a resumed run)

    def eta(self, now: float | None = None) -> float:
        ran = self.done - (self.first or 0)
        if ran <= 0:
            return float("nan")
        return ((self.clock() if now is None else now) - self.t0) / ran * (self.total - self.done)

    def update(self, done: int | None = None, detail: str = "") -> None:
        self.done = self.done + 1 if done is None else int(done)
        if self.first is None:
            self.first = self.done - 1
        now = self.clock()
        due = self.done % self.every == 0 or now - self.last >= self.min_interval or self.done >= self.total
        if not due:
            return
        self.last = now
        pct = 100 * self.done / self.total if self.total else 100.0
        tail = f"; {detail}" if detail else ""
        self.log(f"{self.what}: {self.done}/{self.total} ({pct:.0f}%), {format_seconds(now - self.t0)} elapsed, "
                 f"ETA {format_seconds(self.eta(now))}{tail}")


class LogForwarder:
    """A file-like sink for papermill's ``stdout_file``: whole lines that carry a stage timestamp go to
    ``log`` (indented under the runner's "[k/n] notebook ..." line); everything else a cell prints stays
    in the executed notebook only."""

    def __init__(self, log, indent: str = "    "):
        self.log, self.indent, self.buffer = log, indent, ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            line = line.rstrip("\r")
            if STAMP.match(line):
                self.log(self.indent + line)
        return len(text)

    def flush(self) -> None:
        pass
