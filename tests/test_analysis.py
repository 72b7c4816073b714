"""Head ablations, the head table, its summaries, the pictures and the offline report."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _browser import render_offline

from lens_laai import (
    HeadAblation,
    InterventionError,
    Task,
    evaluate,
    fit,
    generate,
    load_intervention,
)
from lens_laai.analysis.head_table import head_table, selection_agreement, spearman_permutation
from lens_laai.cli.main import main
from lens_laai.tasks.prompts import k_shot_prompts, model_batches
from lens_laai.testing import TINY_PAIRS

TINY = ["--model", "lens-laai-tiny", "--no-progress"]
IDS = torch.tensor([[1, 20, 21, 22, 23]])


@pytest.fixture(scope="module")
def fitted(tiny):
    task = Task("tiny-antonym", list(TINY_PAIRS))
    return task, fit(tiny, task, layer=1, n_train=8, n_valid=4, steps=4, group_l1=0.01, progress=False).intervention


@pytest.fixture(scope="module")
def analysis(tiny, fitted):
    task, iv = fitted
    return head_table(tiny, task, iv, n_prompts=8, shots=2, patching_prompts=6, n_random=6, progress=False)


@pytest.fixture(scope="module")
def reference(tiny):
    return model_batches(tiny, *k_shot_prompts(Task("t", list(TINY_PAIRS)), 2))


# ablations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
@pytest.mark.parametrize("positions", ["last", "all", (1, 3)])
def test_ablation_changes_only_its_heads_and_positions(tiny, reference, kind, positions):
    make = {
        "zero": lambda: HeadAblation.zero(tiny, [(1, 2)], positions),
        "mean": lambda: HeadAblation.mean(tiny, [(1, 2)], reference, positions),
        "resample": lambda: HeadAblation.resample(tiny, [(1, 2)], reference, positions, seed=3),
    }[kind]
    ablation = make()
    _, base = tiny.run_with_cache(IDS)
    with ablation.apply(tiny):
        _, cache = tiny.run_with_cache(IDS)
    z0, z1 = base["blocks.1.attn.hook_z"][0], cache["blocks.1.attn.hook_z"][0]
    where = {"last": [4], "all": list(range(5)), (1, 3): [1, 3]}[positions]
    others = [p for p in range(5) if p not in where]
    assert torch.equal(z0[:, [0, 1, 3]], z1[:, [0, 1, 3]]), "other heads must not change"
    assert torch.equal(z0[others], z1[others]), "other positions must not change"
    if kind == "zero":
        assert torch.equal(z1[where, 2], torch.zeros_like(z1[where, 2]))
    elif kind == "mean":
        assert torch.allclose(z1[where, 2], ablation.values[1][0, 2].expand(len(where), -1))
    else:
        assert any(torch.allclose(z1[where[0], 2], row) for row in ablation.values[1][:, 2])
    assert torch.equal(tiny(IDS), tiny.run_with_hooks(IDS, fwd_hooks=[])), "hooks must not leak"


def test_ablation_protocol_save_load_evaluate_generate(tiny, reference, fitted, tmp_path):
    task, iv = fitted
    ablation = HeadAblation.mean(tiny, [(1, 0), (2, 1)], reference)
    ablation.save(tmp_path / "abl")
    loaded = load_intervention(tmp_path / "abl", model=tiny)
    assert isinstance(loaded, HeadAblation) and loaded.equals(ablation)
    alone = evaluate(tiny, task, ablation, split="all")
    assert alone.n == len(task)
    generate(tiny, "Q: hot\nA:", ablation, max_new_tokens=3)
    with pytest.raises(InterventionError, match="do not scale or add"):
        2.0 * ablation
    with pytest.raises(InterventionError, match="do not scale or add"):
        ablation + ablation
    with pytest.raises(InterventionError, match="outside this model"):
        HeadAblation.zero(tiny, [(9, 0)])
    assert (
        main(
            [
                "eval",
                "--task",
                "tiny",
                "--task-file",
                _task_file(tmp_path),
                "--intervention",
                str(tmp_path / "abl"),
                "--split",
                "all",
                *TINY,
                "--json",
            ]
        )
        == 0
    )


def test_ablation_stacks_with_an_intervention(tiny, fitted):
    _, iv = fitted
    head = iv.selected_heads()[0]
    ablation = HeadAblation.zero(tiny, [head])
    with iv.apply(tiny), ablation.apply(tiny):
        _, cache = tiny.run_with_cache(IDS)
    assert torch.equal(cache[f"blocks.{head[0]}.attn.hook_z"][0, -1, head[1]], torch.zeros(tiny.cfg.d_head))
    both = evaluate(tiny, fitted[0], [iv, ablation])
    only = evaluate(tiny, fitted[0], iv)
    assert both.n == only.n


# the head table ----------------------------------------------------------------------------------
def test_table_has_one_row_per_head_and_tensor_scores(tiny, analysis, fitted):
    _, iv = fitted
    assert len(analysis.table) == tiny.cfg.n_layers * tiny.cfg.n_heads
    for name, tensor in analysis.scores.items():
        assert tensor.shape == (tiny.cfg.n_layers, tiny.cfg.n_heads), name
    assert torch.equal(analysis.scores["norm"], iv.head_norms())
    assert set(analysis.table.loc[analysis.table.selected].apply(lambda r: (r.layer, r["head"]), axis=1)) == set(
        iv.selected_heads()
    )
    necessity = analysis.scores["necessity_acc_drop"]
    unselected = [(l, h) for l in range(3) for h in range(4) if (l, h) not in iv.selected_heads()]
    assert all(np.isnan(float(necessity[l, h])) for l, h in unselected)
    assert set(analysis.costs.method) >= {"dla", "act_patch", "attr_patch", "ablation"}
    assert (analysis.costs.forward_equivalents > 0).all()


def test_activation_patching_matches_a_hand_patch(tiny, fitted):
    task, iv = fitted
    from lens_laai.analysis.head_table import _AnalysisData
    from lens_laai.analysis.patching import activation_patching
    from lens_laai.fastpath import CostMeter
    from lens_laai.tasks.prompts import PromptTemplate

    data = _AnalysisData.build(tiny, task, iv, PromptTemplate(), 6, 2, 6, 0, 32)
    clean, corrupt = data.patch_clean, data.patch_corrupt
    scores, _, corrupted = activation_patching(tiny, clean, corrupt, [2], CostMeter())
    _, cache = tiny.run_with_cache(clean.input_ids, attention_mask=clean.attention_mask)

    def patch(z, hook):
        z = z.clone()
        z[:, :, 1] = cache["blocks.2.attn.hook_z"][:, :, 1]
        return z

    logits = tiny.run_with_hooks(
        corrupt.input_ids, attention_mask=corrupt.attention_mask, fwd_hooks=[("blocks.2.attn.hook_z", patch)]
    )
    by_hand = torch.log_softmax(logits[:, -1], -1).gather(1, clean.target_ids[:, None]).mean()
    assert float(scores["act_patch"][2, 1]) == pytest.approx(float(by_hand) - corrupted, abs=1e-5)
    assert torch.isnan(scores["act_patch"][0]).all()
    per_prompt = torch.log_softmax(logits[:, -1], -1).gather(1, clean.target_ids[:, None])[:, 0]
    base = tiny(corrupt.input_ids, attention_mask=corrupt.attention_mask)
    base = torch.log_softmax(base[:, -1], -1).gather(1, clean.target_ids[:, None])[:, 0]
    effect = per_prompt - base  # TransformerLens' PatchingResult: per-prompt effects, their standard error
    assert float(scores["act_patch_se"][2, 1]) == pytest.approx(float(effect.std() / len(effect) ** 0.5), abs=1e-5)
    assert 0 < float(scores["act_patch_p"][2, 1]) <= 1


def test_attribution_patching_restores_the_frozen_model(tiny, analysis):
    assert not any(p.requires_grad for p in tiny.parameters())
    assert torch.isfinite(analysis.scores["attr_patch"]).all()
    agreement = analysis.settings["attribution_vs_activation"]
    assert -1 <= agreement["rho"] <= 1 and 0 <= agreement["sign_agreement"] <= 1


def test_dla_readout_is_the_models_own_unembedding(tiny):
    from lens_laai.analysis.logit_attribution import _readout
    from lens_laai.fastpath.kernels import unwrap

    resid = torch.randn(3, tiny.cfg.d_model)
    norm = unwrap(tiny.ln_final)
    scale = torch.rsqrt(resid.pow(2).mean(-1) + norm.variance_epsilon)
    ours = _readout(tiny, resid, norm.weight.float()) * scale[:, None]
    theirs = tiny.original_model.lm_head(norm(resid))
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_summaries_and_random_control(analysis):
    rho, p = spearman_permutation(np.arange(10.0), np.arange(10.0) ** 2)
    assert rho == pytest.approx(1.0) and p < 0.01
    assert np.isnan(spearman_permutation(np.zeros(5), np.arange(5.0))[0])
    table = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "selected": [True, False, True, False],
            "norm": [2.0, 0.0, 1.0, 0.0],
            "act_patch": [5.0, 4.0, 0.0, -1.0],
        }
    )
    row = selection_agreement(table).set_index("score").loc["act_patch"]
    assert row.precision_at_k == 0.5 and row.jaccard == pytest.approx(1 / 3) and row.k == 2
    assert row.selected_ranks == "L0H0:1, L1H0:3"
    assert row.p_precision == pytest.approx(5 / 6)  # P(a random pair of the 4 heads holds ≥ 1 selected head)
    control = analysis.random_control
    assert len(control) == 7 and control.set.iloc[0] == "selected" and 0 <= control.attrs["percentile"] <= 100
    assert set(analysis.logit_lens.direction) == {"promoted", "suppressed"}


# pictures and the report -------------------------------------------------------------------------
def test_pictures(tiny, analysis, fitted):
    from lens_laai import fit_path
    from lens_laai.analysis.views import (
        attention_views,
        generation_view,
        heatmaps,
        regularisation_path,
    )

    fig = heatmaps(analysis.scores)
    assert len([a for a in fig.axes if a.get_title()]) == len(analysis.scores)
    views = attention_views(tiny, fitted[1], "Q: hot\nA:")
    assert views and all(v.name == "AttentionHeads" and v.props["tokens"] for v in views)
    colored = generation_view(tiny, fitted[1], "Q: hot\nA:", max_new_tokens=3)
    assert len(colored.props["tokens"]) == len(colored.props["values"])
    for view in [*views, colored]:
        unknown = set(view.props) - component_props(view.name)
        assert not unknown, f"{view.name} has no props {unknown}: circuitsvis would ignore them"
    selected = [f"L{layer}H{head}" for layer, head in fitted[1].selected_heads()]
    assert views[0].props["attentionHeadNames"] == selected
    assert all(re.fullmatch(r"L\d+H\d+ with(out)? Δ", n) for v in views[1:] for n in v.props["attentionHeadNames"])
    splits = Task("t", list(TINY_PAIRS)).split(0, 8, 4)
    table, ivs = fit_path(tiny, splits, 1, [1.0, 0.1, 0.0], steps=2, progress=False)
    assert regularisation_path(table, ivs).axes


def component_props(name: str) -> set[str]:
    """The props a circuitsvis React component destructures, read from the TypeScript source in its bundle's map."""
    import circuitsvis

    source_map = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js.map"
    for source in json.loads(source_map.read_text())["sourcesContent"]:
        match = re.search(rf"export function {name}\(\{{([^}}]*)\}}", source or "")
        if match:
            return {re.split(r"[\s=:]", p.strip())[0] for p in match.group(1).split(",") if p.strip()}
    raise AssertionError(f"circuitsvis has no component {name}")


def _task_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps([{"input": a, "output": b} for a, b in TINY_PAIRS]))
    return str(path)


@pytest.fixture(scope="module")
def report(tmp_path_factory, fitted):
    folder = tmp_path_factory.mktemp("report")
    fitted[1].save(folder / "iv")
    args = [
        "--intervention",
        str(folder / "iv"),
        "--task-file",
        _task_file(folder),
        "--n-prompts",
        "6",
        "--shots",
        "2",
        "--patching-prompts",
        "4",
        "--n-random",
        "4",
        *TINY,
    ]
    assert main(["analyze", *args, "--out", str(folder / "heads.csv")]) == 0
    assert main(["report", *args, "--out", str(folder / "report.html"), "--json"]) == 0
    return folder


def test_analyze_and_report_commands(report, capsys):
    table = pd.read_csv(report / "heads.csv")
    assert len(table) == 12 and {"norm", "dla", "act_patch", "attr_patch", "zero_acc_drop"} <= set(table.columns)
    html = (report / "report.html").read_text()
    assert html.count("var CircuitsVis=") == 1, "the circuitsvis bundle is inlined exactly once"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "no remote reference"
    assert "unpkg" not in html and "cdn." not in html
    assert (
        main(
            [
                "analyze",
                "--intervention",
                str(report / "iv"),
                "--task-file",
                str(report / "tiny.json"),
                "--out",
                str(report / "heads.csv"),
                *TINY,
            ]
        )
        == 2
    )
    assert "exists" in capsys.readouterr().err


def test_report_renders_offline_in_a_real_browser(report, tmp_path):
    url, log = (report / "report.html").as_uri(), tmp_path / "net.json"
    dom, requests = render_offline(url, log, tmp_path / "shot.png", window="1200,1600", budget_ms=10000, timeout=120)
    views = re.findall(r'<div id="cv-\d+" class="cv">(.{0,40})', dom)
    assert views and all(v.startswith("<") for v in views), "every circuitsvis view rendered content"
    assert re.search(r">L1H\d+<", dom) and not re.search(r">Head \d+<", dom), "heads labelled L<layer>H<head>"
    assert (tmp_path / "shot.png").stat().st_size > 10_000
    assert requests == [], "the page fetched something from the network"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_prompts": 0}, "n_prompts"),
        ({"patching_prompts": -3}, "patching_prompts"),
        ({"n_random": -1}, "n_random"),
        ({"shots": 1}, "shots"),
    ],
)
def test_bad_analysis_settings_are_refused(tiny, fitted, kwargs, message):
    from lens_laai import TaskError

    with pytest.raises(TaskError, match=message):
        head_table(tiny, fitted[0], fitted[1], progress=False, **kwargs)
