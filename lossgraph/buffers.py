"""A bounded pool of large CPU output buffers (gradients, N x C losses) that stay mapped.

Note [Output buffer pool]: a fresh N x C gradient is page-faulted in on every call: 4 KiB pages
fault on first touch (15 ms for 65 MB, more than the kernel), and 2 MiB pages can stall for
100-300 ms in the kernel's memory compaction. So large outputs come from blocks of anonymous
memory that are mapped once and reused. A block is handed out as `torch.frombuffer` of a fresh
memoryview slice; the tensor's storage holds the only reference to that memoryview, so when the
last tensor or view on the storage dies the memoryview dies, and a weakref callback queues the
block for reuse. A block is therefore never handed out while any tensor still uses it. The
callback only appends to a deque (no lock: it may run inside the garbage collector, in any
thread); `empty` drains that queue. Idle blocks are bounded by `limit` bytes (oldest evicted
first, given back to the OS); live blocks are the caller's memory, as with torch.empty.
Blocks are MAP_PRIVATE, so a forked child never writes into its parent's buffers.
"""
from __future__ import annotations

import collections
import functools
import mmap
import os
import threading
import weakref

import torch

MIN_BYTES = 1 << 20       # below this malloc reuses its heap: no page faults to save
HUGE_MIN = 4 << 20        # blocks this large are advised to use transparent huge pages
STEPS = 8                 # size classes per octave: at most 12.5% of a block is unused
REACH = 2                 # a request may take an idle block up to this many classes larger


def size_class(nbytes: int) -> int:
    """nbytes rounded up to m * 2**e with STEPS <= m < 2 * STEPS (a multiple of 4 KiB here)."""
    e = max(nbytes.bit_length() - STEPS.bit_length(), 0)
    m = -(-nbytes // (1 << e))
    return m << e


def _next_class(c: int) -> int:
    return size_class(c + 1)


def _limit_from_env() -> int:
    return int(float(os.environ.get("LOSSGRAPH_BUFFER_POOL_MB", "1024")) * (1 << 20))


class BufferPool:
    """Large CPU tensors from reused, already-mapped blocks; see Note [Output buffer pool]."""

    def __init__(self, limit: int, min_bytes: int = MIN_BYTES):
        self.limit, self.min_bytes = limit, min_bytes
        self._idle: list[tuple[int, mmap.mmap]] = []       # (class, block), oldest first
        self._idle_bytes = 0
        self._returned: collections.deque = collections.deque()
        self._armed: dict[int, weakref.ref] = {}           # keeps each release callback alive
        self._lock = threading.Lock()
        self.stats = {"reused": 0, "mapped": 0, "evicted": 0}

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized contiguous CPU tensor; pooled when at least min_bytes large."""
        n = 1
        for s in shape:
            n *= s
        nbytes = n * dtype.itemsize
        if nbytes < self.min_bytes or self.limit <= 0:
            return torch.empty(shape, dtype=dtype)
        cls = size_class(nbytes)
        block = self._take(cls)
        view = memoryview(block)[:nbytes]
        ref = weakref.ref(view, functools.partial(self._on_release, cls, block))
        self._armed[id(ref)] = ref
        t = torch.frombuffer(view, dtype=dtype, count=n)
        del view                    # the storage now holds the only reference
        return t.view(shape)

    @property
    def idle_bytes(self) -> int:
        """Bytes held in idle blocks (after taking in every block released so far)."""
        with self._lock:
            self._drain()
            return self._idle_bytes

    def clear(self) -> None:
        """Give every idle block back to the OS (live tensors are untouched)."""
        with self._lock:
            self._drain()
            self._idle.clear()
            self._idle_bytes = 0

    def _on_release(self, cls: int, block: mmap.mmap, ref: weakref.ref) -> None:
        self._armed.pop(id(ref), None)
        self._returned.append((cls, block))

    def _drain(self) -> None:
        while self._returned:
            cls, block = self._returned.popleft()
            if cls > self.limit:
                continue
            while self._idle and self._idle_bytes + cls > self.limit:
                old, _ = self._idle.pop(0)
                self._idle_bytes -= old
                self.stats["evicted"] += 1
            self._idle.append((cls, block))
            self._idle_bytes += cls

    def _take(self, cls: int) -> mmap.mmap:
        ok, c = {cls}, cls
        for _ in range(REACH):
            c = _next_class(c)
            ok.add(c)
        with self._lock:
            self._drain()
            for i in range(len(self._idle) - 1, -1, -1):   # the most recently returned first
                if self._idle[i][0] in ok:
                    c, block = self._idle.pop(i)
                    self._idle_bytes -= c
                    self.stats["reused"] += 1
                    return block
        self.stats["mapped"] += 1
        return _map(cls)


def _map(nbytes: int) -> mmap.mmap:
    """Private anonymous memory, advised to use huge pages when large (see Note [Output buffer
    pool]: the faults, and any compaction, happen once per block instead of once per call)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    block = mmap.mmap(-1, nbytes, flags=flags) if flags else mmap.mmap(-1, nbytes)
    if nbytes >= HUGE_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            block.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return block


POOL = BufferPool(_limit_from_env())


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """POOL.empty: a CPU output tensor, reusing mapped memory when large."""
    return POOL.empty(shape, dtype)
