"""Fast last-token fitting vs the full forward, side by side in one run.

Measures, on one model and one batch of training prompts at a middle layer: median seconds per
optimisation step (one FISTA step: gradient at the extrapolated point plus the sufficient-decrease
check) for the full-forward path and the last-token fast path, on zero-shot and on 10-shot
prompts; the extra peak memory (RSS growth) of each; the largest difference between the two loss
trajectories; and a whole layer sweep on both paths. Each timing runs in a fresh process, ``--repeats``
times, interleaved across configurations; the table reports medians over repeats and the step-time
spread. Prints the table and the ratios; with ``--json`` the last line is one JSON object.

    python benchmarks/fit_speed.py                     # embedded SmolLM2-135M, ~8 minutes on 2 cores
    python benchmarks/fit_speed.py --model lens-laai-tiny --quick --json   # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from lens_laai import fit, load_model, load_task
from lens_laai.fastpath import CostMeter, LayerRunner
from lens_laai.fitting import FitConfig
from lens_laai.fitting.fit import parse_layers, solve_layer, training_batches
from lens_laai.tasks.prompts import PromptTemplate
from lens_laai.testing import tiny_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="antonym", help="bundled task name or FV-format JSON path")
    p.add_argument("--batch", type=int, default=20, help="training prompts per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--layer", type=int, default=None, help="intervened layer (default: n_layers // 2)")
    p.add_argument("--sweep-steps", type=int, default=10, help="steps per layer in the layer-sweep timing")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process timings per configuration (median reported)")
    p.add_argument("--quick", action="store_true", help="smoke settings: 2 steps, small batch, no sweep, 1 repeat")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--sweep-layers",
        default="default",
        help="layers of the sweep timing: 'all', 'default' (the CLI's default sweep) or a comma list",
    )
    p.add_argument("--out", default=None, help="also write the table as markdown here")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return worker(args)
    if args.quick:
        args.steps, args.batch, args.sweep_steps, args.repeats = 2, min(args.batch, 12), 0, 1

    runs, losses = [], {}
    for repeat in range(args.repeats):  # interleaved, so drift on a shared machine hits both paths alike
        for shots in (0, 10):
            for path in ("naive", "fast"):
                row, history = in_fresh_process(
                    sys.argv[1:] if argv is None else argv, {"shots": shots, "fast": path == "fast"}
                )
                runs.append({"prompts": f"{shots}-shot", "path": path, "repeat": repeat, **row})
                losses[(shots, path)] = pd.Series(history)
    layer = int(runs[0]["layer"])
    model, splits = setup(args)
    table = combine(pd.DataFrame(runs))
    diff = max(float((losses[(s, "fast")] - losses[(s, "naive")]).abs().max()) for s in (0, 10))
    result = summarise(table, diff, layer, args)
    if args.sweep_steps:
        result.update(time_sweep(model, splits, args.sweep_steps, parse_layers(args.sweep_layers, model.cfg.n_layers)))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(
        f"\nratio (naive / fast seconds per step): zero-shot {result['ratio_zero_shot']:.1f}x, "
        f"10-shot {result['ratio_10_shot']:.1f}x; max |loss difference| {diff:.2e}"
    )
    if args.sweep_steps:
        print(
            f"layer sweep ({result['sweep_layers']} layers x {args.sweep_steps} steps): naive "
            f"{result['sweep_seconds_naive']:.1f}s, fast {result['sweep_seconds_fast']:.1f}s "
            f"({result['ratio_sweep']:.1f}x)"
        )
    if args.out:
        Path(args.out).write_text(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))
    if args.json:
        print(json.dumps(result))
    return 0


def combine(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (prompts, path): medians over repeats, with the spread of the step time."""
    keys = ["prompts", "path"]
    table = runs.groupby(keys, sort=False).median(numeric_only=True).reset_index()
    spread = runs.groupby(keys, sort=False).step_seconds.agg(["min", "max"]).reset_index()
    table = table.merge(spread.rename(columns={"min": "step_seconds_min", "max": "step_seconds_max"}), on=keys)
    table["fast_path_used"] = runs.groupby(keys, sort=False).fast_path_used.all().values
    table["repeats"] = runs.groupby(keys, sort=False).size().values
    return table.drop(columns=["repeat"])


def setup(args):
    model = load_model(args.model)
    task = tiny_task() if args.model == "lens-laai-tiny" else load_task(args.task)
    return model, task.split(0, args.batch, min(10, len(task) - args.batch - 1))


def in_fresh_process(argv: list[str], spec: dict) -> tuple[dict, list[float]]:
    """Run one timing in a new interpreter, so its peak memory is its own."""
    cmd = [sys.executable, __file__, *argv, "--_worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"timing worker failed ({spec}):\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["row"], out["history"]


def worker(args) -> int:
    spec = json.loads(args._worker)
    model, splits = setup(args)
    layer = model.cfg.n_layers // 2 if args.layer is None else args.layer
    row, history = time_steps(model, splits, layer, spec["shots"], spec["fast"], args.steps)
    print(json.dumps({"row": row, "history": history.tolist()}))
    return 0


def time_steps(model, splits, layer: int, shots: int, fast: bool, steps: int) -> tuple[dict, pd.Series]:
    """Median seconds per FISTA step, setup seconds, extra peak RSS and the loss trajectory."""
    cfg = FitConfig(layer=layer, shots=shots, steps=steps + 1, batch_size=len(splits.train), fast=fast)
    train = training_batches(model, splits.train, splits.train, cfg, PromptTemplate())
    with torch.no_grad():  # warm-up: one-off buffers of a first forward are not the method's memory
        model(train[0].input_ids[:1], attention_mask=train[0].attention_mask[:1])
    rss0 = _reset_peak_rss()
    t0 = time.perf_counter()
    runner = LayerRunner(model, train, layer, fast, CostMeter())
    setup = time.perf_counter() - t0
    stamps = [time.perf_counter()]
    _, history = solve_layer(
        runner,
        train,
        cfg,
        torch.zeros(model.cfg.n_heads, model.cfg.d_head),
        lambda r: stamps.append(time.perf_counter()),
    )
    durations = [b - a for a, b in zip(stamps[1:-1], stamps[2:])]  # drop the warm-up step
    peak = _peak_rss()
    tokens = float(train[0].attention_mask.sum()) / len(train[0])
    return (
        {
            "layer": layer,
            "mean_prompt_tokens": round(tokens, 1),
            "setup_seconds": setup,
            "step_seconds": statistics.median(durations),
            "extra_peak_mib": (peak - rss0) / 2**20 if peak else None,
            "fast_path_used": runner.is_fast,
        },
        pd.Series([r.loss for r in history]),
    )


def time_sweep(model, splits, steps: int, layers: list[int] | None) -> dict:
    out = {"sweep_layers": len(layers) if layers else model.cfg.n_layers, "sweep_steps": steps}
    for path in ("naive", "fast"):
        t0 = time.perf_counter()
        result = fit(model, splits, "sweep", layers=layers, steps=steps, fast=path == "fast", progress=False)
        out[f"sweep_seconds_{path}"] = time.perf_counter() - t0
        out[f"sweep_forward_equivalents_{path}"] = result.forward_equivalents
    out["ratio_sweep"] = out["sweep_seconds_naive"] / out["sweep_seconds_fast"]
    return out


def summarise(table: pd.DataFrame, diff: float, layer: int, args) -> dict:
    get = lambda shots, path, col: float(table[(table.prompts == f"{shots}-shot") & (table.path == path)][col].iloc[0])
    res = {
        "model": args.model,
        "layer": layer,
        "batch": args.batch,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "max_abs_loss_diff": diff,
    }
    for shots, name in ((0, "zero_shot"), (10, "10_shot")):
        res[f"naive_step_seconds_{name}"] = get(shots, "naive", "step_seconds")
        res[f"fast_step_seconds_{name}"] = get(shots, "fast", "step_seconds")
        res[f"ratio_{name}"] = res[f"naive_step_seconds_{name}"] / res[f"fast_step_seconds_{name}"]
        res[f"ratio_{name}_worst"] = get(shots, "naive", "step_seconds_min") / get(shots, "fast", "step_seconds_max")
        for path in ("naive", "fast"):
            mem = table[(table.prompts == f"{shots}-shot") & (table.path == path)]["extra_peak_mib"].iloc[0]
            res[f"{path}_extra_peak_mib_{name}"] = None if mem is None or pd.isna(mem) else float(mem)
    return res


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS (Linux ``clear_refs``) and return the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return 0
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
