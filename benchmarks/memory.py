"""Peak extra memory of a call, measured in a process that runs nothing else.

CPU: ``tracemalloc`` does not see torch's C++ allocations and the profiler's memory view sees
tensors only (no library workspaces, no allocator slack), so the figure is the process's resident
set: after ``gc.collect()`` and glibc ``malloc_trim(0)`` (so heap kept from earlier calls does not
hide the working set), the kernel's peak-RSS counter (VmHWM, what ``getrusage().ru_maxrss`` reads)
is reset through ``/proc/self/clear_refs``; the peak after the calls minus the RSS before them is
the working memory of a call, outputs included. CUDA: ``torch.cuda.max_memory_allocated`` after a
reset of the peak statistics, minus the memory allocated before.

The resident set moves in pages and with the C library's heap (freed blocks kept, the mmap
threshold adapting to earlier calls), so deltas of a few MB differ from run to run.
:class:`TensorPeakMeter` is the exact, repeatable figure for small differences: the peak of the
bytes live in torch's CPU allocator (every tensor's storage), from the allocation events of
``torch.profiler`` (``profile_memory=True``) in time order, counting what the calls allocate
(storage allocated before and freed during the calls is not subtracted: an upper bound then).
It does not see memory allocated outside torch's allocator (BLAS or oneDNN workspaces, Python
objects); the RSS figure does.
"""

from __future__ import annotations

import ctypes
import gc
import resource

import torch

__all__ = ["PeakMeter", "TensorPeakMeter", "limit_address_space"]


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is a little higher, nothing more
        pass


class PeakMeter:
    """``begin()`` before the calls, ``end()`` after: peak extra MB of the calls in between."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.hwm_reset = True
        self._base = 0

    def begin(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        _trim_heap()
        self._base = _status_kb()["VmRSS"] * 1024
        self.hwm_reset = _reset_hwm() and self.hwm_reset

    def end(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        if self.hwm_reset:
            peak = _status_kb()["VmHWM"] * 1024
        else:  # since process start: an upper bound (flagged in the results)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return (peak - self._base) / 2**20


class TensorPeakMeter:
    """``begin()`` before the calls, ``end()`` after: peak MB of tensor storage allocated by the
    calls in between and live at once (CPU), from the profiler's allocation events. Storage
    allocated before ``begin()`` and freed in between is not subtracted (the profiler does not
    report its size), so free results of earlier calls first; the figure is then exact. The
    profiler slows the calls: time them apart."""

    def __init__(self) -> None:
        self._prof = None

    def begin(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    def end(self) -> float:
        from torch._C._profiler import _EventType

        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                events.append((e.start_time_ns, e.extra_fields.alloc_size))
        live = peak = 0
        for _, size in sorted(events):
            live += size
            peak = max(peak, live)
        return peak / 2**20


def limit_address_space(gb: float) -> None:
    """RLIMIT_AS of this process (0: none), so a runaway method fails with an OOM error."""
    if gb > 0:
        lim = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
