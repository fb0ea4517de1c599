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
``torch.profiler`` (``profile_memory=True``) in time order, counting what the calls allocate on
the calling thread (storage allocated before and freed during the calls is not subtracted: an
upper bound then).
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
    calls in between and live at once (CPU), from the profiler's allocation events. The profiler
    slows the calls: time them apart.

    Only the thread that called ``begin()`` is measured: its allocations count, and a free counts
    only when it releases storage allocated in the window (by that thread). Frees of anything
    older are left out - storage allocated before ``begin()``, whether or not an earlier profiling
    window reported it, and what other threads the profiler follows (``torch.jit.fork`` tasks,
    autograd workers) let go - so the figure is the calls' own working memory: exact when they
    free nothing older, an upper bound otherwise (free results of earlier calls first). The
    profiler's thread ids are its own, so ``begin()`` learns the calling thread's id from a marker
    allocation of its own address.
    """

    _MARKER_BYTES = 4099  # an odd size no tensor of the calls is likely to share

    def __init__(self) -> None:
        self._prof = None
        self._marker = 0

    def begin(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        marker = torch.empty(self._MARKER_BYTES, dtype=torch.uint8)
        self._marker = marker.data_ptr()
        del marker

    def end(self) -> float:
        from torch._C._profiler import _EventType

        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        events = []  # (time, thread, address, bytes): bytes < 0 for a free
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                f = e.extra_fields
                events.append((e.start_time_ns, e.start_tid, f.ptr, f.alloc_size))
        events.sort()
        return _own_peak(events, self._marker, self._MARKER_BYTES) / 2**20


def _own_peak(events: list[tuple[int, int, int, int]], marker: int, marker_bytes: int) -> int:
    """Peak bytes live of the thread that allocated ``marker_bytes`` at address ``marker`` first
    (the marker itself left out), from time-ordered ``(time, thread, address, bytes)`` events."""
    tid = next((t for _, t, p, b in events if p == marker and b == marker_bytes), None)
    if tid is None:
        raise RuntimeError("TensorPeakMeter: the profiler reported no allocation of the marker "
                           "made in begin(); was profile_memory honoured on this thread?")
    own: dict[int, int] = {}  # address -> bytes of the storage the thread allocated in the window
    live = peak = 0
    seen_marker = False
    for _, t, ptr, size in events:
        if size > 0 and t == tid:
            if not seen_marker and ptr == marker and size == marker_bytes:
                seen_marker = True  # its free is not in `own`, so it is skipped as well
                continue
            own[ptr] = size
            live += size
            peak = max(peak, live)
        elif size < 0 and ptr in own:
            live -= own.pop(ptr)
    return peak


def limit_address_space(gb: float) -> None:
    """RLIMIT_AS of this process (0: none), so a runaway method fails with an OOM error."""
    if gb > 0:
        lim = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
