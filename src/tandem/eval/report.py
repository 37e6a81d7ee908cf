"""One self-contained HTML report from several experiments' ``report.md`` files (``tandem eval
report``): their text, tables and plots (embedded as data URIs, so the file travels alone), and
under each the command and configuration that produced its numbers.

The converter knows the markdown the experiments write (headings, paragraphs, bullet lists,
pipe tables, images, ``code`` and **bold**), not markdown at large.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from ..checks import read_json_file

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")


def _inline(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)


def _image(alt: str, file: Path) -> str:
    if not file.is_file():
        raise FileNotFoundError(f"the report embeds {file}, which does not exist")
    data = base64.b64encode(file.read_bytes()).decode()
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%"></p>'


def markdown_to_html(text: str, base: Path) -> str:
    """HTML of one experiment report; images are read relative to ``base``."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level + 1}>{_inline(line[level:].strip())}</h{level + 1}>")
            i += 1
        elif (m := _IMAGE.fullmatch(line.strip())) is not None:
            out.append(_image(m.group(1), base / m.group(2)))
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= set("-: ") for c in cells):
                    rows.append(cells)
                i += 1
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
        elif line.lstrip().startswith(("- ", "* ")):
            items = []
            while i < len(lines) and lines[i].strip():
                if lines[i].lstrip().startswith(("- ", "* ")):
                    items.append(lines[i].lstrip()[2:])
                else:  # a continuation line of the item
                    items[-1] += " " + lines[i].strip()
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ", "* ", "![")):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
         "code,pre{background:#f4f4f4}pre{padding:0.5em;overflow-x:auto;font-size:85%}")


def combined_report(experiments: list[Path], title: str = "tandem evaluation") -> str:
    """A self-contained HTML page of the experiments in ``experiments`` (directories written by
    ``tandem eval``), each with its report, plots and the configuration in its ``results.json``."""
    sections = []
    for d in experiments:
        d = Path(d)
        report, results = d / "report.md", d / "results.json"
        if not report.is_file() or not results.is_file():
            raise FileNotFoundError(f"{d} is not a finished `tandem eval` experiment (no report.md/results.json)")
        made = read_json_file(results, "experiment results")
        config = {k: made.get(k) for k in ("experiment", "made_by", "config") if k in made}
        sections.append(f'<section id="{html.escape(d.name)}">' + markdown_to_html(report.read_text(), d)
                        + "<details><summary>configuration</summary><pre>"
                        + html.escape(json.dumps(config, indent=1)) + "</pre></details></section>")
    toc = "".join(f'<li><a href="#{html.escape(Path(d).name)}">{html.escape(Path(d).name)}</a></li>'
                  for d in experiments)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><ul>{toc}</ul>"
            + "<hr>".join(sections) + "</body></html>\n")
