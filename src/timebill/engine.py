"""The generation core: prefill, evict α of the prompt KV, decode token by token under a deadline.

Three phases (:meth:`Engine.prefill` → :class:`PrefillState`, :meth:`Engine.evict`, :meth:`Engine.decode` →
:class:`DecodeOutcome`) so the facade can predict beside prefill and choose α after it; our own decode loop
(not ``model.generate``) because the planner acts *between* tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import DynamicCache

from timebill.errors import InvalidInputError, PromptTooLongError
from timebill.estimator.store import usable_cpus
from timebill.fastpath import WEIGHT_MODES, FastDecoder, FastPathUnsupported, StaticKVCache
from timebill.guard import GuardMargin
from timebill.kernels import (
    KV_CHOICES,
    PREFILL_CHOICES,
    DecodeChoice,
    KernelChoice,
    ThreadChoice,
    choose_kv,
    choose_prefill,
    choose_threads,
    cpu_capability,
    prefill_model,
)
from timebill.loading import ModelSource, load_model_and_tokenizer, resolve_model
from timebill.options import (
    DEFAULT_COMPRESSOR,
    SamplingConfig,
    check_alpha,
    check_compressor,
    check_max_new_tokens,
    check_press,
    check_prompt_compression,
)
from timebill.presses import (
    capture_scores,
    evict,
    make_press,
    score_from_cache,
    scores_need_prefill,
)

logger = logging.getLogger(__name__)

STOP_EOS = "eos"
STOP_MAX_TOKENS = "max_tokens"
STOP_DEADLINE = "deadline"
# The deadline guard expects the next decode step to take up to a factor times the longest of the last
# GUARD_WINDOW steps: "the last step's duration" alone let 1 of 100 tight requests end 0.2 ms late
# (benchmarks/planner_overhead.py). The factor is timebill.guard.GUARD_FLOOR on a fresh engine and then
# learned from the engine's own steps (timebill.guard.GuardMargin): a contended host's jumpier steps raise it.
GUARD_WINDOW = 4
STOP_CANCELLED = "cancelled"  # the caller's should_stop() said so (e.g. a server client disconnected)

CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class GenerationResult:
    """Everything a caller (CLI, planner, benchmark, estimator) needs to know about one request."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    kept_kv_tokens: int  # prompt KV tokens kept per layer after eviction
    kv_tokens_per_layer: list[int]  # KV length per layer at the end of prefill+eviction
    alpha: float
    press: str
    prefill_s: float  # prompt forward (incl. SnapKV scoring), first token included
    evict_s: float  # scoring (key-only presses) + pruning
    decode_s: float  # all decode steps
    total_s: float  # request start to last token
    token_times_s: list[float]  # per generated token, seconds since request start
    step_times_s: list[float]  # duration of each decode step (len = tokens - 1 unless stopped early)
    stop_reason: str  # eos | max_tokens | deadline | cancelled
    deadline_s: float | None
    threads: int
    model_id: str
    decode_path: str = "hf"  # fast-fp32 | fast-int8 | hf
    # Prompt compression before prefill (prompt_tokens above is what was prefilled: the kept tokens).
    original_prompt_tokens: int | None = None  # before compression (None: not compressed)
    prompt_compression: float = 0.0  # ρ reached (fraction of prompt tokens removed)
    compressor: str | None = None
    compress_s: float = 0.0  # the compressor's time, before prefill (inside total_s and token_times_s)

    @property
    def tokens_generated(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_generated"] = self.tokens_generated
        return d

    def summary_line(self) -> str:
        compressed = ""
        if self.original_prompt_tokens is not None:
            compressed = (
                f"original_prompt_tokens={self.original_prompt_tokens} rho={self.prompt_compression:.3f} "
                f"compressor={self.compressor} compress={self.compress_s * 1e3:.1f}ms "
            )
        return compressed + (
            f"prompt_tokens={self.prompt_tokens} kept_kv={self.kept_kv_tokens} alpha={self.alpha:g} "
            f"press={self.press} prefill={self.prefill_s * 1e3:.1f}ms decode={self.decode_s * 1e3:.1f}ms "
            f"tokens={self.tokens_generated} stop={self.stop_reason} threads={self.threads} "
            f"path={self.decode_path}"
        )


@dataclass
class PrefillState:
    """The cache and bookkeeping between prefill and decode; owned by one request.

    ``first_logits`` are the prefill's last-position logits (sampling draws the first token from them);
    ``last_hidden`` is the final-norm hidden state of the last prompt token, kept only when prefill was
    asked to (``capture_hidden=True``): the zero-overhead length probe reads it.
    """

    cache: DynamicCache
    prompt_tokens: int
    prompt_kv_len: int  # prompt tokens currently kept (per layer)
    first_token: int
    scores: dict[int, torch.Tensor] | None
    t_start: float  # perf_counter at request start
    prefill_s: float
    press_name: str
    alpha: float = 0.0
    evict_s: float = 0.0
    static: StaticKVCache | None = None  # set once decoding starts on the fast path
    first_logits: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None

    @property
    def kv_len(self) -> int:
        """Tokens cached per layer now (prompt kept + generated)."""
        if self.static is not None:
            return self.static.length
        return int(self.cache.layers[0].keys.shape[2])

    def kv_tokens_per_layer(self) -> list[int]:
        """Cached tokens of each layer (equal for our presses; recorded per layer to show it)."""
        if self.static is not None:
            return [self.static.length] * int(self.static.k.shape[0])
        return [int(layer.keys.shape[2]) for layer in self.cache.layers]


@dataclass(frozen=True)
class DecodeOutcome:
    """What :meth:`Engine.decode` produced: tokens with their timestamps, and why it stopped."""

    token_ids: list[int]
    token_times_s: list[float]  # per token, seconds since the request's start
    step_times_s: list[float]  # duration of each decode step
    stop_reason: str  # eos | max_tokens | deadline | cancelled
    kv_tokens_per_layer: list[int]  # KV per layer when decoding began (after prefill and eviction)
    started_at: float  # perf_counter when decode began
    ended_at: float  # perf_counter when it ended

    @property
    def decode_s(self) -> float:
        """Wall time of the decode phase."""
        return self.ended_at - self.started_at


def validate_deadline(deadline_s: float | None) -> float | None:
    if deadline_s is None:
        return None
    if not (isinstance(deadline_s, (int, float)) and math.isfinite(deadline_s) and deadline_s > 0):
        raise InvalidInputError(f"deadline must be a positive number of seconds, got {deadline_s}")
    return float(deadline_s)


def validate_request(
    prompt: str | list[int],
    alpha: float,
    max_new_tokens: int,
    deadline_s: float | None,
    press: str,
    prompt_compression: float = 0.0,
    compressor: str = DEFAULT_COMPRESSOR,
) -> None:
    """Check a request's arguments before any work (the CLI calls this before loading a model)."""
    if isinstance(prompt, str) and not prompt.strip() or not prompt:
        raise InvalidInputError("The prompt is empty; give some text to answer.")
    check_alpha(alpha)
    validate_deadline(deadline_s)
    check_max_new_tokens(max_new_tokens)
    check_press(press)
    if check_prompt_compression(prompt_compression) > 0 and not isinstance(prompt, str):
        raise InvalidInputError("prompt compression needs the prompt's text, not token ids")
    check_compressor(compressor)


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as the model reads it: the text, how to tokenise it, and the turns it was made from."""

    text: str
    add_special_tokens: bool  # False for chat-template text (the template wrote the special tokens)
    turns: tuple[Mapping[str, str], ...]  # {role, content}, roles normalised (developer → system)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {role, content} objects.")
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in CHAT_ROLES:
            raise InvalidInputError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidInputError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        turns.append({"role": "system" if role == "developer" else role, "content": content})
    if not any(t["content"].strip() for t in turns):
        raise InvalidInputError("The messages are empty; give some text to answer.")
    return turns


class Engine:
    """A loaded causal LM with its tokenizer, ready to serve one request at a time."""

    def __init__(
        self,
        model: Any,  # a transformers PreTrainedModel (causal LM)
        tokenizer: Any,  # its tokenizer
        source: ModelSource | None,
        threads: int,
        fast: bool = True,
        weights: str = "fp32",
        prefill: str = "auto",
        kv_cache: str = "auto",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.threads = threads
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.stop_ids = self._stop_token_ids()
        self.device = next(model.parameters()).device
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        # Last measured decode-step time; the deadline guard's estimate for a request's first step.
        self.last_step_s = 0.0
        self.guard = GuardMargin()  # the deadline guard's factor, learned from this engine's steps
        if weights not in WEIGHT_MODES:
            raise InvalidInputError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
        if weights != "fp32" and not fast:
            raise InvalidInputError("quantised weights need the fast decode path (fast=True)")
        self.weights = weights
        self._compressors: dict[str, Any] = {}  # built on first use (an encoder load is not a request's cost)
        self.fast: FastDecoder | None = None
        self.fast_fallback_reason: str | None = None
        if fast:
            try:
                self.fast = FastDecoder(model, weights=weights)
            except FastPathUnsupported as exc:
                self.fast_fallback_reason = str(exc)
                logger.warning("fast decode path unavailable (%s); decoding through the HF model", exc)
        self.kernel_choice: KernelChoice | None = None
        self.thread_choice: ThreadChoice | None = None  # set by ``load`` where it measured the thread count
        self.prefill_dtype = self._resolve_prefill(prefill)
        self.prefill_model = prefill_model(model, self.prefill_dtype)
        self.kv_choice: DecodeChoice | None = None
        self._resolve_kv(kv_cache)

    def _fingerprint(self) -> str:
        return self.source.fingerprint if self.source is not None else f"unsourced-{id(self.model)}"

    def _resolve_kv(self, kv_cache: str) -> None:
        """The decode cache's dtype: asked for, or (``auto``) the per-host measured choice for quantised modes.

        fp32 weights always decode over an fp32 cache (HF's exact tokens); the HF decode path keeps HF's cache.
        """
        if kv_cache not in KV_CHOICES:
            raise InvalidInputError(f"kv_cache must be one of {', '.join(KV_CHOICES)}, got {kv_cache!r}")
        if self.fast is None or self.weights == "fp32":
            if kv_cache not in ("auto", "float32"):
                raise InvalidInputError(f"a {kv_cache} KV cache needs int8 or int4 weights on the fast decode path")
            return
        if kv_cache == "auto":
            self.kv_choice = choose_kv(self.fast, self._fingerprint(), self.threads)
            kv_cache = self.kv_choice.kv_dtype
        self.fast.kv_dtype = getattr(torch, kv_cache)

    def _resolve_prefill(self, prefill: str) -> str:
        """The prefill precision: asked for, or (``auto``) the per-host measured choice for quantised modes.

        fp32 weights keep an fp32 prefill under ``auto``: that mode's contract is HF's exact tokens. A
        lower-precision prefill needs the fast decode path, which converts its KV into the decode cache's
        dtype (HF's own decode would mix a bf16 cache with fp32 weights).
        """
        if prefill not in PREFILL_CHOICES:
            raise InvalidInputError(f"prefill must be one of {', '.join(PREFILL_CHOICES)}, got {prefill!r}")
        lowerable = self.fast is not None and self.dtype == "float32" and self.device.type == "cpu"
        if prefill == "auto":
            if not lowerable or self.weights == "fp32":
                return self.dtype
            self.kernel_choice = choose_prefill(self.model, self._fingerprint(), self.threads)
            return self.kernel_choice.prefill_dtype
        if prefill != self.dtype and not lowerable:
            raise InvalidInputError(
                f"a {prefill} prefill needs an fp32 model on CPU with the fast decode path "
                f"(model is {self.dtype} on {self.device}, decode path {self.decode_path})"
            )
        return prefill

    @property
    def profile_dtype(self) -> str:
        """The dtype a time profile is keyed by: the model's, plus the prefill's and the decode cache's where they
        differ from it (each changes the timings the profile fits)."""
        key = self.dtype
        if self.prefill_dtype != self.dtype:
            key += f"+prefill-{self.prefill_dtype}"
        kv = str(self.fast.kv_dtype).removeprefix("torch.") if self.fast is not None else self.dtype
        if kv != self.dtype:
            key += f"+kv-{kv}"
        return key

    def kernels_summary(self) -> str:
        """One line: the prefill precision and decode KV dtype this engine runs, and whether each was measured."""

        def how(choice: Any) -> str:
            if choice is None:
                return "fixed"
            timings = ", ".join(f"{k} {v:.1f} ms" for k, v in choice.timings_ms.items())
            return f"measured here: {timings}; {choice.reason}"

        kv = str(self.fast.kv_dtype).removeprefix("torch.") if self.fast is not None else "HF cache"
        return (
            f"kernels: weights {self.weights} ({self.decode_path}), prefill {self.prefill_dtype} "
            f"({how(self.kernel_choice)}), KV cache {kv} ({how(self.kv_choice)}), threads {self.threads} "
            f"({how(self.thread_choice)}); CPU: {cpu_capability()}"
        )

    @property
    def decode_path(self) -> str:
        """Which decode implementation runs: ``fast-fp32``, ``fast-int8`` or ``hf``."""
        return f"fast-{self.weights}" if self.fast is not None else "hf"

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        warmup: bool = True,
        device: str | None = None,
        fast: bool = True,
        weights: str = "fp32",
        prefill: str = "auto",
        kv_cache: str = "auto",
    ) -> Engine:
        """Load ``model`` (None = embedded SmolLM2-135M-Instruct) on ``device`` (default CPU) and warm it up.

        The warm-up (one short prefill and a few decode steps) pays one-off allocation costs now,
        so no request pays them inside its time budget, and seeds the deadline guard's step time.
        """
        fixed = int(threads) if threads else None  # None (or 0): measured below, once per host
        if fixed is not None and fixed < 1:
            raise InvalidInputError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(fixed or usable_cpus())  # the load itself runs on every CPU
        source = resolve_model(model)
        hf_model, tokenizer = load_model_and_tokenizer(source)
        if device is not None and torch.device(device).type != "cpu":
            hf_model = hf_model.to(device)
        thread_choice = None if fixed or hf_model.device.type != "cpu" else choose_threads(hf_model, source.fingerprint)
        threads = fixed or (thread_choice.threads if thread_choice is not None else usable_cpus())
        torch.set_num_threads(threads)
        engine = cls(
            hf_model,
            tokenizer,
            source,
            threads,
            fast=fast and hf_model.device.type == "cpu",
            weights=weights,
            prefill=prefill,
            kv_cache=kv_cache,
        )
        engine.thread_choice = thread_choice
        if warmup:
            engine.warmup()
        return engine

    def use_in_this_thread(self) -> None:
        """Call first in a thread that will run this engine (a server's model thread).

        With torch's OpenMP backend the intra-op thread count is a per-thread setting: a new thread
        would otherwise use the OpenMP default (all cores), not ``self.threads``.
        """
        torch.set_num_threads(self.threads)

    def warmup(self) -> None:
        ids = self.tokenizer.encode("Warm-up: the quick brown fox jumps over the lazy dog. " * 4)
        state = self.prefill(ids, press="snapkv", capture=True)
        self.evict(state, 0.5)
        self.decode(state, max_new_tokens=4)

    def _stop_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(i) for i in eos)
        # Chat models end a turn with an end-of-turn marker that GGUF metadata may not list as EOS.
        for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            tid = self.tokenizer.convert_tokens_to_ids(marker)
            if isinstance(tid, int) and tid >= 0 and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        if not ids and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # ------------------------------------------------------------------ tokenising
    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids for ``prompt``; with ``chat`` the model's chat template wraps it as a user turn."""
        return self.tokenize(self.render(prompt, chat=chat))

    def encode_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids for a chat (``[{"role": "user", "content": "..."}, ...]``) through the chat template.

        What an OpenAI-style client sends. A single user message gives exactly :meth:`encode`'s ids, so
        length predictors trained on single prompts see the same thing. Models without a chat template get
        the contents joined by blank lines.
        """
        return self.tokenize(self.render(messages))

    def render(self, prompt: str | Sequence[Mapping[str, Any]], chat: bool = True) -> RenderedPrompt:
        """The text the model reads for a prompt or a chat, before tokenising (validated, not length-checked).

        Prompt compression reads it too: it needs the text and which parts of it are the turns' contents.
        """
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidInputError("The prompt is empty; give some text to answer.")
            turns = [{"role": "user", "content": prompt}]
            if not (chat and getattr(self.tokenizer, "chat_template", None)):
                return RenderedPrompt(prompt, True, tuple(turns))
        else:
            turns = _check_messages(prompt)
            if not getattr(self.tokenizer, "chat_template", None):
                return RenderedPrompt("\n\n".join(t["content"] for t in turns), True, tuple(turns))
        text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return RenderedPrompt(text, False, tuple(turns))

    def tokenize(self, rendered: RenderedPrompt, check: bool = True) -> list[int]:
        """The ids of a rendered prompt (``check``: refuse one that does not fit the context)."""
        ids = list(self.tokenizer.encode(rendered.text, add_special_tokens=rendered.add_special_tokens))
        if check:
            self.check_fits(len(ids))
        return ids

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt >= self.context_length:
            raise PromptTooLongError(
                f"The prompt has {n_prompt} tokens but the model's context holds {self.context_length} "
                f"(prompt plus at least one generated token must fit). Shorten the prompt."
            )

    # ------------------------------------------------------------------ the three phases
    @torch.inference_mode()
    def prefill(
        self,
        input_ids: list[int],
        press: str = "snapkv",
        capture: bool = True,
        t_start: float | None = None,
        capture_hidden: bool = False,
    ) -> PrefillState:
        """Run the prompt forward, produce the first token, and (optionally) record eviction scores.

        ``capture`` records SnapKV scores during the forward; it is only needed if the request may
        evict (the facade always passes True because α* is unknown until after prefill).
        ``capture_hidden`` keeps the final-norm hidden state of the last prompt token in
        ``state.last_hidden``: the zero-overhead length probe reads it (the forward computes
        it anyway; a hook just keeps a reference to one row).
        """
        t_start = time.perf_counter() if t_start is None else t_start
        if not input_ids:
            raise InvalidInputError("The prompt is empty; give some text to answer.")
        self.check_fits(len(input_ids))
        press_obj = make_press(press)
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        cache = DynamicCache()
        hidden: dict[str, torch.Tensor] = {}
        hook = None
        if capture_hidden:
            hook = self.prefill_model.model.norm.register_forward_hook(
                lambda _m, _i, out: hidden.__setitem__("last", out[0, -1].float())
            )
        t0 = time.perf_counter()
        try:
            if capture and scores_need_prefill(press_obj):
                with capture_scores(self.prefill_model, press_obj) as scores:
                    out = self.prefill_model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                scores = dict(scores)
            else:
                out = self.prefill_model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                scores = None
        finally:
            if hook is not None:
                hook.remove()
        first = int(out.logits[0, -1].argmax())
        prefill_s = time.perf_counter() - t0
        state = PrefillState(
            cache=cache,
            prompt_tokens=len(input_ids),
            prompt_kv_len=len(input_ids),
            first_token=first,
            scores=scores,
            t_start=t_start,
            prefill_s=prefill_s,
            press_name=press,
            first_logits=out.logits[0, -1].float(),
            last_hidden=hidden.get("last"),
        )
        return state

    @torch.inference_mode()
    def evict(self, state: PrefillState, alpha: float) -> int:
        """Evict a further fraction ``alpha`` of the prompt KV still cached; returns prompt KV kept.

        Called once after prefill by the paper's method, and again mid-decode by re-planning (each
        call removes ``alpha`` of what is left of the prompt, never generated tokens).
        """
        alpha = check_alpha(alpha)
        if alpha == 0.0 or state.prompt_kv_len <= 1:
            return state.prompt_kv_len
        t0 = time.perf_counter()
        press_obj = make_press(state.press_name)
        scores = state.scores
        cache = state.static.as_layers() if state.static is not None else state.cache
        if scores is None or not scores_need_prefill(press_obj):
            scores = score_from_cache(self.prefill_model, press_obj, cache, state.prompt_kv_len, alpha)
        if state.static is not None:
            state.prompt_kv_len, state.scores = state.static.evict_prompt(scores, state.prompt_kv_len, alpha)
        else:
            state.prompt_kv_len, state.scores = evict(self.prefill_model, cache, scores, state.prompt_kv_len, alpha)
        self.synchronize()  # pruning is asynchronous on a GPU: time the work, not its launch
        state.alpha = 1.0 - (1.0 - state.alpha) * (1.0 - alpha)
        state.evict_s += time.perf_counter() - t0
        return state.prompt_kv_len

    @torch.inference_mode()
    def decode(
        self,
        state: PrefillState,
        max_new_tokens: int,
        deadline_s: float | None = None,
        sampling: SamplingConfig | None = None,
        on_step: Callable[[int, float, PrefillState], None] | None = None,
        on_token: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> DecodeOutcome:
        """Decode after prefill (and any eviction) until EOS, ``max_new_tokens``, the deadline or a stop.

        The deadline guard stops *before* a step whose expected end (now + :attr:`guard` factor × the longest of the
        last 4 steps) would pass ``t_start + deadline_s``. ``on_step(i, now, state)`` runs between tokens (the
        re-planning hook); it may call :meth:`evict`. ``on_token(token_id)`` runs as each token is
        produced (streaming; the end-of-turn token included). ``should_stop()`` is asked between tokens;
        True ends decoding with ``stop_reason="cancelled"`` (a server whose client went away frees the
        model at the next token instead of finishing an answer nobody reads).
        """
        started_at = time.perf_counter()
        kv_per_layer = state.kv_tokens_per_layer()
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        deadline_s = validate_deadline(deadline_s)
        sampling = sampling or SamplingConfig()
        tokens: list[int] = []
        times: list[float] = []
        steps: list[float] = []

        def outcome(stop: str) -> DecodeOutcome:
            return DecodeOutcome(tokens, times, steps, stop, kv_per_layer, started_at, time.perf_counter())

        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        deadline_at = math.inf if deadline_s is None else state.t_start + deadline_s
        max_new_tokens = min(max_new_tokens, self.context_length - state.prompt_tokens)

        now = time.perf_counter()
        if now > deadline_at:  # prefill alone overran: the first token is already late
            return outcome(STOP_DEADLINE)
        if should_stop is not None and should_stop():
            return outcome(STOP_CANCELLED)
        if sampling.temperature > 0:
            first = _sample(state.first_logits, sampling, generator)
        else:
            first = state.first_token
        tokens.append(first)
        times.append(now - state.t_start)
        if on_token is not None:
            on_token(first)
        if first in self.stop_ids:
            return outcome(STOP_EOS)

        stop_ids = self.stop_ids
        self.begin_decode(state, max_new_tokens)
        position = state.prompt_tokens  # RoPE position of the next input token (original numbering)
        recent = deque([self.last_step_s], maxlen=GUARD_WINDOW)  # step durations the guard expects from
        margin = self.guard.factor()  # fixed for the request
        token = first
        stop = STOP_MAX_TOKENS
        for i in range(1, max_new_tokens):
            if on_step is not None:
                on_step(i, now, state)
            if should_stop is not None and should_stop():
                stop = STOP_CANCELLED
                break
            start = time.perf_counter()  # fresh: the hooks above (a re-planning eviction) took time too
            expected = max(recent)
            if start + margin * expected > deadline_at:
                stop = STOP_DEADLINE
                break
            logits = self.decode_step(state, token, position)
            nxt = int(logits.argmax()) if generator is None else _sample(logits, sampling, generator)
            now = time.perf_counter()
            step = now - start
            self.guard.observe(step, expected)
            recent.append(step)
            steps.append(step)
            tokens.append(nxt)
            times.append(now - state.t_start)
            if on_token is not None:
                on_token(nxt)
            if nxt in stop_ids:
                stop = STOP_EOS
                break
            position += 1
            token = nxt
        if steps:
            self.last_step_s = steps[-1]
        return outcome(stop)

    def begin_decode(self, state: PrefillState, max_new_tokens: int) -> None:
        """Move the (evicted) prefill KV into the fast path's static cache, sized for this request.

        Called by :meth:`decode`; the profiler calls it too, so both time the same step. A no-op on
        the HF path or when already done.
        """
        if self.fast is None or state.static is not None:
            return
        layers = state.cache.layers
        capacity = int(layers[0].keys.shape[2]) + max_new_tokens + 1
        state.static = self.fast.new_cache([x.keys for x in layers], [x.values for x in layers], capacity)
        state.cache = DynamicCache()  # the static cache is the only copy now; free the old tensors

    @torch.inference_mode()
    def decode_step(self, state: PrefillState, token: int, position: int) -> torch.Tensor:
        """One decode forward: feed ``token`` at RoPE ``position``, append its KV to the request's cache.

        The single code path of a decode step: :meth:`decode` loops over it and the estimator's
        profiler times it, so the profiled step *is* the production step. Returns the next-token
        logits (shape ``(vocab,)``). Reading them (``argmax`` → ``int``) waits for a GPU to finish.
        Call :meth:`begin_decode` first.
        """
        if state.static is not None:
            return self.fast.step(state.static, token, position)
        cache = state.cache
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        pos = torch.tensor([[position]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
        return out.logits[0, -1]

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU), so a clock read after it times the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ one call
    def generate(
        self,
        prompt: str | list[int],
        alpha: float = 0.0,
        max_new_tokens: int = 256,
        deadline_s: float | None = None,
        press: str = "snapkv",
        chat: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        prompt_compression: float = 0.0,
        compressor: str = DEFAULT_COMPRESSOR,
        question: str | None = None,
        t_start: float | None = None,
    ) -> GenerationResult:
        """Answer ``prompt`` with a fixed eviction ratio ``alpha`` and an optional hard deadline.

        ``prompt_compression`` (ρ) removes that fraction of the prompt's tokens with ``compressor`` before
        prefill (``question``: the part of the prompt that is the request, kept and scored against; default
        its last line). Its time counts from the request's start like everything else. ``t_start`` (a
        ``time.perf_counter()`` reading, default now) is when the request started: a caller that planned
        first passes its own start, so the deadline and every timestamp count the planning too.
        """
        t_start = time.perf_counter() if t_start is None else t_start
        validate_request(prompt, alpha, max_new_tokens, deadline_s, press, prompt_compression, compressor)
        sampling = SamplingConfig(temperature, top_p, seed)
        compressed = None
        if prompt_compression > 0:
            compressed = self.compress(prompt, prompt_compression, compressor, chat=chat, question=question)
            ids = list(compressed.ids)
        else:
            ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        state = self.prefill(ids, press=press, capture=alpha > 0, t_start=t_start)
        self.evict(state, alpha)
        result = self.make_result(state, self.decode(state, max_new_tokens, deadline_s, sampling), deadline_s)
        return with_compression(result, compressed)

    def compressor(self, name: str) -> Any:
        """The prompt compressor called ``name`` for this engine, built and warmed up once."""
        check_compressor(name)
        if name not in self._compressors:
            from timebill.compression import make_compressor

            built = make_compressor(name, self.model)
            built.warmup()
            self._compressors[name] = built
        return self._compressors[name]

    def compress(
        self,
        prompt: str | Sequence[Mapping[str, Any]],
        rho: float,
        compressor: str = DEFAULT_COMPRESSOR,
        *,
        chat: bool = True,
        question: str | None = None,
    ) -> Any:
        """Remove about ``rho`` of ``prompt``'s tokens before prefill → ``CompressedPrompt`` (kept ids, ρ reached).

        The layout (what may be removed) is built inside the timed part: it is on the request's path.
        A prompt longer than the context is accepted if the kept tokens fit (``gemfilter`` reads the whole
        prompt with the model, so for it the original must fit).
        """
        from timebill.compression import prompt_layout

        rho = check_prompt_compression(rho)
        engine_compressor = self.compressor(compressor)
        t0 = time.perf_counter()
        layout = prompt_layout(self, prompt, chat=chat, question=question)
        if compressor == "gemfilter":
            self.check_fits(layout.n_tokens)
        out = engine_compressor.compress(layout, rho)
        out = dataclasses.replace(out, compress_s=time.perf_counter() - t0)
        self.check_fits(out.kept_tokens)
        return out

    def make_result(self, state: PrefillState, decoded: DecodeOutcome, deadline_s: float | None) -> GenerationResult:
        """The result of a finished request (also built by the TimeBill facade around its own decode)."""
        tokens = decoded.token_ids
        return GenerationResult(
            text=self.tokenizer.decode([t for t in tokens if t not in self.stop_ids], skip_special_tokens=True),
            token_ids=tokens,
            prompt_tokens=state.prompt_tokens,
            kept_kv_tokens=state.prompt_kv_len,
            kv_tokens_per_layer=decoded.kv_tokens_per_layer,
            alpha=state.alpha,
            press=state.press_name,
            prefill_s=state.prefill_s,
            evict_s=state.evict_s,
            decode_s=decoded.decode_s,
            total_s=decoded.ended_at - state.t_start,
            token_times_s=decoded.token_times_s,
            step_times_s=decoded.step_times_s,
            stop_reason=decoded.stop_reason,
            deadline_s=deadline_s,
            threads=self.threads,
            model_id=self.source.model_id if self.source is not None else "?",
            decode_path=self.decode_path,
        )


def with_compression(result: GenerationResult, compressed: Any) -> GenerationResult:
    """``result`` with the prompt compression that preceded its prefill recorded (None: none ran)."""
    if compressed is None:
        return result
    return dataclasses.replace(
        result,
        original_prompt_tokens=compressed.original_tokens,
        prompt_compression=compressed.reached,
        compressor=compressed.compressor,
        compress_s=compressed.compress_s,
    )


def _sample(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
