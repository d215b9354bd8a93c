"""The showcase's figures as pages: Markdown (the folder's README.md and the project's docs/uses.md) and HTML
(the folder's index.html). Pure: the same figures give the same text, so the committed docs/uses.md can be compared
with the renderer's output for the committed figures."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

TITLE = "The six uses of textual inversion, measured"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1%}" if 0 <= value <= 1 else f"{value:g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _intro(figures: Mapping[str, Any]) -> list[str]:
    run = figures["run"]
    return [
        f"Measured by `python -m sdconcepts toyworld showcase` on the embedded `{run['model']}` model: every word and "
        f"the hypernetwork trained from a few toy pictures (seeded, 32 px, on the CPU), every figure over "
        f"{run['samples']} generations with fixed seeds ({run['steps']} {run['sampler']} steps, CFG "
        f"{run['cfg_scale']:g}), scored by the toy world's probe (a small classifier that names a picture's shape, "
        "colour and background; never a pixel comparison). Each grid shows the same seeds without and with what "
        "was learned.",
        "",
        f"The run took {run['seconds']:.0f} s ({run['cpu_seconds']:.0f} s of CPU, {run['threads']} torch "
        f"thread(s), load average {run['load']:.1f} when it started); training "
        + ", ".join(f"{name} {s:.0f} s" for name, s in run["train_seconds"].items())
        + ". The learned files are in the run's `embeddings/` and `hypernetworks/` folders, loadable in the app.",
    ]


def _bars_md(use: Mapping[str, Any]) -> list[str]:
    lines = ["| measured | value | bar | |", "| --- | --- | --- | --- |"]
    for bar in use["bars"]:
        lines.append(f"| {bar['label']} | {_value(bar['value'])} | {_value(bar['bar'])} | "
                     f"{'pass' if bar['passed'] else 'FAIL'} |")
    return lines


def markdown(figures: Mapping[str, Any], *, images: str) -> str:
    """The page in Markdown; grids are linked as ``{images}/{key}.png``."""
    lines = [f"# {TITLE}", "", *_intro(figures), ""]
    lines += [f"- [{use['title']}](#{use['key']})" for use in figures["uses"]]
    for use in figures["uses"]:
        lines += ["", f'<a id="{use["key"]}"></a>', "", f"## {use['title']}", "", use["what"], "",
                  f"![{use['title']}]({images}/{use['key']}.png)", "", *_bars_md(use), ""]
        lines += [f"- {name.replace('_', ' ')}: {_value(value)}" for name, value in use["figures"].items()]
        if use.get("note"):
            lines += ["", f"*Note.* {use['note']}"]
    return "\n".join(lines) + "\n"


def page(figures: Mapping[str, Any], *, images: str) -> str:
    """The page in HTML (one file, no script); grids are ``{images}/{key}.png``."""
    e = html.escape
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(TITLE)}</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "img{image-rendering:pixelated;max-width:100%}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .6em}.fail{color:#b00}</style></head><body>",
             f"<h1>{e(TITLE)}</h1>"]
    parts += [f"<p>{e(p)}</p>" for p in _intro(figures) if p]
    for use in figures["uses"]:
        parts += [f'<h2 id="{e(use["key"])}">{e(use["title"])}</h2>', f"<p>{e(use['what'])}</p>",
                  f'<img src="{e(images)}/{e(use["key"])}.png" alt="{e(use["title"])}">',
                  "<table><tr><th>measured</th><th>value</th><th>bar</th><th></th></tr>"]
        for bar in use["bars"]:
            verdict = "pass" if bar["passed"] else '<span class="fail">FAIL</span>'
            parts.append(f"<tr><td>{e(bar['label'])}</td><td>{e(_value(bar['value']))}</td>"
                         f"<td>{e(_value(bar['bar']))}</td><td>{verdict}</td></tr>")
        parts.append("</table><ul>")
        parts += [f"<li>{e(name.replace('_', ' '))}: {e(_value(value))}</li>" for name, value in use["figures"].items()]
        parts.append("</ul>")
        if use.get("note"):
            parts.append(f"<p><em>Note.</em> {e(use['note'])}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
