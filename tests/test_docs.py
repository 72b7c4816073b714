"""The documentation: notebooks kept without outputs, every notebook and public name on the site, code in the
guides that at least compiles and imports, and circuitsvis views that render offline on the built site.

The site itself is built (strictly, notebooks executed) by ``bash scripts/docs.sh``, which
``scripts/test.sh`` runs before pytest; the browser test reads that build and is skipped without it.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
from pathlib import Path

import pytest
from _browser import DevTools, page_requests, render_offline

import lens_laai

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SITE = DOCS / "_build" / "html"
# pages written for the site (the results, performance, scaling, analysis and method pages are reports)
GUIDES = [DOCS / p for p in ("index.md", "install.md", "overview.md", "which_analysis.md", "about_docs.md")] + sorted(
    (DOCS / "howto").glob("*.md")
)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    """The repository keeps notebooks stripped; the site shows them executed."""
    cells = json.loads(path.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them (e.g. `jupyter nbconvert --clear-output`)"


def test_every_notebook_is_a_tutorial_on_the_site():
    conf = (DOCS / "conf.py").read_text()
    listed = ast.literal_eval(re.search(r"^NOTEBOOKS = (\[.*\])$", conf, re.M).group(1))
    assert sorted(listed) == sorted(p.stem for p in NOTEBOOKS)
    index = (DOCS / "index.md").read_text()
    assert all(f"tutorials/{name}\n" in index for name in listed)


def test_api_reference_lists_every_public_name():
    page = (DOCS / "api.md").read_text()
    missing = []
    for name in lens_laai.__all__:
        if name == "__version__":
            continue
        obj = getattr(lens_laai, name)
        if f"~{obj.__module__}.{obj.__qualname__}\n" not in page:
            missing.append(name)
    assert not missing, f"docs/api.md does not list {missing}"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.M | re.S)


@pytest.mark.parametrize("path", GUIDES, ids=lambda p: str(p.relative_to(DOCS)))
def test_guide_code_compiles_and_its_imports_exist(path):
    """Each guide's Python parses, and every name it imports from lens_laai exists (so renames break the build)."""
    for block in python_blocks(path):
        tree = ast.parse(block, filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lens_laai"):
                module = __import__(node.module, fromlist=["_"])
                absent = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not absent, f"{path.name}: {node.module} has no {absent}"


def built(page: str) -> Path:
    path = SITE / page
    if not path.exists():
        pytest.skip("the site is not built: run `bash scripts/docs.sh` first (scripts/test.sh does)")
    return path


def open_in_browser(page: Path, tmp_path: Path, shot: Path, fragment: str = "") -> tuple[str, list[str]]:
    """The page's DOM after 15 s of virtual time in headless Chromium with the network blocked, and what it fetched."""
    return render_offline(
        page.as_uri() + fragment, tmp_path / "net.json", shot, window="1280,1400", budget_ms=15000, timeout=180
    )


VIEWS_JS = """Array.from(document.querySelectorAll('div[id^="circuits-vis-"]')).map(d => {
    const r = d.getBoundingClientRect();
    return {id: d.id, x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height,
            elements: d.querySelectorAll('*').length}; })"""

# the head names an AttentionHeads view prints above each head's thumbnail
HEAD_LABELS_JS = """Array.from(document.querySelectorAll('div[id^="circuits-vis-"] h4')).map(h => h.textContent)"""


def test_circuitsvis_views_render_offline_on_the_built_site(tmp_path):
    """Both views of the executed tutorial draw themselves in a real browser with the network blocked.

    A cropped screenshot of them goes to ``$LENS_LAAI_DOCS_SCREENSHOT`` (default: a temporary file).
    """
    import time

    from PIL import Image

    page = built("tutorials/heads_vs_ablation.html")
    html = page.read_text(encoding="utf-8")
    if "cell_output" not in html:
        pytest.skip("the site was built without executing the notebooks (LENS_LAAI_DOCS_EXECUTE=off)")
    expected = re.findall(r'<div id="(circuits-vis-[0-9a-f-]+)"', html)
    assert len(expected) >= 2, "the tutorial page holds its circuitsvis views"
    assert "unpkg.com" not in html and "CircuitsVis.render" in html
    log = tmp_path / "net.json"
    chrome = DevTools(log, window="1280,1000")  # skips, saying why, without chromium
    try:
        chrome.open(page.as_uri())
        deadline, views = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            views = chrome.evaluate(VIEWS_JS) or []
            if len(views) == len(expected) and all(v["elements"] > 3 and v["h"] > 50 for v in views):
                break
            time.sleep(0.5)
        assert [v["id"] for v in views] == expected
        assert all(v["elements"] > 3 and v["h"] > 50 for v in views), f"a view did not draw itself: {views}"
        labels = chrome.evaluate(HEAD_LABELS_JS)
        assert labels and all(re.fullmatch(r"L\d+H\d+", t) for t in labels), f"heads not labelled L<l>H<h>: {labels}"
        height = chrome.evaluate("document.documentElement.scrollHeight")
        chrome.send(
            "Emulation.setDeviceMetricsOverride", width=1280, height=int(height), deviceScaleFactor=1, mobile=False
        )
        time.sleep(1.0)
        views = chrome.evaluate(VIEWS_JS)
        full = tmp_path / "page.png"
        full.write_bytes(base64.b64decode(chrome.send("Page.captureScreenshot", format="png")["data"]))
    finally:
        chrome.close()
    box = (
        int(min(v["x"] for v in views)) - 20,
        int(min(v["y"] for v in views)) - 70,
        int(max(v["x"] + v["w"] for v in views)) + 20,
        int(max(v["y"] + v["h"] for v in views)) + 10,
    )
    crop = Image.open(full).convert("RGB").crop(box)
    shot = Path(os.environ.get("LENS_LAAI_DOCS_SCREENSHOT", tmp_path / "views.png"))
    crop.save(shot)
    assert len(set(crop.resize((64, 64)).getdata())) > 20, "the views' region is not blank"
    assert page_requests(log) == [], "the page fetched something from the network"


@pytest.mark.parametrize("page", ["index.html", "overview.html", "which_analysis.html", "api.html"])
def test_site_pages_load_nothing_from_the_network(page, tmp_path):
    dom, requests = open_in_browser(built(page), tmp_path, tmp_path / "page.png")
    assert "</article>" in dom and requests == [], f"{page} fetched {requests}"
