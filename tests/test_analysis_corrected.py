"""The head analysis, corrected: each test here failed on the analysis as it was before issue 19.

1. A head's write to the residual stream is what its block adds (Gemma's post-attention norm included).
2. Summaries never rank structural zeros (the DLA of Δ is zero on every unselected head).
3. Reference prompts carry their real targets; methods that never read k-shot prompts never build them.
4. The random-head control draws from the unselected heads, and says so when it cannot.
5. Attribution is compared with activation patching on the same prompts.
"""

import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from lens_laai import HeadIntervention, Task
from lens_laai.analysis import logit_attribution as fx
from lens_laai.analysis.head_table import _AnalysisData, agreement, head_table
from lens_laai.analysis.patching import attribution_patching
from lens_laai.analysis.summary import selection_agreement
from lens_laai.baselines.function_vectors import head_outputs
from lens_laai.fastpath.runner import CostMeter
from lens_laai.tasks.prompts import PromptTemplate, model_batches
from lens_laai.testing import TINY_ARCHITECTURES, TINY_PAIRS, tiny_model, tiny_model_for

IDS = torch.tensor([[1, 20, 21, 22, 23], [1, 24, 25, 26, 27]])
LAYER = 1


def _resid_after_attention(model) -> str:
    """``hook_resid_mid`` where the block has one; a parallel block (GPT-NeoX) adds attention straight to resid_post."""
    name = f"blocks.{LAYER}.hook_resid_mid"
    return name if name in model.hook_dict else f"blocks.{LAYER}.hook_resid_post"


def _delta(model, heads=(0, 2), scale=3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    delta = torch.zeros(model.cfg.n_heads, model.cfg.d_head)
    for h in heads:
        delta[h] = scale * torch.randn(model.cfg.d_head, generator=generator)
    return delta


def _measured_write(model, iv_on, iv_off, ids=IDS, mask=None) -> torch.Tensor:
    """The change in the residual stream right after layer ``LAYER``'s attention, last token, measured."""
    name = _resid_after_attention(model)
    caches = []
    for iv in (iv_on, iv_off):
        with iv.apply(model):
            _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n == name)
        caches.append(cache[name][:, -1].float())
    return caches[0] - caches[1]


# 1. what a head writes ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_residual_image_is_the_change_the_block_adds(arch):
    model = tiny_model_for(arch)
    iv = HeadIntervention.from_deltas(model, {LAYER: _delta(model)})
    zero = HeadIntervention.zeros(model, LAYER)
    change = _measured_write(model, iv, zero)
    _, base = model.run_with_cache(IDS)
    z = base[f"blocks.{LAYER}.attn.hook_z"][:, -1]
    image = iv.residual_image(model, z={LAYER: z})[LAYER]
    assert image.shape == change.shape
    assert torch.allclose(image.float(), change, atol=1e-4 * float(change.norm())), (
        f"{arch}: residual_image is off by {float((image - change).norm() / change.norm()):.0%} of the real write"
    )


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_dla_reads_the_real_head_write(arch):
    """DLA of Δ_h = the real change in block L's residual output from Δ_h, read through the final norm and W_U."""
    model = tiny_model_for(arch)
    task = Task("tiny", list(TINY_PAIRS))
    template = PromptTemplate()
    batches = model_batches(
        model, [template.render(x) for x, _ in task.pairs[:6]], [template.target(y) for _, y in task.pairs[:6]]
    )
    delta = _delta(model)
    iv = HeadIntervention.from_deltas(model, {LAYER: delta})
    dla = fx.direct_logit_attribution(model, iv, batches, CostMeter())
    weight, inv_scale = fx.final_norm_readout(model, iv, batches, CostMeter())
    targets = torch.cat([b.target_ids for b in batches])
    batch = batches[0]
    for head in (0, 2):
        without = delta.clone()
        without[head] = 0
        write = _measured_write(
            model, iv, HeadIntervention.from_deltas(model, {LAYER: without}), batch.input_ids, batch.attention_mask
        )
        logits = fx._readout(model, write, weight) * inv_scale[:, None]
        relative = logits - logits.mean(-1, keepdim=True)
        expected = float(relative.gather(1, targets[:, None])[:, 0].mean())
        assert float(dla[LAYER, head]) == pytest.approx(expected, rel=1e-3, abs=1e-4), arch
    assert float(dla[LAYER, 1]) == 0.0


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_function_vector_head_outputs_are_what_each_head_adds(arch):
    """head_outputs(z)[h] = what removing head h's z takes out of the residual stream (the FV baseline's head output)."""
    model = tiny_model_for(arch)
    _, base = model.run_with_cache(IDS)
    z = base[f"blocks.{LAYER}.attn.hook_z"]
    per_head = head_outputs(model, LAYER, z)
    name = _resid_after_attention(model)
    for head in (0, 3):

        def knock_out(value, hook, h=head):
            value = value.clone()
            value[:, :, h] = 0
            return value

        _, cache = model.run_with_cache(IDS, names_filter=lambda n: n == name)
        with model.hooks(fwd_hooks=[(f"blocks.{LAYER}.attn.hook_z", knock_out)]):
            _, knocked = model.run_with_cache(IDS, names_filter=lambda n: n == name)
        removed = (cache[name] - knocked[name]).float()
        assert torch.allclose(per_head[:, :, head].float(), removed, atol=1e-4 * float(removed.norm())), arch


# 2. structural zeros ---------------------------------------------------------------------------
def _zeros_table(sign: float) -> pd.DataFrame:
    norms = [3.0, 1.0] + [0.0] * 7
    dla = [sign * -0.26, sign * -0.06] + [0.0] * 7
    return pd.DataFrame(
        {
            "layer": [0] * 9,
            "head": list(range(9)),
            "selected": [n > 0 for n in norms],
            "norm": norms,
            "dla": dla,
            "act_patch": np.linspace(1, 0, 9),
        }
    )


def test_summaries_never_rank_structural_zeros():
    """ρ(‖Δ_h‖, DLA) over 2 selected heads is undefined, whatever the sign of DLA; the zeros do not make it −0.97."""
    rows = [selection_agreement(_zeros_table(sign)).set_index("score").loc["dla"] for sign in (1.0, -1.0)]
    for row in rows:
        rhos = {k: v for k, v in row.items() if str(k).startswith("rho")}
        assert rhos and all(math.isnan(v) for v in rhos.values()), f"ρ over structural zeros: {rhos}"
        assert math.isnan(row["precision_at_k"]), "DLA of Δ is zero off the selected heads: its top-k is not a ranking"


# 3. reference prompts ----------------------------------------------------------------------------
def _iv_and_splits(model, heads=(0, 2)):
    splits = Task("tiny", list(TINY_PAIRS)).split(0, 8, 4)
    return HeadIntervention.from_deltas(model, {LAYER: _delta(model, heads, 0.5)}), splits


def test_reference_prompts_carry_their_real_targets():
    model = tiny_model()
    iv, splits = _iv_and_splits(model)
    data = _AnalysisData.build(model, splits, iv, PromptTemplate(), 6, 3, 4, 0, 32)
    truth = {PromptTemplate().target(y) for _, y in splits.train.pairs}
    targets = [t for batch in data.reference for t in batch.targets]
    assert len(targets) == len(splits.train) and set(targets) <= truth, targets[:2]


def test_context_counts_each_prompt_once_and_only_when_read():
    model = tiny_model()
    iv, splits = _iv_and_splits(model)
    saved = model.cfg.n_ctx
    try:
        model.cfg.n_ctx = 60  # a 3-shot prompt is about 30 tokens: over half the context, but it fits
        head_table(model, splits, iv, methods=("ablation",), n_prompts=4, shots=3, layers=[1], progress=False)
        model.cfg.n_ctx = 20  # k-shot prompts do not fit; zero-shot ones do
        analysis = head_table(
            model, splits, iv, methods=("dla", "necessity", "logit_lens"), n_prompts=4, shots=3, progress=False
        )
        assert torch.isfinite(analysis.scores["dla"]).all()
    finally:
        model.cfg.n_ctx = saved


# 4. the random-head control ----------------------------------------------------------------------
def test_random_sets_come_from_the_unselected_heads():
    model = tiny_model()
    iv, splits = _iv_and_splits(model, heads=(0, 2))
    control = head_table(
        model, splits, iv, methods=("random_control",), layers=[1], n_prompts=4, shots=2, n_random=6, progress=False
    ).random_control
    selected = {"L1H0", "L1H2"}
    randoms = control[control.set != "selected"]
    assert len(randoms) > 0 and all(not (set(h.split(",")) & selected) for h in randoms.heads)


def test_random_control_says_why_when_it_cannot_draw():
    model = tiny_model()
    iv, splits = _iv_and_splits(model, heads=(0, 1, 2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        control = head_table(
            model, splits, iv, methods=("random_control",), layers=[1], n_prompts=4, shots=2, n_random=6, progress=False
        ).random_control
    assert math.isnan(control.attrs["percentile"])
    assert any("unselected" in str(w.message) for w in caught), [str(w.message) for w in caught]


# 5. agreement on the same prompts ----------------------------------------------------------------
def test_attribution_agreement_uses_the_activation_patching_prompts():
    model = tiny_model()
    iv, splits = _iv_and_splits(model)
    analysis = head_table(
        model,
        splits,
        iv,
        methods=("act_patch", "attr_patch"),
        n_prompts=8,
        shots=2,
        patching_prompts=3,
        progress=False,
    )
    data = _AnalysisData.build(model, splits, iv, PromptTemplate(), 8, 2, 3, 0, 32)
    n = int(data.patch_clean.input_ids.shape[0])
    assert n == 3 and len(data.pairs) > n
    same = attribution_patching(model, data.pairs[:n], CostMeter())
    expected = agreement(analysis.scores["act_patch"], same)
    got = analysis.settings["attribution_vs_activation"]
    assert got["rho"] == pytest.approx(expected["rho"]) and got["sign_agreement"] == pytest.approx(
        expected["sign_agreement"]
    )


# 6. per-cell statistics from TransformerLens; intervals on ablation drops -------------------------
def test_patching_and_ablation_carry_their_uncertainty():
    model = tiny_model()
    iv, splits = _iv_and_splits(model)
    analysis = head_table(
        model,
        splits,
        iv,
        methods=("act_patch", "ablation", "random_control"),
        layers=[1, 2],
        n_prompts=6,
        shots=2,
        patching_prompts=4,
        n_random=4,
        progress=False,
    )
    for column in ("act_patch_se", "act_patch_p", "mean_logprob_drop_se", "zero_logprob_drop_se"):
        values = analysis.table[column]
        assert values.notna().all() and (values >= 0).all(), column
    control = analysis.random_control
    assert (control.logprob_drop_low <= control.logprob_drop).all()
    assert (control.logprob_drop <= control.logprob_drop_high).all()
    attrs = control.attrs
    assert attrs["percentile_low"] <= attrs["percentile"] <= attrs["percentile_high"]


# 7. the report opens with the answer ------------------------------------------------------------
def test_report_opens_with_the_answer_and_reads_like_prose():
    from lens_laai.analysis.report import analysis_sections, render_page

    model = tiny_model()
    iv, splits = _iv_and_splits(model)
    stability = pd.DataFrame(
        [(l, h, 0.9 if (l, h) in iv.selected_heads() else 0.1) for l in range(3) for h in range(4)],
        columns=["layer", "head", "selection_probability"],
    )
    analysis = head_table(
        model, splits, iv, n_prompts=6, shots=2, patching_prompts=3, n_random=4, stability=stability, progress=False
    )
    assert np.allclose(analysis.table.loc[analysis.table.selected, "selection_probability"], 0.9)
    extra = {"intervention": "runs/x", "prompt": "Q: hot\nA:"}
    page = render_page("t", analysis_sections(analysis, {}, extra), views=[])
    answer_at, table_at = page.find("Selected: 2 of the 12 scored heads"), page.find("<table")
    assert 0 < answer_at < table_at, "the answer comes before any table"
    opening = page[answer_at:table_at]
    for words in ("Selection probability", "Necessary?", "Sufficient?", "Activation patching ranks L1H0 #"):
        assert words in opening, words
    settings = page[page.find("<h2>Settings</h2>") :]
    settings = settings[: settings.find("</table>")]
    assert "{" not in settings and "\\n" not in settings, settings
    assert not re.search(r"\d\.\d{7,}", settings), "no 16-digit floats"


def test_stability_as_a_tensor_and_bad_stability():
    from lens_laai import TaskError

    model = tiny_model()
    iv, splits = _iv_and_splits(model)
    probs = torch.rand(3, 4)
    analysis = head_table(model, splits, iv, methods=("dla",), n_prompts=4, shots=2, stability=probs, progress=False)
    assert np.allclose(analysis.table.selection_probability, probs.flatten().numpy())
    with pytest.raises(TaskError, match="n_layers, n_heads"):
        head_table(model, splits, iv, methods=("dla",), n_prompts=4, shots=2, stability=probs[:2], progress=False)
    wrong = pd.DataFrame({"layer": [7], "head": [0], "selection_probability": [0.5]})
    with pytest.raises(TaskError, match="outside this model"):
        head_table(model, splits, iv, methods=("dla",), n_prompts=4, shots=2, stability=wrong, progress=False)


def test_cli_reads_stability_and_prints_the_answer_first(tmp_path, capsys):
    import json

    from lens_laai.cli.main import main

    model = tiny_model()
    iv, _ = _iv_and_splits(model)
    iv.save(tmp_path / "iv")
    task = tmp_path / "tiny.json"
    task.write_text(json.dumps([{"input": a, "output": b} for a, b in TINY_PAIRS]))
    stability = tmp_path / "stability.csv"
    pd.DataFrame({"layer": [1, 1], "head": [0, 2], "selection_probability": [0.8, 0.6]}).to_csv(stability, index=False)
    common = ["--intervention", str(tmp_path / "iv"), "--task-file", str(task), "--model", "lens-laai-tiny"]
    common += [
        "--no-progress",
        "--n-prompts",
        "4",
        "--shots",
        "2",
        "--methods",
        "dla,random_control",
        "--n-random",
        "3",
    ]
    assert main(["analyze", *common, "--stability", str(stability), "--out", str(tmp_path / "h.csv")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Selected: 2 of the 12 scored heads: L1H0, L1H2. Selection probability over subsamples")
    assert pd.read_csv(tmp_path / "h.csv").selection_probability.notna().sum() == 2
    (tmp_path / "bad.csv").write_text("layer,head\n1,0\n")
    assert main(["analyze", *common, "--stability", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "g.csv")]) == 2
    assert "selection_probability" in capsys.readouterr().err


def test_dla_warns_when_the_write_is_not_what_the_block_adds(monkeypatch):
    """The run-time check: a head-write path that misses Gemma's post-attention norm is caught."""
    import lens_laai.models.head_write as hw

    model = tiny_model_for("gemma2")
    template = PromptTemplate()
    batches = model_batches(model, [template.render(x) for x, _ in TINY_PAIRS[:3]], [" a"] * 3)
    iv = HeadIntervention.from_deltas(model, {LAYER: _delta(model)})
    monkeypatch.setattr(hw, "post_attention_norm", lambda model, layer: None)
    with pytest.warns(RuntimeWarning, match="adds something other than"):
        fx.direct_logit_attribution(model, iv, batches, CostMeter())
