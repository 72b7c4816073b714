"""Which data an intervention was fitted on, and the held-out split that follows from it.

A fit writes one :class:`DataRecord` into ``intervention.metadata["data"]``: the task's name and
content hash, the seed and split sizes, a hash of each split, and a short hash of every pair the
fit saw (training and validation). Algebra keeps the records of every operand. Evaluation then

* reproduces the held-out split from a record and checks the split hashes, so a task file of the
  same name that changed since the fit (one pair added reshuffles everything) is refused instead
  of re-split; another task (a transfer test) is split by the settings given, or 0 / 20 / 40;
* refuses ``seed`` / ``n_train`` / ``n_valid`` that disagree with the record rather than ignoring
  them;
* and, whatever the split came from, refuses to score a "test" pair that any operand saw while
  fitting, comparing pairs up to whitespace and letter case (:func:`loose_pair_hash`).

Survey fits carry a survey record instead; :func:`merged_survey_record` merges the records of a sum.

Example:
    >>> from lens_laai.tasks.provenance import DataRecord, held_out
    >>> from lens_laai.testing import tiny_task
    >>> task = tiny_task()
    >>> record = DataRecord.of(task.split(2, 10, 4), task)
    >>> held_out(task, [record]).test == task.split(2, 10, 4).test
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lens_laai.errors import TaskError
from lens_laai.tasks.task import Pair, Task, TaskSplits

DEFAULT_SPLIT = {"seed": 0, "n_train": 20, "n_valid": 0}


def pair_hash(pair: Pair) -> str:
    """A 16-hex-digit hash of one (input, output) pair.

    Example:
        >>> from lens_laai.tasks.provenance import pair_hash
        >>> h = pair_hash(("hot", "cold"))
        >>> len(h), h == pair_hash(("hot", "cold")), h == pair_hash(("cold", "hot"))
        (16, True, False)
    """
    return hashlib.sha256(json.dumps(list(pair), ensure_ascii=False).encode()).hexdigest()[:16]


def loose_pair_hash(pair: Pair) -> str:
    """A 16-hex-digit hash of a pair up to whitespace and letter case: what "the same pair" means for leaks.

    A prompt template only puts fixed text around the input (and a fixed prefix before the
    target), so two pairs whose inputs and outputs agree once whitespace runs are collapsed, ends
    stripped and case folded render as the same prompt and target up to whitespace and case. A
    model fitted on ``("hot", "cold")`` has seen ``("hot ", "Cold")``; scoring that as a held-out
    pair would overstate accuracy. (Two genuinely different pairs that differ only in case are
    then treated as one: the check errs towards refusing, with a message, rather than leaking.)

    Example:
        >>> from lens_laai.tasks.provenance import loose_pair_hash, pair_hash
        >>> loose_pair_hash(("hot", "cold")) == loose_pair_hash((" Hot ", "COLD"))
        True
        >>> pair_hash(("hot", "cold")) == pair_hash(("Hot", "cold"))  # the exact hash tells them apart
        False
    """
    loose = [" ".join(text.split()).casefold() for text in pair]
    return hashlib.sha256(json.dumps(loose, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DataRecord:
    """What one fit saw: enough to reproduce its held-out split and to recognise its pairs.

    Example:
        >>> from lens_laai.tasks.provenance import DataRecord
        >>> from lens_laai.testing import tiny_task
        >>> record = DataRecord.of(tiny_task().split(seed=0, n_train=8))
        >>> record.task, record.seed, record.n_train, record.n_test
        ('tiny-antonym', 0, 8, 16)
    """

    task: str
    task_hash: str | None
    seed: int
    n_train: int
    n_valid: int
    n_test: int
    train_hash: str
    valid_hash: str
    test_hash: str
    seen: tuple[str, ...]
    seen_loose: tuple[str, ...] = ()

    @classmethod
    def of(cls, splits: TaskSplits, task: Task | None = None) -> DataRecord:
        """The record of a fit on ``splits`` (cut from ``task``, when known)."""
        fitted_on = splits.train.pairs + splits.valid.pairs
        seen = sorted({pair_hash(p) for p in fitted_on})
        return cls(
            splits.train.name,
            task.data_hash() if task is not None else None,
            splits.seed,
            len(splits.train),
            len(splits.valid),
            len(splits.test),
            splits.train.data_hash(),
            splits.valid.data_hash(),
            splits.test.data_hash(),
            tuple(seen),
            tuple(sorted({loose_pair_hash(p) for p in fitted_on})),
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "seen": list(self.seen), "seen_loose": list(self.seen_loose)}

    @classmethod
    def from_json(cls, data: Any) -> DataRecord:
        """A record from a manifest (``seen_loose`` is absent from saves made before it existed)."""
        try:
            return cls(**{**data, "seen": tuple(data["seen"]), "seen_loose": tuple(data.get("seen_loose") or ())})
        except (TypeError, KeyError) as err:
            raise TaskError(f"An intervention's data record is malformed ({err}): {str(data)[:200]}") from None

    def describe(self) -> str:
        return f"{self.task!r} (seed={self.seed}, n_train={self.n_train}, n_valid={self.n_valid}, n_test={self.n_test})"

    def reproduce(self, task: Task) -> TaskSplits | None:
        """The same split of ``task``, or ``None`` if ``task`` is not the data this record was cut from."""
        if self.task_hash is not None and task.data_hash() != self.task_hash:
            return None
        try:
            splits = task.split(self.seed, self.n_train, self.n_valid, self.n_test)
        except TaskError:
            return None
        hashes = (splits.train.data_hash(), splits.valid.data_hash(), splits.test.data_hash())
        return splits if hashes == (self.train_hash, self.valid_hash, self.test_hash) else None


def records_of(metadata_list: Iterable[dict[str, Any]]) -> list[DataRecord]:
    """Every distinct record in the ``metadata["data"]`` lists given (operands of algebra, or several interventions).

    Example:
        >>> from lens_laai.tasks.provenance import DataRecord, records_of
        >>> from lens_laai.testing import tiny_task
        >>> record = DataRecord.of(tiny_task().split(seed=0, n_train=8)).to_json()
        >>> [r.n_train for r in records_of([{"data": [record]}, {"data": [record]}, {}])]  # duplicates kept once
        [8]
    """
    out: list[DataRecord] = []
    for metadata in metadata_list:
        for item in metadata.get("data", []) or []:
            record = DataRecord.from_json(item)
            if record not in out:
                out.append(record)
    return out


def held_out(
    task: Task,
    records: Sequence[DataRecord],
    seed: int | None = None,
    n_train: int | None = None,
    n_valid: int | None = None,
    n_test: int | None = None,
) -> TaskSplits:
    """The split of ``task`` that ``records`` say was held out; explicit settings must agree with them.

    Example:
        >>> from lens_laai.tasks.provenance import DataRecord, held_out
        >>> from lens_laai.testing import tiny_task
        >>> splits = tiny_task().split(seed=0, n_train=8)
        >>> held_out(tiny_task(), [DataRecord.of(splits)]).test.pairs == splits.test.pairs
        True
    """
    asked = {k: v for k, v in (("seed", seed), ("n_train", n_train), ("n_valid", n_valid)) if v is not None}
    if not records:
        return task.split(**{**DEFAULT_SPLIT, **asked}, n_test=n_test)
    fitted_here = [r for r in records if r.reproduce(task) is not None]
    if not fitted_here and not any(r.task == task.name for r in records):
        return task.split(**{**DEFAULT_SPLIT, **asked})  # another task: any split, as long as check_unseen passes
    if not fitted_here:
        raise TaskError(
            f"Cannot reproduce the held-out split: the intervention was fitted on "
            f"{', '.join(r.describe() for r in records)}, and task {task.name!r} "
            f"({len(task)} pairs, hash {task.data_hash()}) is not that data. Pass the same task file, or "
            "explicit TaskSplits whose test pairs the fit never saw."
        )
    disagree = [
        f"{k}={v} (fitted with {getattr(fitted_here[0], k)})"
        for k, v in asked.items()
        if getattr(fitted_here[0], k) != v
    ]
    if disagree:
        raise TaskError(
            f"{', '.join(disagree)}: these settings disagree with the intervention's own split and would "
            "score pairs it was fitted on. Leave them out (the split is read from the intervention)."
        )
    splits = {r.test_hash: r for r in fitted_here}
    if len(splits) > 1:
        raise TaskError(
            "The intervention combines fits with different splits of this task "
            f"({'; '.join(r.describe() for r in fitted_here)}); pass explicit TaskSplits to evaluate on."
        )
    reproduced = fitted_here[0].reproduce(task)
    assert reproduced is not None, "fitted_here holds the records that reproduce on task"
    return reproduced


def check_unseen(part: Task, records: Sequence[DataRecord]) -> None:
    """Refuse a held-out ``part`` that contains pairs any record's fit saw, up to whitespace and case.

    Example:
        >>> from lens_laai import TaskError
        >>> from lens_laai.tasks.provenance import DataRecord, check_unseen
        >>> from lens_laai.testing import tiny_task
        >>> splits = tiny_task().split(seed=0, n_train=8)
        >>> record = DataRecord.of(splits)
        >>> check_unseen(splits.test, [record])  # held-out pairs: nothing to say
        >>> try:
        ...     check_unseen(splits.train, [record])
        ... except TaskError:
        ...     print("refused")
        refused
    """
    seen = {h for r in records for h in r.seen}
    loose = {h for r in records for h in r.seen_loose}
    leaked = [p for p in part.pairs if pair_hash(p) in seen or loose_pair_hash(p) in loose]
    if leaked:
        raise TaskError(
            f"{len(leaked)} of the {len(part)} test pairs (e.g. {leaked[0]!r}) were used to fit this "
            "intervention (training or validation); scoring them would overstate accuracy. Evaluate on "
            "pairs the fit never saw, or ask for split='train' / 'valid' / 'all' explicitly."
        )


def fit_metadata(
    splits: TaskSplits, task: Task | None, template: Any, config: dict[str, Any], **scores: Any
) -> dict[str, Any]:
    """The metadata every fitted intervention carries: name, data record, prompt template, config, scores.

    Example:
        >>> from lens_laai import PromptTemplate
        >>> from lens_laai.tasks.provenance import fit_metadata
        >>> from lens_laai.testing import tiny_task
        >>> task = tiny_task()
        >>> metadata = fit_metadata(task.split(seed=0, n_train=8), task, PromptTemplate(), {"steps": 3}, train_accuracy=0.5)
        >>> sorted(metadata), metadata["data"][0]["n_train"]
        (['data', 'fit_config', 'name', 'task', 'template', 'train_accuracy'], 8)
    """
    return {
        "name": splits.train.name,
        "task": splits.train.name,
        "data": [DataRecord.of(splits, task).to_json()],
        "template": template.to_json(),
        "fit_config": config,
        **scores,
    }


def merged_survey_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One survey record for a sum of survey fits: every operand's seen questions stay out of the test split.

    Equal records stay as they are. Otherwise the survey, group and seed are the first operand's
    (evaluation checks them), train and valid are the union of everyone's, and test keeps only the
    first's test questions that no operand trained or validated on.

    Example:
        >>> from lens_laai.tasks.provenance import merged_survey_record
        >>> a = {"survey": "gss", "train": ["q1"], "valid": ["q2"], "test": ["q3", "q4"]}
        >>> merged = merged_survey_record([a, {**a, "train": ["q3"]}])  # the second fit trained on q3
        >>> merged["train"], merged["test"], merged["merged_from"]
        (['q1', 'q3'], ['q4'], 2)
    """
    first = records[0]
    if all(r == first for r in records):
        return dict(first)
    seen_train = list(dict.fromkeys(q for r in records for q in r.get("train", [])))
    seen_valid = [q for q in dict.fromkeys(q for r in records for q in r.get("valid", [])) if q not in seen_train]
    seen = set(seen_train) | set(seen_valid)
    test = [q for q in first.get("test", []) if q not in seen]
    return {
        **first,
        "train": seen_train,
        "valid": seen_valid,
        "test": test,
        "n_train": len(seen_train),
        "n_valid": len(seen_valid),
        "n_test": len(test),
        "merged_from": len(records),
    }
