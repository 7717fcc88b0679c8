"""Estimator profiles on disk: what was measured, on what setup, and whether it still applies.

A profile is only valid for the setup it was measured on: the time per token depends on the model,
its dtype, the thread count, the eviction method and the hardware. The profile therefore stores a
:class:`ProfileKey`, and :func:`find_profile` refuses (``ProfileError``) a profile whose key differs on
any of those, because a silently wrong time model makes the deadline guarantee meaningless. Library
versions only warn: an upgrade can shift speed a little, but refusing to run after every ``pip install``
would train users to delete profiles blindly.

Files are JSON (human-inspectable, diffable) with a schema version, written atomically so a crash or a
concurrent reader never sees a half-written profile.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from timebill.errors import InvalidInputError, ProfileError
from timebill.estimator.fit import Fit, fit_from_dict
from timebill.paths import cache_dir, finite_or_none, fsync_dir

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
VERSIONED_PACKAGES = ("torch", "transformers", "kvpress", "timebill")
# Fields whose mismatch makes a profile unusable; the rest (versions, host) only warn.
HARD_KEY_FIELDS = ("model_id", "model_sha", "dtype", "threads", "press", "device", "decode_path")


def _package_version(name: str) -> str:
    """Installed version without importing the package (importing torch just to key a file is slow)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "timebill":  # running from a source tree without an install
            from timebill import __version__

            return __version__
        return "absent"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose kernels or code paths affect timings."""
    return {name: _package_version(name) for name in VERSIONED_PACKAGES}


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or a platform fallback off Linux."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return " ".join(name.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_signature(cpuinfo: str | None = None) -> str:
    """The CPU model name plus the family, model and stepping numbers that /proc/cpuinfo gives on x86.

    Why not the name alone: a VM often shows a generic name ("AMD EPYC") that CPU generations two to
    three times apart in speed share, and timings measured on one must not pass for the other's.
    ``cpuinfo`` is the file's text (read here when None).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block describes them all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if fields.get(k)]
    name = " ".join(fields.get("model name", "").split()) or cpu_model_name()
    return f"{name} ({', '.join(numbers)})" if numbers else name


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _total_ram_gib() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (AttributeError, OSError, ValueError):
        return 0


def host_fingerprint() -> str:
    """Identify the hardware, not the machine's name: CPU signature, usable cores, RAM in whole GiB.

    The hostname is deliberately NOT used: containers and CI runners get a random hostname on every
    start, which would invalidate a profile measured on identical hardware. Cores are the ones this
    process may run on (the cpuset), since that is what a container actually gets.
    """
    return f"cpu={cpu_signature()};cores={usable_cpus()};ram_gib={_total_ram_gib()}"


def device_string(device: str = "cpu") -> str:
    """``"cpu:<cpu signature>"`` or ``"cuda:<gpu name>"``, the device component of a :class:`ProfileKey`.

    A CPU is named by :func:`cpu_signature` (name plus family, model and stepping), not by its marketing
    name alone: cloud VMs show "AMD EPYC" for generations of very different speed, and a profile timed
    on one must be refused on another. torch is imported only for CUDA devices, so keying stays cheap.
    """
    if device == "cpu":
        return f"cpu:{cpu_signature()}"
    prefix, _, suffix = device.partition(":")
    if prefix == "cuda" and (suffix == "" or suffix.isdigit()):
        import torch

        return f"cuda:{torch.cuda.get_device_name(int(suffix) if suffix else 0)}"
    return device  # already descriptive (e.g. "cpu:<name>", "cuda:<name>") or another backend


@dataclass(frozen=True)
class ProfileKey:
    """Everything a measured time model depends on."""

    model_id: str
    model_sha: str
    dtype: str
    threads: int
    press: str
    device: str
    # Which decode-step implementation runs (the engine's ``decode_path``: "hf", "fast-fp32",
    # "fast-int8"): the same model steps at very different speeds on each.
    decode_path: str = "hf"
    versions: dict[str, str] = field(default_factory=dict)
    host: str = ""

    @classmethod
    def current(
        cls,
        model_id: str,
        model_sha: str,
        dtype: str,
        threads: int,
        press: str,
        device: str,
        decode_path: str = "hf",
    ) -> ProfileKey:
        """Key for the running setup, with library versions and the host fingerprint filled in."""
        return cls(
            model_id=model_id,
            model_sha=model_sha,
            dtype=dtype,
            threads=int(threads),
            press=press,
            device=device,
            decode_path=decode_path,
            versions=library_versions(),
            host=host_fingerprint(),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ProfileKey:
        """Parse and type-check a key; raises ``ProfileError`` naming the bad field."""
        if not isinstance(data, dict):
            raise ProfileError("profile key must be a JSON object")
        data = {"decode_path": "hf", **data}  # keys written before decode paths existed were HF-only
        missing = [name for name in (*HARD_KEY_FIELDS, "versions", "host") if name not in data]
        if missing:
            raise ProfileError(f"profile key lacks field(s) {missing}")
        for name in ("model_id", "model_sha", "dtype", "press", "device", "decode_path", "host"):
            if not isinstance(data[name], str):
                raise ProfileError(f"profile key field {name!r} must be a string, got {data[name]!r}")
        if not isinstance(data["threads"], int) or isinstance(data["threads"], bool):
            raise ProfileError(f"profile key field 'threads' must be an integer, got {data['threads']!r}")
        versions = data["versions"]
        if not isinstance(versions, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in versions.items()
        ):
            raise ProfileError("profile key field 'versions' must map package names to version strings")
        return cls(**{name: data[name] for name in (*HARD_KEY_FIELDS, "versions", "host")})

    def slug(self) -> str:
        """File-name stem for this key's default profile: one file per setup.

        The name carries the whole setup — model, dtype, threads, press, decode path, device — so profiles for
        different setups coexist (profiling with ``--threads 1`` does not overwrite the 2-thread
        profile) and a reader can tell files apart. The weights fingerprint is deliberately left out:
        when the weights change under the same model id, the old file is found and reported as
        *stale* (with the differences listed) instead of silently looking like "no profile yet".
        A hash of the full setup guards against collisions after sanitising and truncation.
        """

        def clean(text: str, limit: int) -> str:
            return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:limit] or "x"

        setup = "\0".join((self.model_id, self.dtype, str(self.threads), self.press, self.device, self.decode_path))
        digest = hashlib.sha256(setup.encode("utf-8")).hexdigest()[:8]
        parts = (
            clean(self.model_id, 48),
            clean(self.dtype, 16),
            f"t{self.threads}",
            clean(self.press, 16),
            clean(self.decode_path, 16),
            clean(self.device, 40),
            digest,
        )
        return "-".join(parts)

    def describe(self) -> str:
        """One line naming the setup, for messages and ``timebill profile --show``."""
        return (
            f"model={self.model_id} ({self.model_sha}) dtype={self.dtype} threads={self.threads} "
            f"press={self.press} decode={self.decode_path} device={self.device}"
        )


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Profile:
    """A fitted execution-time model plus the data and setup it came from.

    ``prefill``, ``decode`` and ``eviction`` hold fit dicts (:meth:`Fit.to_dict`); the raw
    ``measurements`` are kept so a profile can be re-fitted or audited without re-measuring, and
    ``noise`` holds dispersion statistics (e.g. coefficient of variation of repeats) that tell how much
    of the fit error is measurement noise.
    """

    key: ProfileKey
    prefill: dict[str, Any]
    decode: dict[str, Any]
    eviction: dict[str, Any] | None = None
    measurements: dict[str, Any] = field(default_factory=dict)
    noise: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_now_iso)
    # How the fit went: held-out MAPEs per candidate form, paper-form fits, FLOPs check (optional).
    report: dict[str, Any] = field(default_factory=dict)
    # Decode set-up cost (moving the kept KV into the decode path's cache) vs kept tokens (optional).
    setup: dict[str, Any] | None = None
    # Prompt compressors' own cost vs the original prompt length, per compressor name (optional: profiles
    # made before prompt compression existed have none, and budgeted compression then asks for a re-profile).
    compressors: dict[str, dict[str, Any]] = field(default_factory=dict)

    def prefill_fit(self) -> Fit:
        return fit_from_dict(self.prefill)

    def decode_fit(self) -> Fit:
        return fit_from_dict(self.decode)

    def eviction_fit(self) -> Fit | None:
        return None if self.eviction is None else fit_from_dict(self.eviction)

    def setup_fit(self) -> Fit | None:
        return None if self.setup is None else fit_from_dict(self.setup)

    def compressor_fits(self) -> dict[str, Fit]:
        return {name: fit_from_dict(data) for name, data in self.compressors.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "key": self.key.to_dict(),
            "prefill": self.prefill,
            "decode": self.decode,
            "eviction": self.eviction,
            "measurements": self.measurements,
            "noise": self.noise,
            "created": self.created,
            "report": self.report,
            "setup": self.setup,
            "compressors": self.compressors,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        """Parse and validate; every problem is a ``ProfileError`` saying which part is wrong."""
        if not isinstance(data, dict):
            raise ProfileError("profile must be a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProfileError(
                f"profile schema version {version!r} is not supported (expected "
                f"{SCHEMA_VERSION}); re-run profiling to regenerate it"
            )
        missing = [
            name for name in ("key", "prefill", "decode", "measurements", "noise", "created") if name not in data
        ]
        if missing:
            raise ProfileError(f"profile lacks field(s) {missing}")
        key = ProfileKey.from_dict(data["key"])
        for name in ("prefill", "decode", "eviction", "setup"):
            value = data.get(name)
            if value is None and name in ("eviction", "setup"):
                continue
            try:
                fit_from_dict(value)
            except InvalidInputError as exc:
                raise ProfileError(f"profile field {name!r} is not a valid fit: {exc}") from exc
        for name in ("measurements", "noise"):
            if not isinstance(data[name], dict):
                raise ProfileError(f"profile field {name!r} must be a JSON object")
        if not isinstance(data["created"], str):
            raise ProfileError("profile field 'created' must be a string timestamp")
        report = data.get("report", {})
        if not isinstance(report, dict):
            raise ProfileError("profile field 'report' must be a JSON object")
        compressors = data.get("compressors") or {}
        if not isinstance(compressors, dict):
            raise ProfileError("profile field 'compressors' must map compressor names to fits")
        for name, value in compressors.items():
            try:
                fit_from_dict(value)
            except (InvalidInputError, TypeError, AttributeError) as exc:
                raise ProfileError(f"profile field 'compressors.{name}' is not a valid fit: {exc}") from exc
        return cls(
            key=key,
            prefill=data["prefill"],
            decode=data["decode"],
            eviction=data.get("eviction"),
            measurements=data["measurements"],
            noise=data["noise"],
            created=data["created"],
            report=report,
            setup=data.get("setup"),
            compressors=compressors,
        )


def profiles_dir() -> Path:
    """Directory of default profile files (under :func:`timebill.paths.cache_dir`)."""
    return cache_dir() / "profiles"


def default_profile_path(key: ProfileKey) -> Path:
    """Where :func:`save_profile` and :func:`find_profile` put/look for ``key``'s profile."""
    return profiles_dir() / f"{key.slug()}.json"


def list_profiles(directory: str | os.PathLike[str] | None = None) -> list[tuple[Path, ProfileKey | None]]:
    """Every profile file in ``directory`` (default :func:`profiles_dir`) with its key, or None if unreadable.

    Used to tell a user who has no profile for the current setup which setups *do* have one (e.g. the
    same model profiled with another thread count), so the fix is obvious.
    """
    root = Path(directory) if directory is not None else profiles_dir()
    found: list[tuple[Path, ProfileKey | None]] = []
    if not root.is_dir():
        return found
    for path in sorted(root.glob("*.json")):
        try:
            found.append((path, load_profile(path).key))
        except ProfileError:
            found.append((path, None))
    return found


def save_profile(profile: Profile, path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``profile`` as JSON atomically and return the path.

    Write to a temporary file in the target directory, fsync, then ``os.replace`` it over the target:
    readers see the old file or the new one, never a torn one, and a crash leaves no partial profile.
    The temp file must be in the same directory because a rename is only atomic within a filesystem.
    """
    target = Path(path) if path is not None else default_profile_path(profile.key)
    data = profile.to_dict()
    # The report is diagnostics (e.g. a leave-one-out MAPE that is infinite on a grid too small to
    # leave a point out): store non-finite numbers there as null. Fits and measurements stay strict.
    if isinstance(data.get("report"), dict):
        data["report"] = finite_or_none(data["report"])
    try:
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"profile is not JSON-serialisable (non-finite number or odd type): {exc}") from exc
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise ProfileError(f"cannot write profile to {target}: {exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise ProfileError(f"cannot write profile to {target}: {exc}") from exc
        raise
    fsync_dir(target.parent)
    return target


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile; raises ``ProfileError`` for missing, corrupt or outdated files."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ProfileError(f"no estimator profile at {p}; run `timebill profile` to create one") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {p}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile {p} is not valid JSON ({exc}); delete it and re-run profiling") from exc
    try:
        return Profile.from_dict(data)
    except ProfileError as exc:
        raise ProfileError(f"profile {p}: {exc}") from exc


def check_key(profile: Profile, expected_key: ProfileKey) -> list[str]:
    """Differences between the profile's key and ``expected_key``, e.g. ``"threads: profile 2, now 1"``.

    Versions are compared per package (``"versions.torch: ..."``); a package known on only one side is
    reported with ``None`` on the other.
    """
    have, want = profile.key, expected_key
    diffs = [
        f"{name}: profile {getattr(have, name)}, now {getattr(want, name)}"
        for name in HARD_KEY_FIELDS
        if getattr(have, name) != getattr(want, name)
    ]
    for pkg in sorted(set(have.versions) | set(want.versions)):
        if have.versions.get(pkg) != want.versions.get(pkg):
            diffs.append(f"versions.{pkg}: profile {have.versions.get(pkg)}, now {want.versions.get(pkg)}")
    if have.host != want.host:
        diffs.append(f"host: profile {have.host}, now {want.host}")
    return diffs


def find_profile(expected_key: ProfileKey, path: str | os.PathLike[str] | None = None) -> Profile | None:
    """Load the default (or given) profile for ``expected_key``; ``None`` if there is none yet.

    Raises ``ProfileError("stale profile: ...")`` when model, weights, dtype, threads, press or device
    differ, since its timings would be wrong. Library-version and host-fingerprint differences are only
    logged as warnings: the hardware identity is already pinned by ``device``, and small speed shifts
    from upgrades are what the online recalibrator absorbs.
    """
    target = Path(path) if path is not None else default_profile_path(expected_key)
    if not target.exists():
        return None
    profile = load_profile(target)
    diffs = check_key(profile, expected_key)
    hard = [d for d in diffs if d.split(":", 1)[0] in HARD_KEY_FIELDS]
    if hard:
        raise ProfileError(
            f"stale profile: {'; '.join(hard)} ({target}); re-run `timebill profile` for the current setup"
        )
    for diff in diffs:
        log.warning("estimator profile %s differs from the current setup: %s", target, diff)
    return profile
