"""report.html's curve figures (pipeline/html_report.py): drawn once, then taken from the cache,
so that a fully reused pipeline does not import matplotlib."""
import subprocess
import sys
import textwrap

from conftest import ROOT


def test_a_curve_figure_drawn_once_is_taken_from_the_cache_without_matplotlib(tmp_path):
    draw = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from pipeline.html_report import curves_png
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
