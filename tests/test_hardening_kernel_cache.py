"""The kernel cache loads only libraries it can trust: a folder and files owned by this user and not
writable by others, each library matching the digest recorded when we built it (issue 39)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clusterfuse.ops import build

needs_nvcc = pytest.mark.skipif(build.find_nvcc() is None, reason="needs nvcc")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder named in CLUSTERFUSE_CACHE_DIR, and a fixed build key (no nvcc needed to name files)."""
    folder = tmp_path / "kernels"
    monkeypatch.setenv("CLUSTERFUSE_CACHE_DIR", str(folder))
    monkeypatch.setattr(build, "build_key", lambda name, sources, defines: "k")
    return folder


def _plant(folder: Path, name: str = "runtime_only", payload: bytes = b"\x7fELF planted") -> Path:
    """A library with a digest that matches it, as an attacker who can write the folder would leave it."""
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"{name}-k.so"
    lib.write_bytes(payload)
    build.digest_path(lib).write_text(build.file_digest(lib) + "\n")
    return lib


def test_default_location_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("CLUSTERFUSE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_dir() == tmp_path / "xdg" / "clusterfuse" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert build.cache_dir() == Path.home() / ".cache" / "clusterfuse" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert not str(build.cache_dir()).startswith("/tmp")


def test_cache_folder_is_created_owner_only(cache):
    assert build.secure_cache_dir() == cache
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_world_writable_cache_folder_is_refused(cache):
    _plant(cache)
    cache.chmod(0o777)
    with pytest.raises(build.KernelCacheError, match="writable by group or others"):
        build.build_library("runtime_only", [])
    with pytest.raises(build.KernelCacheError, match="writable by group or others"):
        build.load_library("runtime_only", [])


def test_foreign_cache_folder_is_refused(cache, monkeypatch):
    _plant(cache)
    cache.chmod(0o700)
    if os.geteuid() == 0:  # root can make the folder really someone else's
        os.chown(cache, 12345, 12345)
    else:
        me = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: me + 1)
    with pytest.raises(build.KernelCacheError, match="not by you"):
        build.load_library("runtime_only", [])


def test_cache_under_a_folder_anyone_may_write_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone could rename our cache folder and put theirs in its place
    monkeypatch.setenv("CLUSTERFUSE_CACHE_DIR", str(shared / "kernels"))
    with pytest.raises(build.KernelCacheError, match="anyone may write"):
        build.secure_cache_dir()
    shared.chmod(0o1777)  # sticky, as /tmp: only the owner may rename its entries
    assert build.secure_cache_dir() == shared / "kernels"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder away")
def test_cache_under_a_foreign_folder_is_refused(tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "kernels").mkdir(mode=0o700)
    os.chown(theirs, 12345, 12345)
    monkeypatch.setenv("CLUSTERFUSE_CACHE_DIR", str(theirs / "kernels"))
    with pytest.raises(build.KernelCacheError, match="owned by uid 12345"):
        build.secure_cache_dir()


def test_planted_library_in_own_folder_writable_by_others_is_refused(cache):
    lib = _plant(cache)
    cache.chmod(0o700)
    lib.chmod(0o666)
    with pytest.raises(build.KernelCacheError, match="library .* writable by group or others"):
        build.load_library("runtime_only", [])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_foreign_library_in_own_folder_is_refused(cache):
    lib = _plant(cache)
    os.chown(lib, 12345, 12345)
    with pytest.raises(build.KernelCacheError, match="library .* owned by uid 12345"):
        build.load_library("runtime_only", [])


def test_symlinked_library_is_refused(cache, tmp_path):
    elsewhere = _plant(tmp_path / "elsewhere")
    cache.mkdir(mode=0o700)
    (cache / elsewhere.name).symlink_to(elsewhere)
    with pytest.raises(build.KernelCacheError, match="not a regular file"):
        build.load_library("runtime_only", [])


def test_library_that_differs_from_its_digest_is_refused_without_nvcc(cache, monkeypatch):
    lib = _plant(cache)
    lib.write_bytes(b"\x7fELF changed after the digest was written")
    assert not build.library_is_intact(lib)
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(build.KernelCacheError, match="does not match the digest"):
        build.load_library("runtime_only", [])


def test_library_without_digest_is_not_intact(cache):
    lib = _plant(cache)
    build.digest_path(lib).unlink()
    assert not build.library_is_intact(lib)


def test_owner_only_carried_cache_is_accepted(cache):
    """What the device call gets: a prebuilt folder owned by the user who loads it (root there), mode 0700."""
    lib = _plant(cache)
    cache.chmod(0o700)
    assert build.secure_cache_dir() == cache
    assert build.library_is_intact(lib)
    assert build.build_library("runtime_only", []) == lib  # a cache hit: nothing is built


@needs_nvcc
def test_library_that_differs_from_its_digest_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERFUSE_CACHE_DIR", str(tmp_path / "kernels"))
    path = build.build_library("runtime_only", [])
    digest = build.digest_path(path)
    assert stat.S_IMODE(digest.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    good = path.read_bytes()
    path.write_bytes(good + b"tampered")
    assert build.build_library("runtime_only", []) == path
    # nvcc's output is not byte-reproducible (embedded temp names): check the rebuild, not the bytes
    assert not path.read_bytes().endswith(b"tampered") and build.library_is_intact(path)
    assert build.load_library("runtime_only", []).cf_error_string(0) == b"no error"
