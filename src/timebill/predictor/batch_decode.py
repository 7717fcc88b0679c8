"""Batched greedy decoding of many prompts for their response lengths (the labeller's engine).

:class:`ContinuousBatch` refills rows as responses end; :func:`generate_lengths` (``model.generate`` on
static batches) is the baseline it is measured against, and :func:`compare_with_engine` its agreement.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from timebill.cpulock import Hold, unlocked
from timebill.engine import STOP_EOS, STOP_MAX_TOKENS, Engine
from timebill.errors import PredictorError


def pad_id(engine: Engine) -> int:
    """The id padded columns hold: the generation config's pad token, else the tokenizer's, else a stop token."""
    pad = getattr(engine.model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = engine.tokenizer.pad_token_id
    if pad is None:
        pad = min(engine.stop_ids)
    return int(pad[0] if isinstance(pad, list) else pad)


@torch.inference_mode()
def generate_lengths(engine: Engine, batch: Sequence[Sequence[int]], cap_tokens: int) -> list[tuple[int, str]]:
    """Greedy (length, stop reason) per prompt of ``batch`` with ``model.generate`` on one static batch.

    The baseline :class:`ContinuousBatch` is measured against (slower: every row waits for the longest).
    """
    if not batch:
        return []
    longest = max(len(ids) for ids in batch)
    if longest + cap_tokens > engine.context_length:
        raise PredictorError(
            f"A prompt of {longest} tokens plus {cap_tokens} new tokens exceeds the model's context "
            f"({engine.context_length}); keep prompts to at most {engine.context_length - cap_tokens} tokens."
        )
    pad = pad_id(engine)
    input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, longest - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, longest - len(ids) :] = 1
    output = engine.model.generate(
        input_ids=input_ids.to(engine.device),
        attention_mask=attention_mask.to(engine.device),
        do_sample=False,
        num_beams=1,
        max_new_tokens=cap_tokens,
        eos_token_id=sorted(engine.stop_ids),
        pad_token_id=pad,
    )
    results = []
    stop_ids = engine.stop_ids
    for row in output[:, longest:].tolist():
        first_stop = next((i for i, token in enumerate(row) if token in stop_ids), None)
        if first_stop is None:
            results.append((len(row), STOP_MAX_TOKENS))  # len(row) == cap_tokens here
        else:
            results.append((first_stop + 1, STOP_EOS))
    return results


class _SlabLayer(DynamicLayer):
    """A KV cache layer in a preallocated slab: a decode step writes one column in place.

    ``DynamicLayer`` concatenates (copies) the whole cache on every step, which at batch 16 and a few
    thousand KV columns moves more bytes than the model's matmuls do.
    """

    spare_columns = 256

    def __init__(self) -> None:
        super().__init__()
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._length = 0

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents (after rows were dropped or stacked), with spare columns to grow into."""
        batch, heads, length, dim = keys.shape
        self._keys = keys.new_empty((batch, heads, length + self.spare_columns, dim))
        self._values = values.new_empty((batch, heads, length + self.spare_columns, values.shape[-1]))
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self._length = length
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self._keys is None:
            self.assign(key_states, value_states)
            return self.keys, self.values
        if self._length + new > self._keys.shape[-2]:
            self.assign(self.keys, self.values)
        self._keys[:, :, self._length : self._length + new] = key_states
        self._values[:, :, self._length : self._length + new] = value_states
        self._length += new
        self.keys, self.values = self._keys[:, :, : self._length], self._values[:, :, : self._length]
        return self.keys, self.values


def _slab_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = _SlabLayer
    return cache


_GROUPED_ATTENTION = "timebill_grouped_sdpa"


def _grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """SDPA for one-token decode steps: no K/V copy for grouped-query attention, no padding read.

    HF's SDPA path with a padding mask repeats each KV head for its query heads (a full copy of the
    cache, x3 for SmolLM2) on every step. For a single query token the query heads that share a KV head
    can instead be laid out as that head's "query positions": same arithmetic, no copy.

    Every row of a :class:`ContinuousBatch` attends to a contiguous suffix of the cache (rows are
    right-aligned; padding is on the left), and the batch is as wide as its longest row, so a masked
    batched call reads every row's padding too: about half of all K/V bytes in a labelling run, and K/V
    reads are most of a step at batch 32. So each row attends to its own suffix only (one small call
    per row); a mask of any other shape falls back to the masked batched call.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], groups, dim)  # query head h uses KV head h // groups
    sdpa = torch.nn.functional.scaled_dot_product_attention
    starts = _suffix_starts(attention_mask, key.shape[-2])
    if starts is None:
        out = sdpa(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    elif not any(starts):  # no padding at all
        out = sdpa(grouped, key, value, scale=scaling)
    else:
        out = torch.empty_like(grouped)
        for row, start in enumerate(starts):
            span = slice(row, row + 1)
            out[span] = sdpa(grouped[span], key[span, :, start:], value[span, :, start:], scale=scaling)
    return out.reshape(batch, 1, heads, dim), None


def _suffix_starts(attention_mask: torch.Tensor | None, width: int) -> list[int] | None:
    """First attended column of each row when every row attends to a contiguous suffix; else None."""
    if attention_mask is None:  # nothing masked: the batched call is already exact
        return None
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[-2] != 1:
        return None
    valid = attention_mask[:, 0, 0]  # (batch, width): what the single query position may attend to
    first = valid.to(torch.uint8).argmax(-1)
    if not bool((valid.sum(-1) + first == width).all()):
        return None
    return first.tolist()


AttentionInterface.register(_GROUPED_ATTENTION, _grouped_sdpa)
AttentionMaskInterface.register(_GROUPED_ATTENTION, sdpa_mask)


@contextmanager
def _grouped_decode_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``model`` to :func:`_grouped_sdpa` while labelling; restores its attention after."""
    previous = model.config._attn_implementation
    if previous != "sdpa":  # only SDPA has a grouped twin here; leave other implementations alone
        yield
        return
    model.set_attn_implementation(_GROUPED_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class ContinuousBatch:
    """Greedy decoding of up to ``max_rows`` prompts at once, refilling rows as responses end.

    ``model.generate`` on a static batch runs until its *longest* response ends, so one response
    that runs to the cap keeps every finished row in the batch computing padding for up to
    ``cap`` steps. Here a finished row is marked dead and new prompts take its slot when a quarter
    of the rows are free: the joiners are prefilled on their own left-padded batch and their KV is
    written, right-aligned, into the dead slots of the running cache (only those rows are copied).
    The whole cache is copied only when it must grow wider than a joiner's prompt, when its leading
    columns have become padding in every row (trim), or when most rows are dead at the end of the
    queue (compaction) — at batch 32 and ~1k KV columns a full copy costs as much as a decode step,
    and compacting on every finished response used to take half the labelling time.
    The attention mask hides every padding column and dead rows see only their newest columns, and
    each row's RoPE positions are its own, so a live row sees exactly its prompt and its own tokens.
    """

    trim_fraction = 0.25  # trim leading all-padding columns once they are this share of the width

    def __init__(self, engine: Engine, cap_tokens: int, max_rows: int) -> None:
        self.engine = engine
        self.cap_tokens = cap_tokens
        self.max_rows = max_rows
        self.refill_rows = max(1, max_rows // 4)
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # rows x KV columns, 1 = real token
        self.slots: list[list | None] = []  # per physical row: [payload, prompt_tokens, generated] or None (dead)
        self.positions = torch.zeros((0,), dtype=torch.long)  # RoPE position of each row's next token
        self.next_tokens = torch.zeros((0,), dtype=torch.long)
        self.stop_ids = torch.tensor(sorted(engine.stop_ids), dtype=torch.long)

    @property
    def rows(self) -> list[list]:
        """The live rows (responses still being generated)."""
        return [row for row in self.slots if row is not None]

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.rows)

    def wants_prompts(self) -> bool:
        return not self.rows or self.free_rows >= self.refill_rows

    @torch.inference_mode()
    def add(self, prompts: Sequence[tuple[object, Sequence[int]]]) -> list[tuple[object, int, str]]:
        """Prefill ``(payload, token ids)`` prompts into free rows; returns rows that ended at once."""
        prompts = list(prompts)[: self.free_rows]
        if not prompts:
            return []
        longest = max(len(ids) for _, ids in prompts)
        if longest + self.cap_tokens > self.engine.context_length:
            raise PredictorError(
                f"A prompt of {longest} tokens plus {self.cap_tokens} new tokens exceeds the model's "
                f"context ({self.engine.context_length}); keep prompts shorter."
            )
        pad = pad_id(self.engine)
        input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, (_, ids) in enumerate(prompts):
            input_ids[row, longest - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, longest - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _slab_cache()
        out = self.engine.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        first = out.logits[:, -1].argmax(-1)
        rows = [[payload, len(ids), 1] for payload, ids in prompts]
        self._place(cache, mask, rows, first)
        return self._retire()

    def _place(self, cache: DynamicCache, mask: torch.Tensor, rows: list[list], first: torch.Tensor) -> None:
        """Put freshly prefilled rows into dead slots (in place), the rest at the bottom (one copy)."""
        if self.cache is None or not self.rows:  # nothing running: the new batch is the batch
            self.cache, self.mask, self.slots, self.next_tokens = cache, mask, list(rows), first
            self.positions = torch.tensor([p for _, p, _ in rows], dtype=torch.long)
            return
        if mask.shape[1] > self.mask.shape[1]:  # joiners longer than the running width: widen (copy)
            self._reassign(columns=mask.shape[1])
        width = self.mask.shape[1]
        dead = [i for i, row in enumerate(self.slots) if row is None][: len(rows)]
        n_in = len(dead)
        if n_in:
            slot = torch.tensor(dead, dtype=torch.long)
            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                for big, small in ((old._keys, new.keys[:n_in]), (old._values, new.values[:n_in])):
                    block = big.new_zeros((n_in, *big.shape[1:2], width, big.shape[-1]))
                    block[:, :, width - small.shape[-2] :] = small
                    big[slot, :, :width] = block
            block = self.mask.new_zeros((n_in, width))
            block[:, width - mask.shape[1] :] = mask[:n_in]
            self.mask[slot] = block
            self.next_tokens[slot] = first[:n_in]
            self.positions[slot] = torch.tensor([p for _, p, _ in rows[:n_in]], dtype=torch.long)
            for i, row in zip(dead, rows[:n_in], strict=True):
                self.slots[i] = row
        if n_in < len(rows):  # more joiners than dead slots: stack them under the batch
            rest = slice(n_in, len(rows))
            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                keys, values = _left_pad(new.keys[rest], width), _left_pad(new.values[rest], width)
                old.assign(torch.cat([old.keys, keys]), torch.cat([old.values, values]))
            self.mask = torch.cat([self.mask, _left_pad(mask[rest], width)])
            self.next_tokens = torch.cat([self.next_tokens, first[rest]])
            self.positions = torch.cat([self.positions, torch.tensor([p for _, p, _ in rows[rest]], dtype=torch.long)])
            self.slots += rows[rest]
        self._maybe_trim()

    def _reassign(self, columns: int | None = None, keep: torch.Tensor | None = None, start: int = 0) -> None:
        """One full copy of the cache: keep rows ``keep``, drop columns before ``start``, pad to ``columns``."""
        index = keep if keep is not None else torch.arange(self.mask.shape[0])
        width = max(columns or 0, self.mask.shape[1] - start)
        for layer in self.cache.layers:
            layer.assign(
                _left_pad(layer.keys[index, :, start:], width), _left_pad(layer.values[index, :, start:], width)
            )
        self.mask = _left_pad(self.mask[index, start:], width)
        self.next_tokens = self.next_tokens[index]
        self.positions = self.positions[index]
        self.slots = [self.slots[i] for i in index.tolist()]
        for i, row in enumerate(self.slots):
            if row is None:  # a trim may have cut a dead row's last visible column
                self.mask[i, -1] = 1

    def _maybe_trim(self) -> None:
        live = [i for i, row in enumerate(self.slots) if row is not None]
        if not live:
            return
        first_real = int(self.mask[live].argmax(-1).min())
        if first_real > self.trim_fraction * self.mask.shape[1]:
            self._reassign(start=first_real)

    @torch.inference_mode()
    def step(self) -> list[tuple[object, int, str]]:
        """One decode step for every row; returns the rows whose response ended."""
        if not self.rows:
            return []
        self.mask = torch.cat([self.mask, torch.ones((self.mask.shape[0], 1), dtype=torch.long)], dim=1)
        out = self.engine.model(
            input_ids=self.next_tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.next_tokens = out.logits[:, -1].argmax(-1)
        self.positions += 1
        for row in self.slots:
            if row is not None:
                row[2] += 1
        return self._retire()

    def _retire(self) -> list[tuple[object, int, str]]:
        stopped = torch.isin(self.next_tokens, self.stop_ids).tolist()
        finished = []
        for i, (row, is_stop) in enumerate(zip(self.slots, stopped, strict=True)):
            if row is None:
                continue
            payload, _, generated = row
            if is_stop or generated >= self.cap_tokens:
                finished.append((payload, generated, STOP_EOS if is_stop else STOP_MAX_TOKENS))
                self.slots[i] = None
                # A dead row keeps computing until its slot is reused; it attends to its newest
                # column only (never to an all-masked row, which would give NaN scores).
                self.mask[i] = 0
                self.mask[i, -1] = 1
        live = [i for i, row in enumerate(self.slots) if row is not None]
        if finished and len(live) < len(self.slots) // 2:  # mostly dead (the queue ran dry): compact
            if live:
                self._reassign(keep=torch.tensor(live, dtype=torch.long))
                self._maybe_trim()
            else:
                self.slots, self.cache = [], None
        return finished


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a KV block (rows, heads, columns, dim) or a mask (rows, columns) with zeros to ``width`` columns."""
    axis = -2 if t.dim() == 4 else -1
    missing = width - t.shape[axis]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def iter_continuous(
    engine: Engine,
    prompts: Sequence[tuple[object, Sequence[int]]],
    cap_tokens: int,
    max_rows: int,
    hold: Hold | None = None,
    steps_per_hold: int = 32,
) -> Iterator[list[tuple[object, int, str]]]:
    """Run ``(payload, token ids)`` prompts through a :class:`ContinuousBatch`, in the given order.

    Yields the ``(payload, length, stop_reason)`` of the responses that ended during each chunk of at
    most ``steps_per_hold`` decode steps; ``hold()`` (e.g. a CPU lock) is held during each chunk only.
    """
    batch = ContinuousBatch(engine, cap_tokens, max_rows)
    queue = list(reversed(prompts))  # pop() from the end = take in order
    hold = hold or unlocked
    with _grouped_decode_attention(engine.model):
        yield from _drive(batch, queue, hold, steps_per_hold)


def _drive(
    batch: ContinuousBatch, queue: list, hold: Hold, steps_per_hold: int
) -> Iterator[list[tuple[object, int, str]]]:
    while queue or batch.rows:
        finished: list[tuple[object, int, str]] = []
        with hold():
            if queue and batch.wants_prompts():
                joining = [queue.pop() for _ in range(min(batch.free_rows, len(queue)))]
                finished += batch.add(joining)
            for _ in range(steps_per_hold):
                if not batch.rows or (queue and batch.wants_prompts()):
                    break
                finished += batch.step()
        if finished:
            yield finished


def compare_with_engine(
    engine: Engine, prompts: Sequence[str], cap_tokens: int, max_rows: int
) -> tuple[float, list[tuple[int, int]]]:
    """Agreement of continuous-batch lengths with ``engine.generate`` (single stream): (rate, pairs).

    Batched fp32 arithmetic differs from single-stream arithmetic in the last bits (padding changes the
    shapes of the matrix products), and greedy decoding turns a rare near-tie between the top two tokens
    into a different continuation, so a small fraction of batched lengths can differ from
    ``engine.generate``'s; this measures how many.
    """
    items = [(i, engine.encode(p)) for i, p in enumerate(prompts)]
    batched: dict[int, int] = {}
    for finished in iter_continuous(engine, items, cap_tokens, max_rows):
        batched.update({i: n for i, n, _ in finished})
    single = [engine.generate(p, max_new_tokens=cap_tokens).tokens_generated for p in prompts]
    pairs = [(batched[i], n) for i, n in enumerate(single)]
    return sum(a == b for a, b in pairs) / max(1, len(pairs)), pairs
