"""Survey data: questions with ordered answer options, and each group's distribution over them.

A :class:`Survey` holds :class:`SurveyQuestion`s (text, ordinal answer options with their ordinal
values, refusal-type options such as "Refused" that are kept out of the distribution) and
:class:`Group`s named ``ATTRIBUTE=VALUE`` (e.g. ``POLVIEWS=Extremely liberal``), each with its
(weighted) answer counts per question. :func:`load_survey` reads a bundled survey by name
(``"gss-spending"``: the 2018 General Social Survey's national-spending battery, written by
``scripts/make_gss_spending.py``), our JSON format from a path, or an OpinionQA-layout directory
(:mod:`lens_laai.opinions.opinionqa`); all three give the same type. Splits are by question and seeded.

Example:
    >>> from lens_laai.opinions.loading import load_survey
    >>> survey = load_survey("gss-spending")
    >>> len(survey.questions), survey.questions["natarms"].options
    (18, ('Too little', 'About right', 'Too much'))
    >>> group = survey.group("POLVIEWS=Extremely conservative")
    >>> round(float(group.answers["natarms"].distribution[0]), 2)   # "too little" on the military
    0.57
    >>> splits = survey.split(seed=0, n_train=8, n_valid=4)
    >>> len(splits.train), len(splits.valid), len(splits.test)
    (8, 4, 6)
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lens_laai.errors import TaskError

FORMAT = "lens_laai.survey/1"


@dataclass(frozen=True)
class SurveyQuestion:
    """One question: its text, the ordinal options (prompt order) and their values, then refusal options.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> question = toy_survey().questions["Q0"]
        >>> question.options, question.ordinal
        (('More', 'Same', 'Less'), (1.0, 2.0, 3.0))
    """

    key: str
    text: str
    options: tuple[str, ...]
    ordinal: tuple[float, ...]
    refusals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"question {self.key!r}"
        if not isinstance(self.key, str) or not self.key or not isinstance(self.text, str) or not self.text.strip():
            raise TaskError(f"{where}: the key and text must be non-empty strings.")
        opts = (*self.options, *self.refusals)
        if len(self.options) < 2 or any(not isinstance(o, str) or not o.strip() for o in opts):
            raise TaskError(
                f"{where}: needs at least two ordinal options, each a non-empty string (got {list(opts)!r})."
            )
        if len(set(opts)) != len(opts):
            raise TaskError(f"{where}: options must be distinct (got {list(opts)!r}).")
        if len(self.ordinal) != len(self.options):
            raise TaskError(f"{where}: {len(self.ordinal)} ordinal values for {len(self.options)} ordinal options.")
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) for v in self.ordinal):
            raise TaskError(f"{where}: ordinal values must be finite numbers, got {list(self.ordinal)!r}.")
        if max(self.ordinal) == min(self.ordinal):
            raise TaskError(
                f"{where}: all ordinal values are equal ({self.ordinal[0]}), so the question is not "
                "ordinal and representativeness (W1 / range) is undefined; drop it."
            )

    @property
    def all_options(self) -> tuple[str, ...]:
        """Every option in prompt order: the ordinal ones, then the refusals."""
        return (*self.options, *self.refusals)

    @property
    def span(self) -> float:
        """``max ordinal − min ordinal``: the largest possible W1 between two answer distributions."""
        return float(max(self.ordinal) - min(self.ordinal))

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "question": self.text,
            "options": list(self.options),
            "ordinal": [float(v) for v in self.ordinal],
            "refusal_options": list(self.refusals),
        }


@dataclass(frozen=True)
class Answers:
    """One group's answers to one question: weighted counts per ordinal option, refusal weight, respondents.

    Example:
        >>> from lens_laai.opinions.survey import Answers
        >>> answers = Answers(counts=(30.0, 8.0, 6.0), n=44)
        >>> answers.distribution.round(2).tolist()
        [0.68, 0.18, 0.14]
    """

    counts: tuple[float, ...]
    refusal: float = 0.0
    n: int = 0

    @property
    def distribution(self) -> np.ndarray:
        """The target: counts normalised over the ordinal options (refusals left out, as in OpinionQA)."""
        c = np.asarray(self.counts, dtype=np.float64)
        return c / c.sum()

    @property
    def refusal_share(self) -> float:
        """The weighted share of this group's answers that were refusal-type options."""
        total = float(sum(self.counts)) + self.refusal
        return self.refusal / total if total > 0 else 0.0


@dataclass(frozen=True)
class Group:
    """Respondents with ``attribute == value``; ``persona`` completes "Answer ... as if {persona}.".

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> group = toy_survey().group("PARTY=Red")
        >>> group.attribute, group.value, group.persona, group.n_respondents
        ('PARTY', 'Red', 'you were red', 60)
    """

    name: str
    attribute: str
    value: str
    persona: str
    answers: dict[str, Answers]
    n_respondents: int = 0


@dataclass(frozen=True)
class SurveySplits:
    """Question keys for training, validation (layer/λ choice) and testing, cut with ``seed``.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> splits = toy_survey().split(seed=0, n_train=4, n_valid=2)
        >>> len(splits.train), len(splits.valid), len(splits.test)
        (4, 2, 2)
    """

    train: tuple[str, ...]
    valid: tuple[str, ...]
    test: tuple[str, ...]
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "train": list(self.train), "valid": list(self.valid), "test": list(self.test)}


@dataclass
class Survey:
    """Questions and groups; see the module docstring. Build with :func:`load_survey` or directly.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> len(survey.questions), sorted(survey.groups)[:2]
        (8, ['AGE=Old', 'AGE=Young'])
    """

    name: str
    questions: dict[str, SurveyQuestion]
    groups: dict[str, Group]
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.questions:
            raise TaskError(f"Survey {self.name!r} has no questions.")
        for group in self.groups.values():
            for key, answers in group.answers.items():
                q = self.questions.get(key)
                if q is None:
                    raise TaskError(f"Survey {self.name!r}: group {group.name!r} answers unknown question {key!r}.")
                if len(answers.counts) != len(q.options) or not all(
                    c >= 0 and math.isfinite(c) for c in answers.counts
                ):
                    raise TaskError(
                        f"Survey {self.name!r}: group {group.name!r}, question {key!r} needs "
                        f"{len(q.options)} finite counts ≥ 0, got {list(answers.counts)!r}."
                    )
                if sum(answers.counts) <= 0:
                    raise TaskError(
                        f"Survey {self.name!r}: group {group.name!r} has no ordinal answers to {key!r}; "
                        "leave the question out of its answers."
                    )

    def group(self, name: str) -> Group:
        """The group called ``name`` (``ATTRIBUTE=VALUE``, case-insensitive); an error lists the others."""
        if name in self.groups:
            return self.groups[name]
        folded = {k.casefold(): g for k, g in self.groups.items()}
        if isinstance(name, str) and name.casefold() in folded:
            return folded[name.casefold()]
        shown = ", ".join(sorted(self.groups)[:40])
        raise TaskError(f"Survey {self.name!r} has no group {name!r}. Groups are ATTRIBUTE=VALUE, one of: {shown}.")

    def data_hash(self) -> str:
        """A content hash of the questions and every group's answers (not of file formatting)."""
        blob = json.dumps(
            [
                [q.to_json() for q in self.questions.values()],
                {g: _group_json(grp) for g, grp in sorted(self.groups.items())},
            ],
            sort_keys=True,
            ensure_ascii=False,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def split(self, seed: int = 0, n_train: int = 8, n_valid: int = 4, n_test: int | None = None) -> SurveySplits:
        """Shuffle the question keys with ``seed`` and cut train / valid / test (the rest, or ``n_test``).

        The split does not depend on the group, so every group is scored on the same test questions.
        """
        for label, n, least in (("seed", seed, 0), ("n_train", n_train, 1), ("n_valid", n_valid, 0)):
            if not isinstance(n, int) or isinstance(n, bool) or n < least:
                raise TaskError(f"{label} must be an integer ≥ {least}, got {n!r}.")
        keys = list(self.questions)
        rest = len(keys) - n_train - n_valid
        if n_test is not None and (not isinstance(n_test, int) or isinstance(n_test, bool) or n_test < 1):
            raise TaskError(f"n_test must be an integer ≥ 1 or None, got {n_test!r}.")
        if rest < 1 or (n_test is not None and n_test > rest):
            raise TaskError(
                f"Survey {self.name!r} has {len(keys)} questions: {n_train} train + {n_valid} validation "
                f"leave {max(rest, 0)} for testing{'' if n_test is None else f', fewer than n_test={n_test}'}; "
                "use fewer training or validation questions."
            )
        random.Random(seed).shuffle(keys)
        test = keys[n_train + n_valid :][: n_test if n_test is not None else None]
        return SurveySplits(tuple(keys[:n_train]), tuple(keys[n_train : n_train + n_valid]), tuple(test), seed)

    def to_json(self) -> dict[str, Any]:
        """Our file format (what ``scripts/make_gss_spending.py`` writes and :func:`load_survey` reads)."""
        return {
            "format": FORMAT,
            "name": self.name,
            "source": self.source,
            "questions": [q.to_json() for q in self.questions.values()],
            "groups": {g: _group_json(grp) for g, grp in self.groups.items()},
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "survey") -> Survey:
        """Build from :meth:`to_json` output; every problem names ``where`` and the offending entry."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TaskError(f"{where}: not a lens_laai survey file (expected a JSON object with format {FORMAT!r}).")
        try:
            questions = {}
            for q in data["questions"]:
                questions[q["key"]] = SurveyQuestion(
                    q["key"],
                    q["question"],
                    tuple(q["options"]),
                    tuple(q["ordinal"]),
                    tuple(q.get("refusal_options", ())),
                )
            if len(questions) != len(data["questions"]):
                raise TaskError("two questions share a key")
            groups = {}
            for name, g in data["groups"].items():
                answers = {
                    k: Answers(tuple(float(c) for c in a["counts"]), float(a.get("refusal", 0.0)), int(a.get("n", 0)))
                    for k, a in g["answers"].items()
                }
                groups[name] = Group(
                    name, g["attribute"], g["value"], g["persona"], answers, int(g.get("n_respondents", 0))
                )
            return cls(str(data["name"]), questions, groups, dict(data.get("source", {})))
        except TaskError as err:
            raise TaskError(f"{where}: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise TaskError(f"{where}: malformed survey file ({type(err).__name__}: {err}).") from None


def _group_json(g: Group) -> dict[str, Any]:
    return {
        "attribute": g.attribute,
        "value": g.value,
        "persona": g.persona,
        "n_respondents": g.n_respondents,
        "answers": {k: {"counts": list(a.counts), "refusal": a.refusal, "n": a.n} for k, a in g.answers.items()},
    }


def group_answers(
    labels: Iterable[str | None], options: tuple[str, ...], refusals: tuple[str, ...], weights: Iterable[float]
) -> Answers | None:
    """Tally one group's answers (``None`` = not asked) into :class:`Answers`; ``None`` if no ordinal answer.

    Example:
        >>> from lens_laai.opinions.survey import group_answers
        >>> answers = group_answers(["Yes", "No", None, "Refused"], ("Yes", "No"), ("Refused",), [2.0, 1.0, 1.0, 1.0])
        >>> answers.counts, answers.refusal, answers.n  # None: not asked, not counted
        ((2.0, 1.0), 1.0, 3)
        >>> group_answers(["Refused"], ("Yes", "No"), ("Refused",), [1.0]) is None  # no ordinal answer: no target
        True
    """
    counts = [0.0] * len(options)
    index = {o: i for i, o in enumerate(options)}
    refusal, n = 0.0, 0
    for label, w in zip(labels, weights):
        if label is None:
            continue
        n += 1
        if label in index:
            counts[index[label]] += float(w)
        elif label in refusals:
            refusal += float(w)
        else:
            raise TaskError(f"answer {label!r} is not one of the options {list((*options, *refusals))!r}.")
    return Answers(tuple(counts), refusal, n) if sum(counts) > 0 else None


def toy_survey() -> Survey:
    """A small synthetic survey for tests and examples on the tiny model: 8 questions, groups ``PARTY=Red/Blue``, ``AGE=Young/Old``.

    Two-option questions with a refusal option and three-option questions; the groups disagree
    in opposite directions, so a fit has something to learn. The numbers are invented.

    Example:
        >>> from lens_laai.opinions.survey import toy_survey
        >>> survey = toy_survey()
        >>> len(survey.questions), "PARTY=Red" in survey.groups
        (8, True)
    """
    questions, groups = {}, {}
    words = ["hot", "big", "fast", "old", "good", "high", "open", "dark"]
    for i, w in enumerate(words):
        if i % 2:
            questions[f"Q{i}"] = SurveyQuestion(f"Q{i}", f"Is {w} good?", ("Yes", "No"), (1.0, 2.0), ("Refused",))
        else:
            questions[f"Q{i}"] = SurveyQuestion(f"Q{i}", f"How much {w}?", ("More", "Same", "Less"), (1.0, 2.0, 3.0))
    for attr, values in (("PARTY", ("Red", "Blue")), ("AGE", ("Young", "Old"))):
        for v, value in enumerate(values):
            answers = {}
            for i, (key, q) in enumerate(questions.items()):
                lean = (i + v + (attr == "AGE")) % len(q.options)
                counts = tuple(30.0 if j == lean else 10.0 - 2 * j for j in range(len(q.options)))
                answers[key] = Answers(counts, 2.0 * (v + 1) if q.refusals else 0.0, int(sum(counts)))
            groups[f"{attr}={value}"] = Group(f"{attr}={value}", attr, value, f"you were {value.lower()}", answers, 60)
    return Survey("toy", questions, groups, {"note": "synthetic, for tests"})
