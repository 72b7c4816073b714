"""Pictures of an analysis: layer × head heatmaps, the regularisation path, and circuitsvis views.

Matplotlib figures are returned (show them in a notebook, or :func:`figure_png` for the report).
circuitsvis views are returned as :class:`View` objects: ``name`` (the circuitsvis element) and
``props`` (its JSON-ready arguments). The props reach the React component unchanged, so they carry the
component's own names (``attentionHeadNames``, not the Python wrapper's ``attention_head_names``). In a
notebook ``view.html()`` renders with circuitsvis' own bundle; :mod:`lens_laai.analysis.report` inlines
that bundle once for a whole page of views.

Example:
    >>> import torch
    >>> from lens_laai.analysis.views import heatmaps
    >>> fig = heatmaps({"norm": torch.rand(3, 4), "dla": torch.randn(3, 4)})
    >>> len(fig.axes)
    4
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.interventions.head import HeadIntervention
from lens_laai.tasks.prompts import encode_prompts

LABELS = {
    "norm": "‖Δ_h‖",
    "dla": "DLA of Δ_h",
    "act_patch": "activation patching",
    "attr_patch": "attribution patching",
    "fv_cie": "FV causal indirect effect",
    "zero_acc_drop": "zero-ablation acc. drop",
    "zero_logprob_drop": "zero-ablation log-p drop",
    "mean_acc_drop": "mean-ablation acc. drop",
    "mean_logprob_drop": "mean-ablation log-p drop",
    "necessity_acc_drop": "remove Δ_h: acc. drop",
    "necessity_logprob_drop": "remove Δ_h: log-p drop",
    "selection_probability": "selection probability",
    "act_patch_se": "activation patching: s.e.",
    "act_patch_p": "activation patching: sign-flip p",
    "zero_logprob_drop_se": "zero-ablation log-p drop: s.e.",
    "mean_logprob_drop_se": "mean-ablation log-p drop: s.e.",
}


def heatmaps(scores: dict[str, Tensor], columns: Sequence[str] | None = None, per_row: int = 4):
    """Side-by-side layer × head heatmaps, one colour scale per score (diverging around 0 when signed).

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import torch
        >>> from lens_laai.analysis.views import heatmaps
        >>> fig = heatmaps({"norm": torch.rand(3, 4), "dla": torch.randn(3, 4)})
        >>> len(fig.axes) >= 2
        True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [c for c in (columns or list(scores)) if c in scores]
    cols = min(per_row, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        data = scores[name].float().numpy()
        finite = data[np.isfinite(data)]
        signed = finite.size and finite.min() < 0 < finite.max()
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        image = ax.imshow(
            np.ma.masked_invalid(data),
            aspect="auto",
            cmap="RdBu_r" if signed else "viridis",
            vmin=-bound if signed else None,
            vmax=bound if signed else None,
            interpolation="nearest",
        )
        ax.set_title(LABELS.get(name, name), fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(names) :]:
        ax.remove()
    fig.tight_layout()
    return fig


def regularisation_path(
    path: pd.DataFrame, interventions: Sequence[HeadIntervention], label: str = "validation accuracy"
):
    """Each head's ‖Δ_h‖ against λ₂ (log scale, as glmnet draws it), with validation accuracy on a twin axis.

    ``path`` and ``interventions`` are what :func:`lens_laai.fit_path` returns.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from lens_laai import fit_path
        >>> from lens_laai.analysis.views import regularisation_path
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model = tiny_model()
        >>> path, ivs = fit_path(model, tiny_task().split(seed=0, n_train=8), 1, [0.5, 0.05], relative=True, steps=2, progress=False)
        >>> fig = regularisation_path(path, ivs, label="training accuracy")
        >>> type(fig).__name__
        'Figure'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lambdas = path.group_l1.to_numpy()
    layer = interventions[0].layers[0]
    norms = torch.stack([iv.deltas[layer].norm(dim=-1) for iv in interventions]).numpy()
    x = np.where(lambdas > 0, lambdas, np.min(lambdas[lambdas > 0]) / 10 if (lambdas > 0).any() else 1e-3)
    fig, ax = plt.subplots(figsize=(7, 4))
    for head in range(norms.shape[1]):
        ax.plot(x, norms[:, head], marker=".", label=f"L{layer}H{head}")
    ax.set_xscale("log")
    ax.set_xlabel("λ₂ (group penalty)")
    ax.set_ylabel("‖Δ_h‖")
    twin = ax.twinx()
    twin.plot(x, path.valid_accuracy, "k--", label=label)
    twin.set_ylabel(label)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    return fig


def figure_png(fig: Any) -> str:
    """A figure as a base64 PNG data URI (no file, no network).

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from lens_laai.analysis.views import figure_png
        >>> fig, ax = plt.subplots()
        >>> figure_png(fig).startswith("data:image/png;base64,")
        True
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class View:
    """One circuitsvis element with its properties.

    Example:
        >>> from lens_laai.analysis.views import View
        >>> view = View("ColoredTokens", {"tokens": ["a", "b"], "values": [0.5, -1.0]}, title="demo")
        >>> html = view.html()  # the circuitsvis bundle inline: renders offline
        >>> "CircuitsVis.render" in html and "unpkg" not in html
        True
    """

    name: str
    props: dict[str, Any]
    title: str = ""

    def html(self) -> str:
        """Render with circuitsvis (its bundle inline: works offline, once per view)."""
        from circuitsvis.utils.render import render_local

        return render_local(self.name, **self.props)

    def _repr_html_(self) -> str:
        return self.html()


def _tokens(model: TransformerBridge, prompt: str) -> tuple[Tensor, list[str]]:
    ids, _ = encode_prompts(model.tokenizer, [prompt], True, model.cfg.n_ctx)
    return ids, [model.tokenizer.decode([int(t)]) for t in ids[0]]


@torch.no_grad()
def attention_views(model: TransformerBridge, iv: HeadIntervention, prompt: str, top: int = 4) -> list[View]:
    """The selected heads' attention patterns, and those of the later heads whose last-token pattern Δ changes most.

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> from lens_laai import fit
        >>> iv = fit(model, task, layer=1, n_train=8, steps=3, group_l1_rel=0.05, progress=False).intervention
        >>> from lens_laai.analysis.views import attention_views
        >>> views = attention_views(model, iv, "Q: hot\\nA:")  # each renders itself in Jupyter
        >>> {v.name for v in views}
        {'AttentionHeads'}
        >>> views[0].props["attentionHeadNames"][0][:2]  # heads labelled L<layer>H<head> on the page
        'L1'
    """
    ids, tokens = _tokens(model, prompt)
    names = lambda n: n.endswith("attn.hook_pattern")
    _, base = model.run_with_cache(ids, names_filter=names)
    with iv.apply(model):
        _, moved = model.run_with_cache(ids, names_filter=names)
    views = []
    selected = iv.selected_heads()
    for layer in sorted({l for l, _ in selected}):
        heads = [h for l, h in selected if l == layer]
        views.append(
            View(
                "AttentionHeads",
                {
                    "attention": base[f"blocks.{layer}.attn.hook_pattern"][0, heads].tolist(),
                    "tokens": tokens,
                    "attentionHeadNames": [f"L{layer}H{h}" for h in heads],
                },
                f"Selected heads at layer {layer}",
            )
        )
    first = min(iv.layers) + 1
    change = [
        (
            float(
                (moved[f"blocks.{l}.attn.hook_pattern"][0, h, -1] - base[f"blocks.{l}.attn.hook_pattern"][0, h, -1])
                .abs()
                .sum()
            ),
            l,
            h,
        )
        for l in range(first, model.cfg.n_layers)
        for h in range(model.cfg.n_heads)
    ]
    for _, layer, head in sorted(change, reverse=True)[:top]:
        pair = [
            base[f"blocks.{layer}.attn.hook_pattern"][0, head].tolist(),
            moved[f"blocks.{layer}.attn.hook_pattern"][0, head].tolist(),
        ]
        views.append(
            View(
                "AttentionHeads",
                {
                    "attention": pair,
                    "tokens": tokens,
                    "attentionHeadNames": [f"L{layer}H{head} without Δ", f"L{layer}H{head} with Δ"],
                },
                f"L{layer}H{head}: attention before and after Δ",
            )
        )
    return views


@torch.no_grad()
def generation_view(model: TransformerBridge, iv: HeadIntervention, prompt: str, max_new_tokens: int = 8) -> View:
    """An intervened greedy generation, each token coloured by log p_Δ − log p_0 (teacher-forced on that text).

    Example:
        >>> from lens_laai.testing import tiny_model, tiny_task
        >>> model, task = tiny_model(), tiny_task()
        >>> from lens_laai import fit
        >>> iv = fit(model, task, layer=1, n_train=8, steps=3, group_l1_rel=0.05, progress=False).intervention
        >>> from lens_laai.analysis.views import generation_view
        >>> view = generation_view(model, iv, "Q: hot\\nA:", max_new_tokens=2)
        >>> view.name, len(view.props["tokens"]) == len(view.props["values"])
        ('ColoredTokens', True)
    """
    from lens_laai.evaluation.generation import generate

    continuation = generate(model, prompt, iv, max_new_tokens=max_new_tokens)
    ids, tokens = _tokens(model, prompt + continuation)
    prompt_len = _tokens(model, prompt)[0].shape[1]
    plain = torch.log_softmax(model(ids)[0].float(), -1)
    positions = tuple([prompt_len - 1])
    intervened = torch.log_softmax(model.run_with_hooks(ids, fwd_hooks=[*iv.fwd_hooks(positions)])[0].float(), -1)
    next_ids = ids[0, 1:]
    gain = (intervened[:-1].gather(1, next_ids[:, None]) - plain[:-1].gather(1, next_ids[:, None]))[:, 0]
    values = [0.0] + gain.tolist()
    return View(
        "ColoredTokens",
        {"tokens": tokens, "values": values},
        "Generation with Δ: colour = log p_Δ − log p_0 of each token",
    )
