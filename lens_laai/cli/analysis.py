"""``lens-laai analyze`` and ``lens-laai report``: the head analysis of a saved intervention, as a table or a page.

lens-laai analyze --intervention runs/antonym --task antonym --out heads.csv
lens-laai report  --intervention runs/antonym --task antonym --out report.html
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from lens_laai.cli.args import nonempty_text, nonnegative_int
from lens_laai.errors import SaveError


def add_parsers(sub: Any, task_args: Any) -> None:
    """Register both subcommands on the ``lens-laai`` parser (``task_args`` adds --task, --model, ...).

    Example:
        >>> import argparse
        >>> from lens_laai.cli.analysis import add_parsers
        >>> from lens_laai.cli.args import add_task_args
        >>> parser = argparse.ArgumentParser(prog="lens-laai")
        >>> add_parsers(parser.add_subparsers(dest="command"), add_task_args)
        >>> args = parser.parse_args(["report", "--task", "antonym", "--intervention", "runs/a", "--out", "r.html"])
        >>> args.command, args.func.__name__, args.layers, args.n_prompts, args.shots, args.no_path
        ('report', 'run_report', 'all', 16, 5, False)
    """
    for name, helptext, func in (
        ("analyze", "score every head against attribution, patching and ablation", run_analyze),
        ("report", "one offline HTML page: tables, heatmaps, λ path, circuitsvis views", run_report),
    ):
        p = sub.add_parser(name, help=helptext)
        task_args(p)
        p.add_argument("--intervention", required=True, help="a saved HeadIntervention directory")
        p.add_argument("--layers", default="all", help="layers to score: 'all' (default), 'default' or a comma list")
        p.add_argument("--n-prompts", type=int, default=16, help="held-out queries used (default 16)")
        p.add_argument("--shots", type=int, default=5, help="demonstrations per k-shot prompt (default 5)")
        p.add_argument(
            "--patching-prompts",
            type=int,
            default=4,
            help="prompts for activation patching (default 4; its cost grows with it)",
        )
        p.add_argument("--n-random", type=int, default=20, help="random head sets in the ablation control (default 20)")
        p.add_argument("--methods", default=None, help="comma list of methods (default: all)")
        p.add_argument("--seed", type=nonnegative_int, default=0)
        p.add_argument(
            "--stability",
            default=None,
            help="CSV of selection probabilities (columns layer, head, selection_probability), e.g. from stability()",
        )
        p.add_argument(
            "--dense", default=None, help="a saved HeadIntervention on the whole layer, for the sufficiency comparison"
        )
        p.add_argument("--out", required=True, help="table.csv (analyze) or report.html (report)")
        p.add_argument("--force", action="store_true", help="overwrite an existing file that we did not write")
        if name == "report":
            p.add_argument(
                "--prompt",
                type=nonempty_text,
                default=None,
                help="example prompt for the circuitsvis views (default: a held-out query)",
            )
            p.add_argument("--no-path", action="store_true", help="skip the regularisation path (it refits the layer)")
        p.set_defaults(func=func)


def _analyse(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    from lens_laai.analysis.head_table import METHODS, head_table
    from lens_laai.cli.args import model_from_args, task_from_args
    from lens_laai.interventions.head import HeadIntervention

    task = task_from_args(args)
    methods = METHODS if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    model = model_from_args(args)
    iv = HeadIntervention.load(args.intervention, model=model)
    dense = HeadIntervention.load(args.dense, model=model) if args.dense else None
    analysis = head_table(
        model,
        task,
        iv,
        layers=args.layers,
        methods=methods,
        n_prompts=args.n_prompts,
        shots=args.shots,
        patching_prompts=args.patching_prompts,
        n_random=args.n_random,
        seed=args.seed,
        stability=_read_stability(args.stability) if args.stability else None,
        dense=dense,
        progress=not args.no_progress,
    )
    return model, task, iv, analysis


def _read_stability(path: str) -> Any:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise SaveError(f"Cannot read --stability {path}: {err}") from None
    missing = {"layer", "head", "selection_probability"} - set(frame.columns)
    if missing:
        raise SaveError(
            f"--stability {path} lacks columns {sorted(missing)}; it needs layer, head, selection_probability."
        )
    return frame


def _summary(args: argparse.Namespace, analysis: Any, iv: Any, seconds: float) -> dict[str, Any]:
    control = analysis.random_control
    return {
        "out": str(args.out),
        "intervention": args.intervention,
        "layers": analysis.layers,
        "selected_heads": [list(h) for h in iv.selected_heads()],
        "answer": analysis.answer(),
        "findings": analysis.findings,
        "summary": analysis.summary.to_dict("records"),
        "random_control_percentile": control.attrs.get("percentile") if len(control) else None,
        "costs": analysis.costs.to_dict("records"),
        "settings": analysis.settings,
        "seconds": round(seconds, 2),
    }


def run_analyze(args: argparse.Namespace) -> int:
    """``lens-laai analyze``: score every head of a saved intervention's model and write the table as CSV.

    The table has one row per scored head (attribution, patching, ablation and the intervention's own
    norms, as :func:`lens_laai.analysis.head_table.head_table` computes them); the summary says how the
    selected heads rank. Returns the exit code.

    Example (a one-step fit of the tiny model, its heads scored by direct logit attribution only):
        >>> import contextlib, io, json, os, shutil, tempfile
        >>> from lens_laai.cli.main import main
        >>> from lens_laai.testing import tiny_task
        >>> folder = tempfile.mkdtemp()
        >>> tiny_task().to_json(os.path.join(folder, "tiny.json"))
        >>> tiny = ["--task-file", os.path.join(folder, "tiny.json"), "--model", "lens-laai-tiny", "--no-progress"]
        >>> fit = ["fit", *tiny, "--layer", "1", "--n-train", "8", "--steps", "1", "--mode", "zero-shot",
        ...        "--select", "none", "--no-baselines", "--out", os.path.join(folder, "a"), "--json"]
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     main(fit)
        >>> table = os.path.join(folder, "heads.csv")
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(["analyze", *tiny, "--intervention", os.path.join(folder, "a"), "--methods", "dla",
        ...                  "--n-prompts", "4", "--shots", "2", "--out", table, "--json"])
        >>> s = json.loads(out.getvalue().splitlines()[-1])
        >>> code, s["layers"], [row["score"] for row in s["summary"]], s["settings"]["n_prompts"]
        (0, [0, 1, 2], ['dla'], 4)
        >>> import pandas as pd
        >>> len(pd.read_csv(table)), {"layer", "head", "selected"} <= set(pd.read_csv(table).columns)
        (12, True)
        >>> shutil.rmtree(folder)
    """
    from lens_laai.storage.bundle import atomic_write_text

    start = time.perf_counter()
    out = Path(args.out)
    _check_file(out, args.force)
    _, _, iv, analysis = _analyse(args)
    atomic_write_text(out, analysis.table.to_csv(index=False))
    summary = _summary(args, analysis, iv, time.perf_counter() - start)
    if args.json:
        print(json.dumps(summary, default=float))
    else:
        print("\n".join(analysis.answer()) + "\n")
        print(analysis.summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        print(f"\n{len(analysis.table)} heads scored in {summary['seconds']:.0f}s; table written to {out}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """``lens-laai report``: the head analysis as one offline HTML page (tables, heatmaps, λ path, circuitsvis views).

    Example (the tiny model's one-step fit, direct logit attribution only, without the λ path):
        >>> import contextlib, io, json, os, shutil, tempfile
        >>> from lens_laai.cli.main import main
        >>> from lens_laai.testing import tiny_task
        >>> folder = tempfile.mkdtemp()
        >>> tiny_task().to_json(os.path.join(folder, "tiny.json"))
        >>> tiny = ["--task-file", os.path.join(folder, "tiny.json"), "--model", "lens-laai-tiny", "--no-progress"]
        >>> fit = ["fit", *tiny, "--layer", "1", "--n-train", "8", "--steps", "1", "--mode", "zero-shot",
        ...        "--select", "none", "--no-baselines", "--out", os.path.join(folder, "a"), "--json"]
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     main(fit)
        >>> page = os.path.join(folder, "report.html")
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(["report", *tiny, "--intervention", os.path.join(folder, "a"), "--methods", "dla",
        ...                  "--n-prompts", "4", "--shots", "2", "--no-path", "--out", page, "--json"])
        >>> s = json.loads(out.getvalue().splitlines()[-1])
        >>> code, s["out"] == page, open(page, encoding="utf-8").read().lstrip().lower().startswith("<!doctype html>")
        (0, True, True)
        >>> shutil.rmtree(folder)
    """
    from lens_laai.analysis.report import (
        analysis_sections,
        check_report_path,
        render_page,
        write_report,
    )
    from lens_laai.analysis.views import (
        attention_views,
        figure_png,
        generation_view,
        heatmaps,
        regularisation_path,
    )
    from lens_laai.fitting.fit import fit_path

    start = time.perf_counter()
    out = Path(args.out)
    _check_folder(out)
    check_report_path(out, args.force)
    model, task, iv, analysis = _analyse(args)
    shown = [c for c in analysis.scores if not c.endswith(("_se", "_p"))]
    figures = {"Layer × head scores": figure_png(heatmaps(analysis.scores, shown))}
    if not args.no_path:
        figures["Regularisation path"] = figure_png(_path_figure(model, task, iv, fit_path, regularisation_path, args))
    prompt = args.prompt or analysis_prompt(iv, analysis)
    views = attention_views(model, iv, prompt) + [generation_view(model, iv, prompt)]
    extra = {"intervention": args.intervention, "prompt": prompt}
    page = render_page(
        f"Heads of {iv.metadata.get('name', 'an intervention')}", analysis_sections(analysis, figures, extra), views
    )
    write_report(out, page, force=args.force)
    summary = _summary(args, analysis, iv, time.perf_counter() - start)
    print(json.dumps(summary, default=float) if args.json else f"report written to {out} in {summary['seconds']:.0f}s")
    return 0


def analysis_prompt(iv: Any, analysis: Any) -> str:
    """The zero-shot prompt of the first held-out query, in the intervention's template.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from lens_laai import HeadIntervention
        >>> from lens_laai.cli.analysis import analysis_prompt
        >>> from lens_laai.testing import tiny_model
        >>> iv = HeadIntervention.from_deltas(tiny_model(), {1: torch.zeros(4, 16)})
        >>> analysis_prompt(iv, SimpleNamespace(settings={"first_query": "wet"}))
        'Q: wet\\nA:'
    """
    from lens_laai.tasks.prompts import PromptTemplate

    template = PromptTemplate.from_json(iv.metadata["template"]) if "template" in iv.metadata else PromptTemplate()
    return template.render(analysis.settings["first_query"])


def _path_figure(model: Any, task: Any, iv: Any, fit_path: Any, draw: Any, args: argparse.Namespace) -> Any:
    from lens_laai.tasks.provenance import held_out, records_of
    from lens_laai.tasks.task import TaskSplits

    config = iv.metadata.get("fit_config", {})
    relative = bool(config.get("relative", False))
    if relative:  # fractions of λ_max: from every head off down to no penalty
        lambdas = [1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.0]
    else:
        lam = float(config.get("group_l1", 0.3)) or 0.3
        lambdas = [lam * f for f in (8, 4, 2, 1, 0.5, 0.25, 0.0)]
    splits = task if isinstance(task, TaskSplits) else held_out(task, records_of([iv.metadata]))
    scored = TaskSplits(splits.train, splits.test, splits.valid, splits.seed)  # the path is scored on held-out pairs
    from lens_laai.tasks.prompts import PromptTemplate

    template = PromptTemplate.from_json(iv.metadata["template"]) if "template" in iv.metadata else None
    layer = max(iv.layers, key=lambda l: float(iv.deltas[l].norm()))  # a joint fit: its main layer
    table, ivs = fit_path(
        model,
        scored,
        layer,
        lambdas,
        relative=relative,
        l1=float(config.get("l1", 0.0)),
        steps=int(config.get("steps", 30)),
        lr=float(config.get("lr", 1.0)),
        shots=int(config.get("shots", 0)),
        template=template,
        progress=not args.no_progress,
    )
    return draw(table, ivs, label="held-out accuracy")


def _check_file(path: Path, force: bool) -> None:
    _check_folder(path)
    if path.is_dir():
        raise SaveError(f"{path} is a directory; give the path of a .csv file.")
    if path.exists() and not force:
        raise SaveError(f"{path} exists; refusing to overwrite it. Choose a new path, or pass --force.")


def _check_folder(path: Path) -> None:
    """Refuse before the analysis runs, not after, when the output's folder cannot be written."""
    import os

    folder = path.resolve().parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise SaveError(f"Cannot write into {folder}; choose another --out.")
