"""report.html's curve figures (pipeline/html_report.py): drawn once, then taken from the cache,
so that a fully reused pipeline does not import matplotlib."""
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT


def test_a_curve_figure_drawn_once_is_taken_from_the_cache_without_matplotlib(tmp_path):
    draw = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from hvae.pipeline.html_report import curves_png
        curves = {{"train_loss": [(0, 2.5), (1, 1.75)], "val_bpd": [(0, 3.2), (1, 2.9)]}}
        png = curves_png(curves, "stage1", Path({str(tmp_path)!r}))
        assert png.startswith(b"\\x89PNG"), png[:8]
        sys.stdout.buffer.write(png)
        sys.stderr.write("matplotlib" if "matplotlib" in sys.modules else "-")
    """)
    first = subprocess.run([sys.executable, "-c", draw], cwd=ROOT, capture_output=True)
    again = subprocess.run([sys.executable, "-c", draw], cwd=ROOT, capture_output=True)
    assert first.returncode == 0 and again.returncode == 0, (first.stderr, again.stderr)
    assert first.stderr[-10:] == b"matplotlib" and again.stderr == b"-"
    assert again.stdout == first.stdout
    assert len(list(tmp_path.glob("*.png"))) == 1 and not list(tmp_path.glob(".*"))
    # other curves (another epoch) are another figure
    other = draw.replace("(1, 2.9)", "(1, 2.8)")
    assert subprocess.run([sys.executable, "-c", other], cwd=ROOT, capture_output=True).stderr[-10:] == b"matplotlib"
    assert len(list(tmp_path.glob("*.png"))) == 2


@pytest.mark.parametrize("epochs", [1, 2, 12])
def test_a_curve_figure_ticks_whole_epochs_only(epochs, monkeypatch):
    import matplotlib.pyplot as plt

    from hvae.pipeline.html_report import _draw

    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)  # (keep the figure to read its axis)
    _draw({"train_loss": [(e, 3.0 - 0.1 * e) for e in range(epochs)]}, "priors")
    axis = drawn[0].axes[0]
    low, high = axis.get_xlim()
    shown = [t for t in axis.get_xticks() if low <= t <= high]
    assert shown and all(t == int(t) and 1 <= t <= epochs for t in shown), (epochs, shown)
