"""Giving freed memory back to the operating system between the stages of a scan.

glibc's allocator keeps its dynamic mmap threshold on the workers (``job/cluster.py``: without
``MALLOC_TRIM_THRESHOLD_`` a stage's large temporaries come from the heap, not fresh mmaps, and
are not page-faulted in afresh each time). The price is that the heap keeps pages a stage freed
in its middle: after the backbone's weights are folded and cast (several hundred MB of float32
temporaries) a worker held ~0.6 GB more than it uses, and each stage left more for the next
stage's peak to stack on. One ``malloc_trim(0)`` after the model load, after each stage of a scan
(``pipeline`` gives it to ``StageClock``) and after the backbone's forward returns those pages
(``MADV_DONTNEED``) at the cost of a heap walk (~0.15 ms here), and the next stage's peak starts
from what is really in use. Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):      # not glibc (musl, macOS): nothing to trim
        return None


def trim_heap(collect: bool = True) -> bool:
    """Return the heap's free pages to the OS; first collect garbage (cycles holding arrays) unless
    ``collect`` is False (between stages: their arrays die with their frames, and a collection
    with torch loaded costs tens of milliseconds).

    Returns True where glibc's ``malloc_trim`` ran (whether or not it found pages to give back).
    """
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
