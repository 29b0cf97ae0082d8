"""Tiny static-HTML helpers: one stylesheet inline, no scripts, no network resources."""
from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np
import pandas as pd

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1180px;color:#222;
line-height:1.4;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-top:.6em}h3{font-size:1.02em}
table{border-collapse:collapse;font-size:.82em;margin:.4em 0 1em}th,td{border:1px solid #ddd;padding:2px 6px;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:.5em .8em;margin:.6em 0}
.note{color:#555;font-size:.88em}.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}figcaption{font-size:.78em;color:#444;max-width:260px}
nav a{margin-right:1em}img{image-rendering:auto}
"""


def esc(text) -> str:
    return html.escape("" if text is None else str(text))


def page(title: str, body: str, *, css_prefix: str = "") -> str:
    """A complete HTML document. ``data:`` favicon: the browser requests no file."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><link rel=\"icon\" href=\"data:,\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><style>{CSS}</style>"
            f"</head><body>\n{body}\n</body></html>\n")


def rel(target: Path, page_dir: Path) -> str:
    """URL of ``target`` relative to the folder of the page that links it (forward slashes)."""
    return Path(os.path.relpath(Path(target), Path(page_dir))).as_posix()


def img(src: str, alt: str, width: int | None = None, caption: str | None = None) -> str:
    w = f' width="{width}"' if width else ""
    tag = f'<img src="{esc(src)}" alt="{esc(alt)}"{w}>'
    return f"<figure>{tag}<figcaption>{caption}</figcaption></figure>" if caption is not None else tag


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return esc(value)


def table(df: pd.DataFrame, *, digits: int = 2, raw_html: tuple = (), left: tuple = ()) -> str:
    """An HTML table of ``df``; columns in ``raw_html`` are inserted as they are (links, images)."""
    if df is None or df.empty:
        return '<p class="note">(none)</p>'
    left = set(left) | {c for c in df.columns if df[c].dtype == object and c not in raw_html}
    head = "".join(f'<th class="{"l" if c in left else ""}">{esc(c)}</th>' for c in df.columns)
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, rec):
            text = ("" if v is None else str(v)) if c in raw_html else fmt(v, digits)
            cells.append(f'<td class="{"l" if c in left or c in raw_html else ""}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def link(href: str, text) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def ci(m: dict | None, key: str, digits: int = 3) -> str:
    """``value [low, high]`` of a metric dict from metrics.json."""
    if not m or m.get(key) is None:
        return ""
    v = f"{m[key]:.{digits}f}"
    iv = (m.get("ci") or {}).get(key)
    return f"{v} [{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]" if iv and None not in iv else v
