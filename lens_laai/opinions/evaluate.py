"""Score answer distributions on held-out survey questions: an intervention, or a prompting baseline.

Methods, all on the same held-out questions and read the same way (the option letters at the
last token, :mod:`lens_laai.opinions.prompts`):

* ``"plain"``: the question alone;
* ``"persona"``: ``Answer the following question as if {persona}.`` first (OpinionQA's steer-portray);
* ``"few_shot"``: the training questions the group answered, each followed by the group's majority
  answer, before the query;
* an intervention: Δ added at the last token of the plain prompt.

:func:`evaluate_opinion` reproduces a fitted intervention's held-out questions from its record and
refuses another survey file, another group, a disagreeing seed, or explicit questions it was fitted
on. :func:`compare_methods` scores several methods side by side; :func:`plot_distributions` draws them.

Example:
    >>> from lens_laai.opinions.evaluate import compare_methods
    >>> from lens_laai.opinions.survey import toy_survey
    >>> from lens_laai.testing import tiny_model
    >>> survey = toy_survey()
    >>> result = compare_methods(tiny_model(), survey, "AGE=Old", survey.split(0, 3, 1))
    >>> result.summary()[["method", "n_questions"]].values.tolist()
    [['plain', 4], ['persona', 4], ['few_shot', 4]]
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import InterventionError, TaskError
from lens_laai.interventions.protocol import Intervention
from lens_laai.models.bridge import last_position_hooks
from lens_laai.opinions.fit import group_questions
from lens_laai.opinions.metrics import mean_metrics, question_metrics
from lens_laai.opinions.prompts import (
    OpinionPrompt,
    answer_distribution,
    letter_tokens,
    option_log_probs,
    question_batches,
)
from lens_laai.opinions.survey import Group, Survey, SurveySplits

METHODS = ("plain", "persona", "few_shot")


@dataclass
class OpinionEval:
    """One row per (method, held-out question): target and model distributions and their distances.

    Example:
        >>> from lens_laai import compare_methods
        >>> from lens_laai.opinions.survey import toy_survey
        >>> from lens_laai.testing import tiny_model
        >>> survey = toy_survey()
        >>> result = compare_methods(tiny_model(), survey, "PARTY=Red", survey.split(0, 3, 1), methods=["plain"])
        >>> type(result).__name__, {"kl", "tv", "representativeness"} <= set(result.summary().columns)
        ('OpinionEval', True)
    """

    table: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Per method: questions, mean KL, mean TV, representativeness, mean refusal shares."""
        return mean_metrics(self.table)

    def scores(self, method: str | None = None) -> dict[str, float]:
        """``{"kl", "tv", "representativeness", "n_questions", ...}`` of one method (the only one if ``None``)."""
        summary = self.summary().set_index("method")
        if method is None:
            if len(summary) != 1:
                raise ValueError(f"several methods ({list(summary.index)}); name one.")
            method = summary.index[0]
        return {k: (int(v) if k == "n_questions" else float(v)) for k, v in summary.loc[method].items()}


def held_out_split(
    survey: Survey,
    group: Group,
    intervention: Intervention | None = None,
    *,
    splits: SurveySplits | None = None,
    seed: int | None = None,
    n_train: int | None = None,
    n_valid: int | None = None,
) -> SurveySplits:
    """The split to score on: the intervention's recorded one (checked), else ``splits``, else a fresh seeded split.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> from lens_laai import fit_opinion
        >>> from lens_laai.opinions.evaluate import held_out_split
        >>> from lens_laai.testing import tiny_model
        >>> cut = held_out_split(survey, red, seed=1, n_train=4, n_valid=2)  # no intervention: a fresh split
        >>> len(cut.train), len(cut.valid), len(cut.test)
        (4, 2, 2)
        >>> iv = fit_opinion(tiny_model(), survey, "PARTY=Red", 1, splits=cut, steps=2, progress=False).intervention
        >>> held_out_split(survey, red, iv).test == cut.test  # read back from the intervention's record
        True
    """
    record = (intervention.metadata.get("survey") if intervention is not None else None) or None
    if record is None:
        if intervention is not None and splits is None and seed is None:
            raise InterventionError(
                "This intervention carries no survey record (not fitted by fit_opinion, or combined "
                "by algebra), so its held-out questions are unknown; pass splits= explicitly."
            )
        return splits or survey.split(
            0 if seed is None else seed, 8 if n_train is None else n_train, 4 if n_valid is None else n_valid
        )
    if (record.get("name"), record.get("hash")) != (survey.name, survey.data_hash()):
        raise TaskError(
            f"Cannot reproduce the held-out questions: the intervention was fitted on survey "
            f"{record.get('name')!r} (hash {record.get('hash')}), and this is {survey.name!r} (hash "
            f"{survey.data_hash()}). Pass the same survey file."
        )
    if record.get("group", "").casefold() != group.name.casefold():
        raise TaskError(
            f"The intervention was fitted for group {record.get('group')!r}, not {group.name!r}; "
            "evaluate it with the group it was fitted for."
        )
    recorded = SurveySplits(tuple(record["train"]), tuple(record["valid"]), tuple(record["test"]), int(record["seed"]))
    asked = {k: v for k, v in (("seed", seed), ("n_train", n_train), ("n_valid", n_valid)) if v is not None}
    wrong = [f"{k}={v} (fitted with {record.get(k)})" for k, v in asked.items() if record.get(k) != v]
    if wrong:
        raise TaskError(
            f"{', '.join(wrong)}: these disagree with the intervention's own split and would score "
            "questions it was fitted on. Leave them out (the split is read from the intervention)."
        )
    if splits is not None:
        seen = set(recorded.train) | set(recorded.valid)
        leaked = [k for k in splits.test if k in seen]
        if leaked:
            raise TaskError(
                f"{len(leaked)} of the test questions ({leaked[:3]}) were used to fit this intervention "
                "(training or validation); scoring them would overstate it."
            )
        return splits
    missing = [k for k in recorded.test if k not in survey.questions]
    if missing:
        raise TaskError(
            f"The survey lacks the recorded test questions {missing[:3]}; pass the survey it was fitted on."
        )
    return recorded


def few_shot_demos(
    survey: Survey, group: Group, keys: Sequence[str], shots: int | None, seed: int
) -> list[tuple[Any, int]]:
    """(question, majority option) for ``shots`` (default all) of ``keys`` the group answered, in seeded order.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> from lens_laai.opinions.evaluate import few_shot_demos
        >>> demos = few_shot_demos(survey, red, ["Q0", "Q1", "Q2"], shots=2, seed=0)
        >>> [(q.key, q.options[i]) for q, i in demos]  # each with the group's majority answer
        [('Q0', 'More'), ('Q2', 'Less')]
        >>> len(demos), all(i == int(red.answers[q.key].distribution.argmax()) for q, i in demos)
        (2, True)
    """
    qs = group_questions(survey, group, keys)
    random.Random(seed).shuffle(qs)
    if shots is not None:
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0 or shots > len(qs):
            raise TaskError(
                f"shots must be an integer 0..{len(qs)} (the training questions the group answered), got {shots!r}."
            )
        qs = qs[:shots]
    return [(q, int(np.argmax(group.answers[q.key].distribution))) for q in qs]


def distributions(
    model: TransformerBridge,
    survey: Survey,
    group: Group,
    keys: Sequence[str],
    method: str = "plain",
    intervention: Intervention | None = None,
    *,
    demos: Sequence[tuple[Any, int]] = (),
    prompt: OpinionPrompt | None = None,
    batch_size: int = 16,
) -> pd.DataFrame:
    """One row per question of ``keys`` the group answered: target, model distribution, distances, refusal shares.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> from lens_laai.opinions.evaluate import distributions
        >>> from lens_laai.testing import tiny_model
        >>> table = distributions(tiny_model(), survey, red, ["Q0", "Q1"], method="persona")
        >>> table.key.tolist(), [len(m) for m in table.model], [round(sum(m), 3) for m in table.model]
        (['Q0', 'Q1'], [3, 2], [1.0, 1.0])
        >>> {"target", "kl", "tv", "w1", "refusal_model", "refusal_target"} <= set(table.columns)
        True
    """
    if method not in METHODS:
        raise TaskError(f"method must be one of {METHODS}, got {method!r}.")
    prompt = prompt or OpinionPrompt()
    qs = group_questions(survey, group, keys)
    if not qs:
        raise TaskError(f"Group {group.name!r} answered none of the {len(keys)} questions to score.")
    persona = group.persona if method == "persona" else None
    texts = [prompt.render(q, demos if method == "few_shot" else (), persona) for q in qs]
    batches = question_batches(model, qs, texts, None, batch_size, prompt.prepend_bos)
    letters = letter_tokens(model.tokenizer, max(len(q.all_options) for q in qs), prompt.answer_prefix)
    hooks = intervention.fwd_hooks() if intervention is not None else []
    rows, i = [], 0
    for qb in batches:
        with torch.no_grad():
            logits = model.run_with_hooks(
                qb.batch.input_ids,
                attention_mask=qb.batch.attention_mask,
                fwd_hooks=[*hooks, *last_position_hooks(model)],
            )[:, -1]
            log_dm, refusal = answer_distribution(option_log_probs(logits, letters), qb)
        for j in range(len(qb)):
            q = qs[i]
            i += 1
            target, answers = group.answers[q.key].distribution, group.answers[q.key]
            model_dist = log_dm[j, : len(q.options)].exp().double().cpu().numpy()
            rows.append(
                {
                    "key": q.key,
                    "question": q.text,
                    "n_respondents": answers.n,
                    "target": target.round(6).tolist(),
                    "model": model_dist.round(6).tolist(),
                    **question_metrics(target, model_dist, q.ordinal),
                    "refusal_target": answers.refusal_share,
                    "refusal_model": float(refusal[j]),
                }
            )
    return pd.DataFrame(rows)


def check_prompt_lengths(
    model: TransformerBridge,
    survey: Survey,
    group: str,
    splits: SurveySplits,
    methods: Sequence[str] = METHODS,
    *,
    shots: int | None = None,
    prompt: OpinionPrompt | None = None,
) -> None:
    """Raise :class:`~lens_laai.errors.ModelError` now if a prompt to be scored exceeds the model's context.

    Example:
        >>> from lens_laai.opinions.evaluate import check_prompt_lengths
        >>> from lens_laai.opinions.prompts import OpinionPrompt
        >>> from lens_laai.opinions.survey import toy_survey
        >>> from lens_laai.testing import tiny_model
        >>> model, survey = tiny_model(), toy_survey()
        >>> check_prompt_lengths(model, survey, "PARTY=Red", survey.split(0, 3, 1))  # every prompt fits: no error
        >>> wordy = OpinionPrompt(query="hot " * 600 + "{question}\\n{options}\\nAnswer:")
        >>> check_prompt_lengths(model, survey, "PARTY=Red", survey.split(0, 3, 1), prompt=wordy)
        Traceback (most recent call last):
        ...
        lens_laai.errors.ModelError: A prompt is ... tokens long, but the model's context holds 512 ...
    """
    from lens_laai.tasks.prompts import encode_prompts

    prompt, grp = prompt or OpinionPrompt(), survey.group(group)
    demos = few_shot_demos(survey, grp, splits.train, shots, splits.seed) if "few_shot" in methods else ()
    qs = group_questions(survey, grp, [*splits.train, *splits.valid, *splits.test])
    texts = [prompt.render(q) for q in qs]
    texts += [prompt.render(q, demos) for q in qs if q.key in splits.test]
    texts += [prompt.render(q, persona=grp.persona) for q in qs if q.key in splits.test and "persona" in methods]
    encode_prompts(model.tokenizer, texts, prompt.prepend_bos, model.cfg.n_ctx)


def evaluate_opinion(
    model: TransformerBridge,
    survey: Survey,
    group: str,
    intervention: Intervention | None = None,
    *,
    method: str = "plain",
    split: str = "test",
    splits: SurveySplits | None = None,
    seed: int | None = None,
    n_train: int | None = None,
    n_valid: int | None = None,
    shots: int | None = None,
    prompt: OpinionPrompt | None = None,
    batch_size: int = 16,
    strict: bool = False,
) -> OpinionEval:
    """Score one method (or ``intervention`` on plain prompts) on a split's questions; see the module docstring.

    With an intervention the split, and the prompt format unless given, are read from its record.

    Example:
        >>> from lens_laai import evaluate_opinion
        >>> from lens_laai.opinions.survey import toy_survey
        >>> from lens_laai.testing import tiny_model
        >>> survey = toy_survey()
        >>> plain = evaluate_opinion(tiny_model(), survey, "PARTY=Red", method="plain", splits=survey.split(0, 3, 1))
        >>> {"kl", "tv", "representativeness"} <= set(plain.scores())
        True
    """
    grp = survey.group(group)
    if intervention is not None:
        intervention.check_model(model, strict)
        if method != "plain":
            raise TaskError("An intervention is scored on plain prompts; leave method='plain'.")
        if prompt is None and "opinion_prompt" in intervention.metadata:
            prompt = OpinionPrompt.from_json(intervention.metadata["opinion_prompt"])
    cut = held_out_split(survey, grp, intervention, splits=splits, seed=seed, n_train=n_train, n_valid=n_valid)
    if split not in ("train", "valid", "test"):
        raise TaskError(f"split must be 'train', 'valid' or 'test', got {split!r}.")
    demos = few_shot_demos(survey, grp, cut.train, shots, cut.seed) if method == "few_shot" else ()
    table = distributions(
        model, survey, grp, getattr(cut, split), method, intervention, demos=demos, prompt=prompt, batch_size=batch_size
    )
    label = "intervention" if intervention is not None else method
    table.insert(0, "method", label)
    return OpinionEval(table)


def compare_methods(
    model: TransformerBridge,
    survey: Survey,
    group: str,
    splits: SurveySplits,
    interventions: Mapping[str, Intervention] | None = None,
    methods: Sequence[str] = METHODS,
    *,
    shots: int | None = None,
    prompt: OpinionPrompt | None = None,
    batch_size: int = 16,
) -> OpinionEval:
    """Every prompting method and every named intervention on ``splits.test``, in one table.

    Example:
        >>> from lens_laai import compare_methods
        >>> from lens_laai.opinions.survey import toy_survey
        >>> from lens_laai.testing import tiny_model
        >>> survey = toy_survey()
        >>> table = compare_methods(tiny_model(), survey, "PARTY=Red", survey.split(0, 3, 1), methods=["plain", "persona"])
        >>> table.summary()["method"].tolist()
        ['plain', 'persona']
    """
    parts = [
        evaluate_opinion(
            model, survey, group, method=m, splits=splits, shots=shots, prompt=prompt, batch_size=batch_size
        ).table
        for m in methods
    ]
    for name, iv in (interventions or {}).items():
        table = evaluate_opinion(model, survey, group, iv, splits=splits, prompt=prompt, batch_size=batch_size).table
        parts.append(table.assign(method=name))
    return OpinionEval(pd.concat(parts, ignore_index=True))


def plot_distributions(
    table: pd.DataFrame,
    survey: Survey,
    keys: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    title: str | None = None,
    max_questions: int = 3,
    axes: Sequence[Any] | None = None,
):
    """Bars of the target and each method's distribution on a few questions; returns the matplotlib figure.

    ``axes`` (one per question) draws into an existing figure, e.g. one row per group.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> red = survey.group("PARTY=Red")
        >>> from lens_laai import compare_methods
        >>> from lens_laai.opinions.evaluate import plot_distributions
        >>> from lens_laai.testing import tiny_model
        >>> table = compare_methods(tiny_model(), survey, "PARTY=Red", survey.split(0, 3, 1), methods=["plain", "persona"]).table
        >>> fig = plot_distributions(table, survey, max_questions=2)
        >>> len(fig.axes), [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
        (2, ['target', 'plain', 'persona'])
    """
    import matplotlib.pyplot as plt

    keys = list(keys or list(dict.fromkeys(table["key"]))[:max_questions])
    methods = list(methods or list(dict.fromkeys(table["method"])))
    if axes is None:
        fig, grid = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
        axes = list(grid[0])
    fig = axes[0].figure
    for ax, key in zip(axes, keys):
        rows = table[table["key"] == key].set_index("method")
        q = survey.questions[key]
        series = [("target", rows.iloc[0]["target"])] + [(m, rows.loc[m, "model"]) for m in methods if m in rows.index]
        width = 0.8 / len(series)
        for s, (name, dist) in enumerate(series):
            ax.bar(
                np.arange(len(q.options)) + (s - (len(series) - 1) / 2) * width,
                dist,
                width,
                label=name,
                color="black" if name == "target" else None,
            )
        ax.set_xticks(range(len(q.options)), q.options, fontsize=8)
        ax.set_title(_short(q.text), fontsize=8)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel(f"{title}\nprobability" if title else "probability", fontsize=8)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _short(text: str, width: int = 48) -> str:
    tail = text.rsplit(" on ", 1)[-1] if " on " in text else text
    return tail if len(tail) <= width else tail[: width - 1] + "…"
