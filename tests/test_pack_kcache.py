"""tools/pack_kcache.py: what goes into the device call's kernel archive, and the carry count."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import pack_kcache  # noqa: E402


def _cache(tmp_path: Path) -> Path:
    cache = tmp_path / ".kcache"
    cache.mkdir()
    for name in ("attention_block-aa.so", "ffn_block-bb.so", "cluster_reduce-cc.so", "cluster_gather-dd.so"):
        (cache / name).write_bytes(b"x" * 100)
    (cache / "attention_block-aa.so.sha256").write_text("0" * 64 + "\n")
    (cache / "attention_block-aa.so.lock").write_bytes(b"")
    return cache


def test_libraries_leave_out_the_primitives_unless_asked(tmp_path):
    cache = _cache(tmp_path)
    assert pack_kcache.libraries(cache, keep_primitives=False) == [".kcache/attention_block-aa.so",
                                                                    ".kcache/attention_block-aa.so.sha256",
                                                                    ".kcache/ffn_block-bb.so"]
    assert len(pack_kcache.libraries(cache, keep_primitives=True)) == 5
    assert pack_kcache.libraries(cache, keep_primitives=True, leave_out=["attention_block"]) == [
        ".kcache/cluster_gather-dd.so", ".kcache/cluster_reduce-cc.so", ".kcache/ffn_block-bb.so"]


@pytest.mark.skipif(not (shutil.which("tar") and shutil.which("xz")), reason="needs tar and xz")
def test_pack_writes_the_selected_libraries_and_drops_locks(tmp_path):
    cache = _cache(tmp_path)
    out = tmp_path / "k.tar.xz"
    assert pack_kcache.pack(cache, out, keep_primitives=False) == 2
    members = subprocess.run(["tar", "tJf", str(out)], check=True, capture_output=True, text=True).stdout.split()
    assert sorted(members) == [".kcache/attention_block-aa.so", ".kcache/attention_block-aa.so.sha256",
                               ".kcache/ffn_block-bb.so"]
    owners = subprocess.run(["tar", "tvJf", str(out), "--numeric-owner"], check=True, capture_output=True,
                            text=True).stdout.splitlines()
    assert all(line.split()[1] == "0/0" for line in owners)  # root unpacks files it owns
    assert not list(cache.glob("*.lock"))


def test_carry_counts(tmp_path):
    cache = _cache(tmp_path)
    assert pack_kcache.path_bytes([cache, tmp_path / "missing"]) == 465
    assert pack_kcache.tree_bytes() > 0  # this checkout's tracked files
