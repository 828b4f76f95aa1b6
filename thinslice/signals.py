"""SIGTERM/SIGINT set a flag the training loop checks, so a preempted job saves before it exits."""
from __future__ import annotations

import signal


class StopFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.stop = False
        self.signum = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.stop = True
        self.signum = signum
