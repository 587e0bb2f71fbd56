"""HTML pieces of the run report: escaping, tables, generic rendering of nested results, the page.

Static HTML with inline CSS; no JavaScript, no external URLs. Everything a page refers to lives in its folder.
"""

from __future__ import annotations

import html
import math
import numbers

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 14px 28px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; color: #c5cbd6; font-size: 13px; }
nav { padding: 8px 28px; background: #e8ebf0; font-size: 13px; }
nav a { margin-right: 14px; color: #2457b5; text-decoration: none; }
main { padding: 8px 28px 40px 28px; }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 6px 18px 14px 18px;
          margin: 16px 0; }
h2 { font-size: 18px; border-bottom: 1px solid #dde1e7; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 14px 0 6px 0; }
h4, h5, h6 { font-size: 13px; margin: 10px 0 4px 0; color: #4a5365; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px 0; }
th, td { border: 1px solid #dde1e7; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; background: #f4f6f9; }
.notrun { color: #8a5a00; background: #fff6e0; border: 1px solid #f0d9a0; padding: 6px 10px; border-radius: 4px;
          display: inline-block; }
.ok { color: #1d7a32; font-weight: 600; }
.bad { color: #b3261e; font-weight: 600; }
.note { color: #5b6475; font-size: 12px; }
img.fig { max-width: 100%; border: 1px solid #eef1f5; margin: 4px 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; margin-bottom: 14px; }
.card { width: 300px; border: 1px solid #dde1e7; border-radius: 4px; padding: 6px; font-size: 12px; }
.card img { width: 100%; display: block; }
.card.small { width: 220px; }
.card ol { padding-left: 0; margin: 6px 0 0 0; list-style: none; }
.card li { margin: 3px 0; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 5px; border: 1px solid #444; }
.unpaired { color: #8b93a3; }
code { background: #eef1f5; padding: 0 3px; border-radius: 3px; }
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v) -> str:
    """One cell: floats to 3 decimals, {mean, std} as mean ± std, small dicts and lists inline."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        v = float(v)
        return "nan" if math.isnan(v) else f"{v:.3f}"
    if isinstance(v, dict):
        if "mean" in v and set(v) <= {"mean", "std", "n"}:
            s = fmt(v["mean"]) + (f" ± {fmt(v['std'])}" if v.get("std") is not None else "")
            return s + (f" (n={v['n']})" if "n" in v else "")
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def cell(v) -> str:
    num = isinstance(v, numbers.Number) and not isinstance(v, bool)
    return f'<td class="n">{esc(fmt(v))}</td>' if num else f"<td>{esc(fmt(v))}</td>"


def table(header: list[str] | None, rows: list[list], tid: str | None = None, total: list | None = None) -> str:
    out = [f'<table id="{esc(tid)}">' if tid else "<table>"]
    if header is not None:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(cell(v) for v in r) + "</tr>")
    if total is not None:
        out.append('<tr class="total">' + "".join(cell(v) for v in total) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _scalar(v) -> bool:
    return not isinstance(v, (dict, list, tuple)) or (isinstance(v, dict) and "mean" in v and set(v) <= {"mean", "std", "n"}) \
        or (isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list, tuple)) for x in v))


def generic(obj, level: int = 4, path: tuple = ()) -> str:
    """Any JSON result as tables, so keys added later still show.

    A dict's scalar entries form one key/value table; entries that are dicts of scalars with the same keys are
    gathered into one matrix (a row each, a column per inner key); lists of dicts become tables with a column
    per key; anything deeper gets a sub-heading (its path) and recurses.
    """
    if _scalar(obj):
        return f"<p>{esc(fmt(obj))}</p>"
    if isinstance(obj, (list, tuple)):
        if all(isinstance(x, dict) and all(_scalar(v) for v in x.values()) for x in obj):
            cols = list(dict.fromkeys(k for x in obj for k in x))
            return table(cols, [[x.get(c) for c in cols] for x in obj])
        return "\n".join(generic(x, level, path) for x in obj)
    parts, groups, deep = [], {}, []
    scalars = [(k, v) for k, v in obj.items() if _scalar(v)]
    for k, v in obj.items():
        if _scalar(v):
            continue
        if isinstance(v, dict) and v and all(_scalar(x) for x in v.values()):
            groups.setdefault(tuple(v), []).append((k, v))
        else:
            deep.append((k, v))
    if scalars:
        parts.append(table(["key", "value"], [[k, v] for k, v in scalars]))
    for cols, items in groups.items():
        parts.append(table([" › ".join(map(str, path))] + list(cols), [[k] + [v.get(c) for c in cols] for k, v in items]))
    h = min(level, 6)
    for k, v in deep:
        parts.append(f"<h{h}>{esc(' › '.join(map(str, (*path, k))))}</h{h}>")
        parts.append(generic(v, level + 1, (*path, k)))
    return "\n".join(parts)


def not_run(what: str) -> str:
    return f'<p class="notrun">not run: {esc(what)}</p>'


def fig(src: str, alt: str) -> str:
    return f'<img class="fig" src="{esc(src)}" alt="{esc(alt)}">'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """sections: (id, heading, body html)."""
    nav = " ".join(f'<a href="#{esc(sid)}">{esc(h)}</a>' for sid, h, _ in sections)
    body = "\n".join(f'<section id="{esc(sid)}">\n<h2>{esc(h)}</h2>\n{b}\n</section>' for sid, h, b in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="icon" href="data:,">
<style>{CSS}</style>
</head>
<body>
<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>
<nav>{nav}</nav>
<main>
{body}
</main>
</body>
</html>
"""
