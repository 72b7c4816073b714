"""One self-contained HTML report of a head analysis: tables, heatmaps, the λ path and circuitsvis views.

The page works with no network: circuitsvis' JavaScript bundle is inlined once (not once per
view), figures are inlined as data URIs, and nothing refers to a CDN or any remote address.

Example:
    >>> from lens_laai.analysis.report import render_page
    >>> html = render_page("Empty", [("Notes", "<p>nothing yet</p>")], views=[])
    >>> html.startswith("<!DOCTYPE html>") and "https://" not in html
    True
"""

from __future__ import annotations

import html as html_lib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lens_laai.analysis.views import View
from lens_laai.errors import SaveError
from lens_laai.storage.bundle import atomic_write_text

GENERATOR = "lens_laai report"
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; } .view { border: 1px solid #eee; padding: 8px; margin: 1em 0; }
"""


def circuitsvis_bundle() -> str:
    """circuitsvis' browser bundle (shipped inside the Python package), safe to inline in a script tag.

    Example:
        >>> from lens_laai.analysis.report import circuitsvis_bundle
        >>> bundle = circuitsvis_bundle()
        >>> "CircuitsVis" in bundle and "</script>" not in bundle
        True
    """
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script>", "<\\/script>")


def table_html(frame: pd.DataFrame, digits: int = 3) -> str:
    """``frame`` as a plain HTML table: no index, ``digits`` decimals, missing values as –.

    Example:
        >>> import pandas as pd
        >>> from lens_laai.analysis.report import table_html
        >>> html = table_html(pd.DataFrame({"head": ["L1H0"], "score": [0.12345], "p": [float("nan")]}), digits=2)
        >>> "<th>head</th>" in html, "<td>0.12</td>" in html, "<td>–</td>" in html
        (True, True, True)
    """
    return frame.to_html(index=False, float_format=lambda x: f"{x:.{digits}f}", border=0, na_rep="–")


def render_page(title: str, sections: Sequence[tuple[str, str]], views: Sequence[View]) -> str:
    """The whole page: ``sections`` are (heading, HTML) pairs; ``views`` become divs rendered by one inlined bundle.

    Example:
        >>> from lens_laai.analysis.report import render_page
        >>> from lens_laai.analysis.views import View
        >>> view = View("ColoredTokens", {"tokens": ["a", "b"], "values": [1.0, -1.0]}, title="tokens")
        >>> page = render_page("Demo", [("Notes", "<p>hi</p>")], [view, view])
        >>> page.count("var CircuitsVis="), page.count("CircuitsVis.render(")  # one inlined bundle, one call per view
        (1, 2)
    """
    body = [f"<h1>{html_lib.escape(title)}</h1>"]
    for heading, content in sections:
        body.append(f"<h2>{html_lib.escape(heading)}</h2>\n{content}")
    calls = []
    if views:
        body.append("<h2>circuitsvis views</h2>")
        for i, view in enumerate(views):
            body.append(
                f'<div class="view"><h3>{html_lib.escape(view.title)}</h3><div id="cv-{i}" class="cv"></div></div>'
            )
            calls.append(f'CircuitsVis.render("cv-{i}", CircuitsVis.{view.name}, {json.dumps(view.props)});')
    script = f"<script>{circuitsvis_bundle()}</script>\n<script>\n" + "\n".join(calls) + "\n</script>" if views else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="generator" content="{GENERATOR}"><title>{html_lib.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + f"\n{script}\n</body></html>\n"
    )


def check_report_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse a directory, or an existing file that is not one of our reports (unless ``force``).

    Example:
        >>> import pathlib, tempfile
        >>> from lens_laai.analysis.report import check_report_path
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> check_report_path(folder / "report.html").name
        'report.html'
        >>> _ = (folder / "notes.html").write_text("<p>mine</p>")
        >>> check_report_path(folder / "notes.html")
        Traceback (most recent call last):
        ...
        lens_laai.errors.SaveError: ...notes.html exists and is not a lens_laai report; refusing to overwrite it. Choose a new path, or pass --force.
        >>> check_report_path(folder / "notes.html", force=True).name
        'notes.html'
    """
    path = Path(path)
    if path.is_dir():
        raise SaveError(f"{path} is a directory; give the path of an .html file.")
    if path.exists() and not force and GENERATOR not in _head(path):
        raise SaveError(
            f"{path} exists and is not a lens_laai report; refusing to overwrite it. "
            "Choose a new path, or pass --force."
        )
    return path


def _head(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(2000)
    except OSError as err:
        raise SaveError(f"{path} exists and cannot be read ({err.strerror}); choose another path.") from err


def write_report(path: str | os.PathLike, page: str, force: bool = False) -> Path:
    """Write ``page`` atomically; an existing file is replaced only if it is one of our reports, or with ``force``.

    Example:
        >>> import pathlib, tempfile
        >>> from lens_laai.analysis.report import render_page, write_report
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "report.html"
        >>> write_report(path, render_page("First", [], [])).name
        'report.html'
        >>> "<title>Second</title>" in write_report(path, render_page("Second", [], [])).read_text()  # ours: replaced
        True
    """
    path = check_report_path(path, force)
    atomic_write_text(path, page)
    return path


def analysis_sections(analysis: Any, figures: dict[str, str], extra: dict[str, Any]) -> list[tuple[str, str]]:
    """Report sections for a :class:`lens_laai.analysis.head_table.HeadAnalysis` (figures as data URIs).

    The page opens with the answer in sentences (which heads, how stable, necessary,
    sufficient, where each causal method ranks them), then the ranking table, the pictures,
    the controls, and last the settings, formatted for reading.

    Example:
        >>> from lens_laai import fit
        >>> from lens_laai.analysis.head_table import head_table
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> iv = fit(model, task, layer=1, n_train=8, steps=3, progress=False).intervention
        >>> analysis = head_table(model, task, iv, methods=["dla"], n_prompts=4, shots=2, progress=False)
        >>> from lens_laai.analysis.report import analysis_sections
        >>> sections = analysis_sections(analysis, {}, {"task": "tiny-antonym"})
        >>> [heading for heading, _ in sections[:2]], sections[-1][0]
        (['The answer', 'Where each method ranks the selected heads'], 'All heads')
        >>> "tiny-antonym" in dict(sections)["Settings"]
        True
    """
    sentences = "".join(f"<p>{html_lib.escape(line)}</p>" for line in analysis.answer())
    sections = [("The answer", sentences)]
    ranking = analysis.summary.rename(columns=_SUMMARY_NAMES)
    sections.append(("Where each method ranks the selected heads", table_html(ranking)))
    for name, uri in figures.items():
        sections.append((name, f'<img alt="{html_lib.escape(name)}" src="{uri}">'))
    control = analysis.random_control
    if len(control):
        attrs = control.attrs
        title = "Random-head control: the selected heads ablated together against random sets of unselected heads"
        if attrs.get("reason"):
            title += f" (not run: {attrs['reason']})"
        elif attrs.get("percentile") == attrs.get("percentile"):
            title += (
                f" (percentile {attrs['percentile']:.0f}, 95% CI {attrs['percentile_low']:.0f}–"
                f"{attrs['percentile_high']:.0f})"
            )
        sections.append((title, table_html(control)))
    if len(analysis.logit_lens):
        sections.append(("Logit lens of what each selected head's Δ_h writes", table_html(analysis.logit_lens)))
    settings = {**extra, **analysis.settings}
    rows = pd.DataFrame({"setting": list(settings), "value": [readable(v) for v in settings.values()]})
    sections.append(("Settings", table_html(rows)))
    sections.append(("Cost of each column", table_html(analysis.costs, 1)))
    sections.append(("All heads", table_html(analysis.table)))
    return sections


_SUMMARY_NAMES = {
    "rho_selected": "ρ(‖Δ_h‖, score) among selected",
    "p_selected": "p (ρ)",
    "precision_at_k": "precision@k",
    "p_precision": "permutation p",
    "selected_ranks": "rank of each selected head",
    "n_scored": "heads scored",
}


def readable(value: Any) -> str:
    """A setting as a person would write it: 3 significant digits, lists and dicts spelled out, newlines shown as ⏎.

    Example:
        >>> from lens_laai.analysis.report import readable
        >>> readable(0.000123456), readable([1, 2.5]), readable({"shots": 2, "exact": True}), readable("Q:\\nA:")
        ('0.000123', '1, 2.5', 'shots: 2; exact: yes', 'Q: ⏎ A:')
    """
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "–"}[value]
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {readable(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(readable(v) for v in value)
    return str(value).replace("\n", " ⏎ ")
