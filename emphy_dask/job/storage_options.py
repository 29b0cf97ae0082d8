"""The job file's ``[storage]`` options, given to every worker once (a Dask worker plugin).

Workers list and read their own series and write their own artifacts in the object store, so each
worker process needs the same fsspec options (endpoint, credentials) as the driver. They travel in
a plugin, never in task arguments, ``run.json``, a table or a log line (``io.storage.redacted``).
"""
from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from ..io import storage

PLUGIN_NAME = "emphy-storage-options"


class StorageOptionsPlugin(WorkerPlugin):
    """Sets ``io.storage.configure(options)`` in each worker process, new workers included."""

    name = PLUGIN_NAME

    def __init__(self, options: dict):
        self.options = options

    def __repr__(self) -> str:           # never print a secret
        return f"StorageOptionsPlugin({storage.redacted(self.options)})"

    def setup(self, worker) -> None:
        storage.configure(self.options)


def share_storage_options(client, options: dict | None) -> None:
    """Configure this process and, with a client, every worker (current and future)."""
    storage.configure(options)
    if client is not None and options:
        client.register_plugin(StorageOptionsPlugin(options), name=PLUGIN_NAME)
