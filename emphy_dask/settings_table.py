"""A TOML table into a frozen settings dataclass: unknown keys and wrong types named by file and key.

One validator for every section of a job file: the extract sections (``job/config``) and ``[fit]``
(``models/settings``) both call it, so neither needs the other. The types come from the
dataclass's defaults; range and choice checks stay with each settings class.
"""
from __future__ import annotations

import dataclasses

from .errors import ConfigError


def coerce_value(source: str, where: str, value, default):
    """``value`` checked against the type of ``default``; ints are accepted (and converted) for floats.

    Parameters
    ----------
    source : str
        The job file (or ``command line``), for the message.
    where : str
        The key, e.g. ``[embed].margin_mm``.
    value : object
        As parsed from TOML.
    default : bool, int, float, str or tuple
        The dataclass default; a tuple asks for a list of as many positive numbers.

    Raises
    ------
    ConfigError
        ``"<source>: <where> must be <type>, got <value>"``.
    """
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and len(value) == len(default) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
        value = tuple(float(v) for v in value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        want = type(default).__name__ if not isinstance(default, tuple) else f"a list of {len(default)} positive numbers"
        raise ConfigError(f"{source}: {where} must be {want}, got {value!r}")
    return value


def settings_from_table(cls, table, source: str, section: str):
    """An instance of the frozen dataclass ``cls`` from the TOML table ``[section]``.

    Raises
    ------
    ConfigError
        The table is not a table, holds a key ``cls`` lacks (the known ones are listed), a value of
        the wrong type, or ``cls`` refuses the values (its message follows the section's name).
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{section}] must be a table")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    values = {}
    for k, v in table.items():
        if k not in defaults:
            raise ConfigError(f"{source}: unknown key [{section}].{k} (known: {', '.join(defaults)})")
        values[k] = coerce_value(source, f"[{section}].{k}", v, defaults[k])
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: [{section}]: {exc}") from None
