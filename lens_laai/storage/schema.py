"""The schema of a saved intervention's ``manifest.json``, validated before anything in it is used.

One pydantic (v2) model per save format, in strict mode (``true`` is not an integer, ``"5"`` is
not a number), with bounds on every number that reaches torch or a loop. We chose pydantic over
jsonschema because the same typed classes validate, document and publish the format: the JSON
Schema in ``lens_laai/data/manifest.schema.json`` is generated from them
(:func:`manifest_json_schema`; a test checks the file is current), and pydantic's error locations
(``metadata.template.query``) go straight into our messages. Unknown top-level and metadata keys
are kept (metadata is the user's), but every key lens_laai reads is typed.

Example:
    >>> manifest = {"format": "lens_laai.HeadIntervention", "format_version": 2, "tensor_file": "d.safetensors",
    ...             "tensors_sha256": "0" * 64, "model_name": "m", "positions": "last", "metadata": {"data": 5},
    ...             "fingerprint": {"n_layers": 2, "n_heads": 2, "d_head": 4, "d_model": 8, "d_vocab": 10}}
    >>> validate_manifest(manifest, "run/manifest.json")
    Traceback (most recent call last):
    ...
    lens_laai.errors.InterventionError: run/manifest.json does not match the lens_laai.HeadIntervention manifest schema: metadata.data: Input should be a valid list (got 5). The save is damaged or was edited; save it again.
"""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lens_laai.errors import InterventionError

Count = Annotated[int, Field(ge=0, le=2**31)]
Size = Annotated[int, Field(ge=1, le=2**31)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
Position = Annotated[int, Field(ge=-(2**31), le=2**31)]
Hash = Annotated[str, Field(max_length=128)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class Fingerprint(_Open):
    """Shapes of the model an intervention was made for, plus a weights digest (compared, not read).

    Example:
        >>> from lens_laai.models.bridge import model_fingerprint
        >>> from lens_laai.testing import tiny_model
        >>> print(Fingerprint.model_validate(model_fingerprint(tiny_model())).n_layers)
        3
    """

    n_layers: Size
    n_heads: Size
    d_head: Size
    d_model: Size
    d_vocab: Size
    weights_digest: str | None = None


class DataRecordJSON(_Strict):
    """:class:`lens_laai.tasks.provenance.DataRecord` as saved: what one task fit saw.

    Example:
        >>> from lens_laai.tasks.provenance import DataRecord
        >>> from lens_laai.testing import tiny_task
        >>> task = tiny_task()
        >>> record = DataRecord.of(task.split(0, 8, 4), task).to_json()
        >>> saved = DataRecordJSON.model_validate(record)
        >>> saved.n_train, saved.n_valid, len(saved.seen)
        (8, 4, 12)
    """

    task: str
    task_hash: Hash | None
    seed: Seed
    n_train: Count
    n_valid: Count
    n_test: Count
    train_hash: Hash
    valid_hash: Hash
    test_hash: Hash
    seen: list[Hash]
    seen_loose: list[Hash] | None = None


class SurveyRecordJSON(_Open):
    """The survey, group and question split of an opinion fit (:func:`lens_laai.opinions.fit.opinion_metadata`).

    Example:
        >>> record = SurveyRecordJSON.model_validate({"name": "gss", "hash": "ab12", "group": "age 18-29", "seed": 0,
        ...                                           "train": ["q1", "q2"], "valid": ["q3"], "test": ["q4"]})
        >>> record.group, record.train
        ('age 18-29', ['q1', 'q2'])
    """

    name: str
    hash: Hash
    group: str
    seed: Seed
    train: list[str]
    valid: list[str]
    test: list[str]
    n_train: Count | None = None
    n_valid: Count | None = None
    n_test: Count | None = None


def _fields(text: str) -> set[str]:
    """The ``{placeholder}`` names in a format string; ValueError if it is not one."""
    return {name for _, name, spec, conv in string.Formatter().parse(text) if name is not None}


class TemplateJSON(_Strict):
    """:class:`lens_laai.tasks.prompts.PromptTemplate` as saved.

    Example:
        >>> TemplateJSON().query
        'Q: {input}\\nA:'
        >>> from pydantic import ValidationError
        >>> try:
        ...     TemplateJSON(query="Q: {question}\\nA:")
        ... except ValidationError as err:
        ...     print(err.errors()[0]["msg"])
        Value error, must contain {input} and no placeholders but ['input'], got ['question']
    """

    query: str = "Q: {input}\nA:"
    demo: str = "Q: {input}\nA: {output}"
    separator: str = "\n\n"
    target_prefix: str = " "
    prepend_bos: bool = True

    @field_validator("query", "demo")
    @classmethod
    def _placeholders(cls, text: str, info: Any) -> str:
        allowed = {"input"} if info.field_name == "query" else {"input", "output"}
        try:
            names = _fields(text)
        except ValueError as err:
            raise ValueError(f"not a format string ({err})") from None
        if "input" not in names or not names <= allowed:
            raise ValueError(f"must contain {{input}} and no placeholders but {sorted(allowed)}, got {sorted(names)}")
        try:
            text.format(input="x", output="y")
        except (ValueError, KeyError, IndexError, AttributeError) as err:
            raise ValueError(f"not a usable format string ({type(err).__name__}: {err})") from None
        return text


class OpinionPromptJSON(_Strict):
    """:class:`lens_laai.opinions.prompts.OpinionPrompt` as saved.

    Example:
        >>> OpinionPromptJSON.model_validate({"persona": "Answer as a person aged 18-29."}).persona
        'Answer as a person aged 18-29.'
    """

    query: str | None = None
    option: str | None = None
    persona: str | None = None
    separator: str | None = None
    answer_prefix: str | None = None
    prepend_bos: bool | None = None


class ModeJSON(_Strict):
    """:class:`lens_laai.interventions.mode.Mode` as saved: how the fit recommends using the intervention.

    Example:
        >>> from lens_laai.storage.schema import ModeJSON
        >>> ModeJSON.model_validate({"shots": 5, "delta": True}).shots
        5
    """

    shots: Count
    delta: bool
    demonstrations: Annotated[
        list[Annotated[list[str], Field(min_length=2, max_length=2)]], Field(max_length=4096)
    ] = []


class Metadata(_Open):
    """The keys of ``metadata`` that lens_laai reads; anything else is the user's and kept as is.

    Example:
        >>> meta = Metadata.model_validate({"name": "antonym", "my_note": "kept as is"})
        >>> meta.name, meta.model_extra
        ('antonym', {'my_note': 'kept as is'})
    """

    name: str | None = None
    data: list[DataRecordJSON] | None = None
    template: TemplateJSON | None = None
    survey: SurveyRecordJSON | None = None
    opinion_prompt: OpinionPromptJSON | None = None
    fit_config: dict[str, Any] | None = None
    mode: ModeJSON | None = None


class ManifestBase(_Open):
    """What every save holds.

    Example:
        >>> from pydantic import ValidationError
        >>> try:  # strict: a string is not a version number
        ...     ManifestBase.model_validate({"format": "x", "format_version": "2"})
        ... except ValidationError as err:
        ...     print(err.errors()[0]["loc"], err.error_count())
        ('format_version',) 5
    """

    format: str
    format_version: Literal[1, 2]
    tensor_file: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    tensors_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    tensors_bytes: Annotated[int, Field(ge=0, le=2**40)] | None = None
    model_name: str
    fingerprint: Fingerprint
    positions: Literal["last", "all"] | Annotated[list[Position], Field(min_length=1, max_length=4096)] = "last"
    metadata: Metadata
    lens_laai_version: str | None = None
    transformer_lens_version: str | None = None


class HeadManifest(ManifestBase):
    """The manifest of a :class:`lens_laai.HeadIntervention` save.

    Example:
        >>> import json, tempfile
        >>> from lens_laai import HeadIntervention
        >>> from lens_laai.testing import tiny_model
        >>> path = HeadIntervention.zeros(tiny_model(), 1).save(tempfile.mkdtemp() + "/iv")
        >>> manifest = HeadManifest.model_validate(json.loads((path / "manifest.json").read_text()))
        >>> manifest.format, manifest.fingerprint.n_heads, manifest.positions
        ('lens_laai.HeadIntervention', 4, 'last')
    """

    format: Literal["lens_laai.HeadIntervention"]
    hook_names: dict[str, str] | None = None
    selected_heads: list[list[int]] | None = None


class ResidualManifest(ManifestBase):
    """The manifest of a :class:`lens_laai.baselines.ResidualIntervention` save (a function vector).

    Example:
        >>> import json, tempfile, torch
        >>> from lens_laai.baselines import ResidualIntervention
        >>> from lens_laai.models.bridge import model_fingerprint, model_name
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> iv = ResidualIntervention(torch.ones(model.cfg.d_model), 2, model_name(model), model_fingerprint(model))
        >>> path = iv.save(tempfile.mkdtemp() + "/fv")
        >>> ResidualManifest.model_validate(json.loads((path / "manifest.json").read_text())).layer
        2
    """

    format: Literal["lens_laai.ResidualIntervention"]
    layer: Count
    hook_name: str | None = None


class AblationManifest(ManifestBase):
    """The manifest of a :class:`lens_laai.HeadAblation` save: which heads, how they are ablated.

    Example:
        >>> import json, tempfile
        >>> from lens_laai import HeadAblation
        >>> from lens_laai.testing import tiny_model
        >>> path = HeadAblation.zero(tiny_model(), [(1, 2), (2, 0)]).save(tempfile.mkdtemp() + "/abl")
        >>> manifest = AblationManifest.model_validate(json.loads((path / "manifest.json").read_text()))
        >>> manifest.heads, manifest.kind
        ([[1, 2], [2, 0]], 'zero')
    """

    format: Literal["lens_laai.HeadAblation"]
    heads: Annotated[list[Annotated[list[Count], Field(min_length=2, max_length=2)]], Field(min_length=1)]
    kind: Literal["zero", "mean", "resample"]
    seed: Seed = 0


MANIFESTS: dict[str, type[ManifestBase]] = {
    m.model_fields["format"].annotation.__args__[0]: m  # type: ignore[union-attr]
    for m in (HeadManifest, ResidualManifest, AblationManifest)
}


def validate_manifest(manifest: Any, where: str) -> ManifestBase:
    """Check a parsed manifest against its format's schema; :class:`InterventionError` lists what is wrong.

    Example:
        >>> import json, tempfile
        >>> from lens_laai import HeadIntervention
        >>> from lens_laai.testing import tiny_model
        >>> path = HeadIntervention.zeros(tiny_model(), 1).save(tempfile.mkdtemp() + "/iv")
        >>> type(validate_manifest(json.loads((path / "manifest.json").read_text()), "iv")).__name__
        'HeadManifest'
        >>> validate_manifest({"format": "pickle"}, "iv/manifest.json")
        Traceback (most recent call last):
        ...
        lens_laai.errors.InterventionError: iv/manifest.json does not name a save format lens_laai knows (lens_laai.HeadIntervention, lens_laai.ResidualIntervention, lens_laai.HeadAblation).
    """
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    model = MANIFESTS.get(fmt) if isinstance(fmt, str) else None
    if model is None:
        known = ", ".join(MANIFESTS)
        raise InterventionError(f"{where} does not name a save format lens_laai knows ({known}).")
    try:
        return model.model_validate(manifest)
    except ValidationError as err:
        raise InterventionError(
            f"{where} does not match the {fmt} manifest schema: {describe(err)}. "
            "The save is damaged or was edited; save it again."
        ) from None


def describe(err: ValidationError, limit: int = 3) -> str:
    """A short, readable list of a pydantic error's problems: ``location: message (got value)``.

    Example:
        >>> from pydantic import ValidationError
        >>> try:
        ...     Fingerprint.model_validate({"n_layers": 0, "n_heads": 4, "d_head": 16, "d_model": 64, "d_vocab": 100})
        ... except ValidationError as err:
        ...     print(describe(err))
        n_layers: Input should be greater than or equal to 1 (got 0)
    """
    parts = []
    for item in err.errors(include_url=False)[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "the manifest"
        got = repr(item.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        parts.append(f"{where}: {item['msg']} (got {got})")
    more = err.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def manifest_json_schema() -> dict[str, Any]:
    """The published JSON Schema of all three manifest formats (``lens_laai/data/manifest.schema.json``).

    Example:
        >>> schema = manifest_json_schema()
        >>> sorted(schema["$defs"])[:3], len(schema["anyOf"])
        (['AblationManifest', 'DataRecordJSON', 'Fingerprint'], 3)
    """
    from pydantic import TypeAdapter

    union = TypeAdapter(HeadManifest | ResidualManifest | AblationManifest)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **_without_examples(union.json_schema())}


def _without_examples(node: Any) -> Any:
    """The schema with each docstring-derived ``description`` cut before its ``Example:`` section."""
    if isinstance(node, dict):
        return {
            k: v.split("\n\nExample:")[0].strip() if k == "description" and isinstance(v, str) else _without_examples(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_without_examples(v) for v in node]
    return node
