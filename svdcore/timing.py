"""Named wall-time sections for the benchmarks (bench/): off unless a Sections object is active.

The library marks its phases (`with section("decompose"): ...`); outside a benchmark this
costs one global lookup. Inside one, each section waits for the GPU at its start and end, so
the figure belongs to the phase that launched the work and not to whichever one synced next.
Only the current stream is waited for: phases that run in threads on their own streams (see
streaming._Overlapped) each get their own busy time, and those overlap.
"""
import threading
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

_active: "Sections | None" = None


class Sections:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()

    @staticmethod
    def _sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.current_stream().synchronize()

    @contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            with self.lock:
                self.seconds[name] += time.perf_counter() - start

    @contextmanager
    def active(self):
        """Make this object receive the library's sections inside the block."""
        global _active
        previous, _active = _active, self
        try:
            yield self
        finally:
            _active = previous


def section(name: str):
    return _active(name) if _active is not None else nullcontext()
