"""Every stage of one scan in this process: the one-process twin of ``job/flow``.

A composer above both halves of a scan: ``pipeline`` (CPU stages) and ``device_stages`` (U-Net,
backbone) never import each other; this module and ``job/flow`` chain them. Tests, benchmarks
and loops over a few scans call ``process_scan``; the job's tables equal its rows scan by scan.
"""
from __future__ import annotations

from .device_stages import embed_states, lungmask_on_device
from .embed.weights import resolve_weights
from .pipeline import finish_scan, prepare_scan
from .scan_state import ScanTask


def process_scan(task: ScanTask, config, out_dir, worker: str | None = None, device: str = "cpu") -> dict:
    """Every stage of one scan in this process; returns the rows for every table.

    The same functions the job runs as separate CPU and device tasks, chained here; the job's
    tables equal the rows of this function called scan by scan.
    """
    if not config.weights_sha256 and (config.embed.backbone != "none" or config.segment.name == "lungmask"):
        config = resolve_weights(config)
    state = prepare_scan(task, config, out_dir, worker)
    if state.lungmask_input is not None:
        state = finish_scan(state, lungmask_on_device(state.lungmask_input, config, device), config, out_dir)
    return embed_states([state], config, out_dir, device, worker)[0]
