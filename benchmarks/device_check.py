"""Device check: the architecture test matrix and the fast-vs-full step timing, on a CUDA GPU.

On a machine with CUDA this script

1. runs ``tests/test_architectures.py`` with ``LENS_LAAI_TEST_DEVICE=cuda`` (every architecture's
   fit → apply → save/load → evaluate → generate, fast path vs full forward, bf16, with the models
   on the GPU), in a subprocess;
2. times one FISTA step on the full forward and on the fast path (``benchmarks/fit_speed.py``'s
   ``time_steps``: batch 20, middle layer, zero-shot and 10-shot prompts) for each ``--dtypes``
   entry, with the model on the GPU, and records the largest loss difference between the two
   trajectories, the fast path taken (kernel / blocks / full forward) and the peak GPU memory;
3. prints one JSON line: ``device``, ``gpu``, ``torch``, ``model``, ``tests`` (passed, failed,
   seconds) and ``runs`` (one object per dtype × prompts: ``naive_step_seconds``,
   ``fast_step_seconds``, ``ratio``, ``max_abs_loss_diff``, ``fast_path``, ``peak_gpu_mib``).

Without CUDA it prints ``{"device": "cpu", "cuda": false, "status": "no CUDA device: nothing measured"}``
and exits 0, so it is safe to run anywhere.

``--matrix`` instead prints the architecture matrix on any device (the CPU included): for every tiny
architecture of :mod:`lens_laai.testing` and each dtype, the fast path taken and the largest
difference between fast and full forward (logits under a random Δ, relative to the largest logit;
and the loss trajectory of a 10-step fit), then one JSON line with the rows.

    python benchmarks/device_check.py                                   # embedded SmolLM2, float32 + bfloat16
    python benchmarks/device_check.py --model lens-laai-tiny --quick    # a minute: the plumbing only
    python benchmarks/device_check.py --matrix --device cpu             # the architecture table (seconds)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model to time (a name load_model accepts)")
    p.add_argument("--task", default="antonym", help="bundled task (ignored for lens-laai-tiny models)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of model dtypes to time")
    p.add_argument("--device", default="cuda", help="CUDA device to use (default: cuda)")
    p.add_argument("--batch", type=int, default=20, help="training prompts per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--quick", action="store_true", help="2 timed steps, batch 12: a smoke run")
    p.add_argument("--no-tests", action="store_true", help="skip the test matrix")
    p.add_argument("--matrix", action="store_true", help="print the architecture matrix (any device) and stop")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch = 2, min(args.batch, 12)
    if args.matrix:
        rows = architecture_matrix(args.device, [d.strip() for d in args.dtypes.split(",")])
        print(json.dumps({"device": args.device, "torch": torch.__version__, "matrix": rows}))
        return 0
    if not torch.cuda.is_available():
        print(
            json.dumps(
                {
                    "device": "cpu",
                    "cuda": False,
                    "status": "no CUDA device: nothing measured",
                    "torch": torch.__version__,
                }
            )
        )
        return 0
    out: dict[str, Any] = {
        "device": args.device,
        "cuda": True,
        "gpu": torch.cuda.get_device_name(args.device),
        "torch": torch.__version__,
        "model": args.model,
        "batch": args.batch,
        "timed_steps": args.steps,
    }
    if not args.no_tests:
        out["tests"] = run_tests(args.device)
        log(f"tests: {out['tests']}")
    out["runs"] = [run for dtype in args.dtypes.split(",") for run in time_dtype(args, dtype.strip())]
    print(json.dumps(out))
    return 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_tests(device: str) -> dict[str, Any]:
    """``tests/test_architectures.py`` with every model on ``device``; pass/fail counts and seconds."""
    env = {**os.environ, "LENS_LAAI_TEST_DEVICE": device}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_architectures.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    return {
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
        "skipped": counts.get("skipped", 0),
        "failures": failures[:10],
        "seconds": round(time.perf_counter() - start, 1),
        "summary": tail,
    }


def architecture_matrix(device: str, dtypes: list[str]) -> list[dict[str, Any]]:
    """Per tiny architecture and dtype: the fast path taken and how far it is from the full forward."""
    import torch.nn.functional as F

    from lens_laai import fit
    from lens_laai.fastpath import LastTokenCache
    from lens_laai.interventions.head import delta_hook
    from lens_laai.models.bridge import hook_name
    from lens_laai.tasks.prompts import k_shot_prompts, make_batch
    from lens_laai.testing import TINY_ARCHITECTURES, tiny_model_for, tiny_task

    task = tiny_task()
    zero, targets = k_shot_prompts(task, shots=0)
    two, _ = k_shot_prompts(task, shots=2)
    prompts = [(two if i % 2 else zero)[i] for i in range(12)]  # padded, longer than the sliding windows
    rows = []
    for arch in TINY_ARCHITECTURES:
        for dtype in dtypes:
            model = tiny_model_for(arch, dtype=getattr(torch, dtype), device=device)
            batch = make_batch(model.tokenizer, prompts, targets[:12]).to(model.cfg.device)
            cache = LastTokenCache.build(model, batch, layer=1)
            delta = 2 * torch.randn(model.cfg.n_heads, model.cfg.d_head, generator=torch.Generator().manual_seed(0))
            hooks = [(hook_name(1), delta_hook(delta))]
            with torch.no_grad():
                full = model.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks)[
                    :, -1
                ]
                full = full.float()
                fast = cache.logits(hooks).float() if cache is not None else full
                ce_full = F.cross_entropy(full, batch.target_ids.to(full.device), reduction="none")
                ce_fast = cache.cross_entropy(hooks, batch.target_ids) if cache is not None else ce_full
            kwargs = dict(layer=1, n_train=8, n_valid=4, steps=10, group_l1=0.01, l1=1e-3, progress=False)
            a, b = fit(model, task, fast=True, **kwargs), fit(model, task, fast=False, **kwargs)
            row = {
                "architecture": arch,
                "hf_class": type(model.original_model).__name__,
                "dtype": dtype,
                "path": cache.path if cache is not None else "full forward",
                "max_rel_logit_diff": float((fast - full).abs().max() / full.abs().max().clamp(min=1.0)),
                "max_abs_ce_diff": float((ce_fast.float() - ce_full).abs().max()),
                "max_abs_fit_loss_diff": float((a.history.loss - b.history.loss).abs().max()),
            }
            log(
                f"{arch:9s} {dtype:9s} {row['path']:7s} logits {row['max_rel_logit_diff']:.1e}  "
                f"loss {row['max_abs_ce_diff']:.1e}  fit trajectory {row['max_abs_fit_loss_diff']:.1e}"
            )
            rows.append(row)
    return rows


def load_fit_speed():
    spec = importlib.util.spec_from_file_location("fit_speed", ROOT / "benchmarks" / "fit_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_dtype(args: argparse.Namespace, dtype: str) -> list[dict[str, Any]]:
    """Full-forward and fast-path step times at zero and 10 shots for the model in ``dtype``."""
    from lens_laai import load_model, load_task
    from lens_laai.fastpath import LayerRunner
    from lens_laai.fitting import FitConfig
    from lens_laai.fitting.fit import training_batches
    from lens_laai.tasks.prompts import PromptTemplate
    from lens_laai.testing import tiny_task

    fit_speed = load_fit_speed()
    model = load_model(args.model, device=args.device, dtype=dtype)
    task = tiny_task() if args.model.startswith("lens-laai-tiny") else load_task(args.task)
    splits = task.split(0, args.batch, min(10, len(task) - args.batch - 1))
    layer = model.cfg.n_layers // 2
    runs = []
    for shots in (0, 10):
        cfg = FitConfig(layer=layer, shots=shots, batch_size=len(splits.train))
        train = training_batches(model, splits.train, splits.train, cfg, PromptTemplate())
        path = LayerRunner(model, train, layer).path
        rows, losses = {}, {}
        for which in ("naive", "fast"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            row, history = fit_speed.time_steps(model, splits, layer, shots, which == "fast", args.steps)
            torch.cuda.synchronize()
            rows[which] = {**row, "peak_gpu_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
            losses[which] = history
        diff = float((losses["fast"] - losses["naive"]).abs().max())
        run = {
            "dtype": dtype,
            "prompts": f"{shots}-shot",
            "layer": layer,
            "fast_path": path,
            "mean_prompt_tokens": rows["fast"]["mean_prompt_tokens"],
            "naive_step_seconds": rows["naive"]["step_seconds"],
            "fast_step_seconds": rows["fast"]["step_seconds"],
            "ratio": rows["naive"]["step_seconds"] / rows["fast"]["step_seconds"],
            "fast_setup_seconds": rows["fast"]["setup_seconds"],
            "max_abs_loss_diff": diff,
            "naive_peak_gpu_mib": round(rows["naive"]["peak_gpu_mib"], 1),
            "fast_peak_gpu_mib": round(rows["fast"]["peak_gpu_mib"], 1),
        }
        log(
            f"{dtype} {shots}-shot: naive {run['naive_step_seconds']:.4f}s fast {run['fast_step_seconds']:.4f}s "
            f"({run['ratio']:.1f}x, {path}), max |loss diff| {diff:.2e}"
        )
        runs.append(run)
    del model
    torch.cuda.empty_cache()
    return runs


if __name__ == "__main__":
    sys.exit(main())
