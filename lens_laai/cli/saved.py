"""``lens-laai eval`` and ``lens-laai compose``: commands on saved interventions."""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

from lens_laai.cli.args import (
    model_from_args,
    parse_float,
    task_from_args,
)
from lens_laai.cli.opinion import (
    eval_survey,
    is_survey,
)
from lens_laai.errors import LensLaaiError


def run_eval(args: argparse.Namespace) -> int:
    """``lens-laai eval``: accuracy on a task split, with a saved intervention or without one (prompting).

    With ``--intervention`` the split is the one the fit recorded, so its training pairs are never scored
    as test; with ``--json`` the last line is one JSON object. Returns the exit code.

    Example (score a one-step fit of the tiny model on its 16 held-out pairs, then 2-shot prompting alone):
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
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(["eval", *tiny, "--intervention", os.path.join(folder, "a"), "--json"])
        >>> e = json.loads(out.getvalue().splitlines()[-1])
        >>> code, e["n"], e["split"], e["mode"], 0.0 <= e["accuracy"] <= 1.0
        (0, 16, 'test', 'zero-shot Δ', True)
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(["eval", *tiny, "--shots", "2", "--n-train", "8", "--json"])
        >>> e = json.loads(out.getvalue().splitlines()[-1])
        >>> code, e["n"], e["shots"], e["intervention"]
        (0, 16, 2, None)
        >>> shutil.rmtree(folder)
    """
    from lens_laai.evaluation.evaluate import evaluate
    from lens_laai.interventions.protocol import load_intervention

    if is_survey(args):
        return eval_survey(args)
    task = task_from_args(args)
    if args.intervention is None and args.strict:
        raise LensLaaiError("--strict checks an intervention against the model; give --intervention too.")
    model = model_from_args(args)
    iv = load_intervention(args.intervention, model, strict=args.strict) if args.intervention else None
    _check_provenance(iv, args)
    result = evaluate(
        model,
        task,
        iv,
        shots=args.shots,
        split=args.split,
        seed=args.seed,
        n_train=args.n_train,
        n_valid=args.n_valid,
        progress=not args.no_progress,
    )
    out = {
        "task": task.name,
        "accuracy": result.accuracy,
        "n": result.n,
        "shots": args.shots,
        "mode": result.mode,
        "intervention": args.intervention,
        "split": args.split,
        "seconds": round(result.seconds, 2),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(result.table[["input", "target", "prediction", "correct"]].head(10).to_string(index=False))
        print(f"\naccuracy {result.accuracy:.3f} on {result.n} {args.split} examples ({result.mode})")
    return 0


def _check_provenance(iv: Any, args: argparse.Namespace) -> None:
    """Refuse a task evaluation that cannot keep the fit's training pairs out of the scored split.

    A survey intervention's record splits questions, not task pairs; an intervention whose data
    record and fit_config are gone (deleted, or never written) cannot say which pairs it saw, so
    only an explicit ``--split all`` (scoring every pair, knowingly) is allowed.
    """
    from lens_laai.interventions.ablation import HeadAblation

    if iv is None or isinstance(iv, HeadAblation):
        return
    if "survey" in iv.metadata or iv.metadata.get("kind") == "opinion":
        raise LensLaaiError(
            f"{args.intervention} was fitted on a survey ({iv.metadata.get('name', '?')}); its record splits survey "
            "questions, not task pairs. Evaluate it with --survey / --survey-dir instead of --task."
        )
    config = iv.metadata.get("fit_config")
    if not iv.metadata.get("data") and not (isinstance(config, dict) and "seed" in config):
        if args.split != "all":
            raise LensLaaiError(
                f"{args.intervention} records neither the data it was fitted on (metadata.data) nor its fit_config, "
                "so its held-out split cannot be checked and training pairs could be scored as test. Pass "
                "--split all to score every pair knowingly."
            )
        warnings.warn(
            f"{args.intervention} has no data record: --split all scores pairs it may have been fitted on.",
            stacklevel=1,
        )


def run_compose(args: argparse.Namespace) -> int:
    """``lens-laai compose``: save the weighted sum of saved interventions (task calculus) to ``--out``.

    Example (a fit plus half of itself, then a fit minus itself, which leaves no head switched on):
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
        >>> a = os.path.join(folder, "a")
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(["compose", a, a, "--weights", "1,0.5", "--out", os.path.join(folder, "ab"), "--json"])
        >>> s = json.loads(out.getvalue().splitlines()[-1])
        >>> from lens_laai.interventions.protocol import load_intervention
        >>> code, s["layers"], s["selected_heads"] == [list(h) for h in load_intervention(a).selected_heads()]
        (0, [1], True)
        >>> main(["compose", a, a, "--weights", "1,-1", "--out", os.path.join(folder, "zero")])
        saved .../zero: layers [1], 0 heads
        0
        >>> main(["compose", a, a, "--weights", "1", "--out", os.path.join(folder, "c"), "--json"])
        {"error": "--weights has 1 values for 2 interventions; give one each.", "command": "compose"}
        2
        >>> shutil.rmtree(folder)
    """
    from lens_laai.interventions.protocol import load_intervention
    from lens_laai.storage.bundle import check_save_path

    weights = (
        [1.0] * len(args.interventions)
        if args.weights is None
        else [parse_float(w, "--weights") for w in args.weights.split(",")]
    )
    if len(weights) != len(args.interventions):
        raise LensLaaiError(
            f"--weights has {len(weights)} values for {len(args.interventions)} interventions; give one each."
        )
    check_save_path(args.out, force=args.force)
    ivs = [load_intervention(p) for p in args.interventions]
    total = weights[0] * ivs[0]
    for w, iv in zip(weights[1:], ivs[1:]):
        total = total + w * iv
    total.metadata.update(composed_from=list(args.interventions), weights=weights)
    total.save(args.out, force=args.force)
    heads = [list(h) for h in total.selected_heads()] if hasattr(total, "selected_heads") else []
    out = {"out": args.out, "layers": total.layers, "selected_heads": heads}
    print(json.dumps(out) if args.json else f"saved {args.out}: layers {total.layers}, {len(heads)} heads")
    return 0
