"""One self-contained HTML file of a pipeline's result (the parent run's ``report.html``) or of
`hvae report`'s table: the NLL table, the training curves of every training stage, the
samples, the reconstructions and stage 1's other figures (codebook usage, KL per latent
group). Every picture is inside the file as a data URI: the MLflow UI shows HTML artifacts in a
sandboxed frame that loads nothing else, and the file can be mailed or archived alone.
Torch-free; matplotlib draws the curves.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
from pathlib import Path

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#1f272d}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f5f7}figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}
figcaption{font-size:12px;color:#5f7281;max-width:520px}img{image-rendering:pixelated;max-width:100%}
.legend,.facts{font-size:12px;color:#445461}"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _inline(text: str) -> str:
    """Markdown's **bold** in escaped text."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def markdown_html(markdown: str) -> str:
    """Pipe tables and paragraphs (what the NLL and report tables are made of) as HTML."""
    out, table = [], []

    def flush():
        if table:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            table.clear()

    for line in markdown.strip().splitlines():
        line = line.strip()
        if line.startswith("|"):
            if not re.fullmatch(r"\|(-+\|)+", line):  # (not the header's rule)
                table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        flush()
        if line:
            out.append(f'<p class="legend">{_inline(line)}</p>')
    flush()
    return "".join(out)


DRAWING = 1  # how _draw draws: change it with _draw, and figures kept from before are drawn again


def curves_png(curves: dict[str, list[tuple[int, float]]], title: str, cache: Path | None = None) -> bytes | None:
    """Per-epoch curves (name -> [(epoch, value)]) in one figure: the losses on one axis, the
    bits (per dim or per code) on another, so that one unit shares a scale. ``cache``: a folder
    where a figure drawn once is kept under a hash of its curves and title, so that a pipeline
    whose training stages are all reused does not import matplotlib to draw the same figure."""
    if not any(curves.values()):
        return None
    if cache is None:
        return _draw(curves, title)
    key = hashlib.sha256(json.dumps([sorted((k, sorted(v)) for k, v in curves.items()), title, DRAWING]).encode()).hexdigest()
    kept = cache / f"{key[:32]}.png"
    if kept.is_file():
        return kept.read_bytes()
    png = _draw(curves, title)
    cache.mkdir(parents=True, exist_ok=True)
    partial = kept.with_name(f".{kept.name}.{os.getpid()}")
    partial.write_bytes(png)
    os.replace(partial, kept)  # (whole or absent: two pipelines may draw it at once)
    return png


def _draw(curves: dict[str, list[tuple[int, float]]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = [("loss", [k for k in curves if k.endswith("_loss")]),
              ("bits", [k for k in curves if not k.endswith("_loss")])]
    groups = [(unit, keys) for unit, keys in groups if keys]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 3.2), squeeze=False)
    for ax, (unit, keys) in zip(axes[0], groups):
        for key in keys:
            points = sorted(curves[key])
            ax.plot([s + 1 for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        last = max(s for key in keys for s, _ in curves[key]) + 1
        ax.set_xlim(0.5, last + 0.5)  # (whole epochs only, one epoch included)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel(unit if unit == "loss" else "bits")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    plt.close(fig)
    return out.getvalue()


def figure(png: bytes, caption: str, zoom: int = 1) -> str:
    """A picture and its caption; ``zoom``: shown that many times its size (small images of pixels)."""
    width = int.from_bytes(png[16:20], "big") * zoom  # (a PNG's IHDR width)
    return (f'<figure><img src="{data_uri(png)}" alt="{html.escape(caption)}" width="{width}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def document(title: str, headline: str, table: str | None, sections: list[tuple[str, list[str]]],
             facts: list[str]) -> str:
    """The page: its headline, the table, then each (heading, figures) section, then the facts."""
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{_inline(headline)}</p>"]
    if table:
        parts += ["<h2>Test NLL</h2>", markdown_html(table)]
    for heading, figures in sections:
        if figures:
            parts += [f"<h2>{html.escape(heading)}</h2>", *figures]
    if facts:
        parts += ["<h2>Run</h2>", '<ul class="facts">'
                  + "".join(f"<li>{_inline(f.removeprefix('- '))}</li>" for f in facts) + "</ul>"]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def pipeline_report(title: str, headline: str, table: str | None, curves: dict[str, dict], outputs: dict[str, Path],
                    facts: list[str], *, cache: Path | None = None) -> str:
    """A pipeline's page: ``curves`` per training stage (figures kept in ``cache``: see
    :func:`curves_png`), the pictures from the stages' output folders (``outputs``: stage -> folder)."""
    trained = [figure(png, f"{stage}: per-epoch curves") for stage, c in curves.items()
               if (png := curves_png(c, stage, cache)) is not None]
    drawn = outputs.get("sample")
    samples = _pictures(drawn, {"samples/grid.png": "samples from the model's prior at sample.temperature, decoded"},
                        zoom=2)
    if drawn is not None:
        at = sorted(drawn.glob("samples/grid_t*.png"), key=lambda p: float(p.stem[len("grid_t"):]))
        samples += _pictures(drawn, {f"samples/{p.name}": f"temperature {p.stem[len('grid_t'):]}" for p in at}, zoom=2)
    figures = _pictures(outputs.get("stage1"), {
        "figures/reconstructions.png": "validation images (odd rows) over their reconstructions (even rows)"}, zoom=2)
    figures += _pictures(outputs.get("stage1"), {
        "figures/codebook_usage.png": "how often each code of each level is used (validation)",
        "figures/kl_per_group.png": "validation KL per latent group (bits per image)"})
    return document(title, headline, table, [("Samples", samples), ("Stage 1", figures), ("Training", trained)],
                    facts)


def _pictures(folder: Path | None, wanted: dict[str, str], zoom: int = 1) -> list[str]:
    if folder is None:
        return []
    return [figure((folder / rel).read_bytes(), caption, zoom) for rel, caption in wanted.items()
            if (folder / rel).is_file()]
