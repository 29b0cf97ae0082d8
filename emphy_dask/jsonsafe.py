"""JSON-safe values for the summaries the driver writes (metrics.json, track.json)."""
from __future__ import annotations

import numpy as np


def json_safe(obj):
    """``obj`` with numpy scalars as Python numbers, NaN/inf as None, tuples as lists, keys as str.

    Examples
    --------
    >>> json_safe({"a": np.float32(1.5), 2: [np.int64(3), float("nan")], "ok": np.bool_(True)})
    {'a': 1.5, '2': [3, None], 'ok': True}
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
