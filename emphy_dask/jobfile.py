"""A job file read once for every command: its extract sections and its ``[fit]``.

``extract`` and ``fit`` share one ``jobs/*.toml``. Each command checks the whole file, so a typo
in a section the command does not use still fails early, naming the file and the key; neither
``job/config`` (extract sections) nor ``models/settings`` (``[fit]``) imports the other.
"""
from __future__ import annotations

from pathlib import Path

from .job.config import JobConfig, apply_override, config_from_dict, read_job_toml
from .models.settings import FitSettings, fit_settings_from_table


def load_jobfile(path: str | Path | None, overrides=(), **fit_overrides) -> tuple[JobConfig, FitSettings]:
    """``(JobConfig, FitSettings)`` of a job file (None -> both defaults), parsed once.

    Parameters
    ----------
    path : str, Path or None
        The TOML job file.
    overrides : iterable of str
        ``--set SECTION.KEY=VALUE`` items applied over the file (after it was checked alone, so
        the file's own errors name it); their errors start with ``--set``.
    **fit_overrides
        Command-line values for ``[fit]`` keys (None values ignored), checked like the file's.

    Raises
    ------
    ConfigError
        The file is missing or not TOML, or any section holds an unknown key or a bad value.
    """
    data, source = ({}, "<defaults>") if path is None else (read_job_toml(path), str(path))
    if overrides:
        load_jobfile(path, **fit_overrides)
        for item in overrides:
            apply_override(data, item)
        source = "--set"
    fit = data.pop("fit", {})
    return config_from_dict(data, source), fit_settings_from_table(fit, source, **fit_overrides)


def load_fit_settings(path: str | Path | None = None, **overrides) -> FitSettings:
    """The ``[fit]`` settings of a job file with command-line ``overrides``; the extract sections checked too."""
    return load_jobfile(path, **overrides)[1]
