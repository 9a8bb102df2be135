"""tools/: the before/after decode table, the GPU entry point's stage check, the barrier probe's
build, and that the package neither ships nor imports the tooling (CPU only)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from clusterfuse.ops import build
from tools import compare_decode

ROOT = Path(__file__).resolve().parent.parent


def _rec(model, batch, s, us, lo, hi, commit):
    return {"bench": "decode_step", "variant": "clusterfuse", "model": model, "batch": batch, "seq_len": s,
            "time_us": us, "time_us_min": lo, "time_us_max": hi, "git_commit": commit, "device": "NVIDIA H100"}


def test_compare_decode_table_rows_ratios_and_verdicts(tmp_path):
    before = [_rec("llama-2-7b", 1, 1024, 6000.0, 5990.0, 6010.0, "36a43be"),
              _rec("llama-2-7b", 16, 1024, 9000.0, 8990.0, 9010.0, "36a43be"),
              _rec("llama-3-8b", 1, 1024, 7000.0, 6990.0, 7010.0, "36a43be"),
              {**_rec("llama-2-7b", 1, 1024, 7600.0, 7500.0, 7700.0, "36a43be"), "variant": "torch_cuda_graph"}]
    after = [_rec("llama-2-7b", 1, 1024, 6005.0, 5995.0, 6015.0, "abc"),
             _rec("llama-2-7b", 16, 1024, 9500.0, 9490.0, 9510.0, "abc")]
    md = compare_decode.table(before, after)
    assert "| llama-2-7b | 1 | 1024 | 6.000 (5.990-6.010) | 6.005 (5.995-6.015) | 1.001 | same |" in md
    assert "| llama-2-7b | 16 | 1024 | 9.000 (8.990-9.010) | 9.500 (9.490-9.510) | 1.056 | slower |" in md
    assert "Measured on one side only: llama-3-8b b1 S1024" in md
    with pytest.raises(ValueError, match="no configuration"):
        compare_decode.table(before, [])
    (tmp_path / "b.json").write_text(json.dumps(before))
    (tmp_path / "a.json").write_text(json.dumps(after))
    b, a, t = (str(tmp_path / n) for n in ("b.json", "a.json", "t.md"))
    assert compare_decode.main([b, a, "--md", t]) == 0
    assert (tmp_path / "t.md").read_text() == md
    assert compare_decode.main([str(tmp_path / "b.json"), str(tmp_path / "missing.json")]) == 2


def test_gpu_run_names_an_unknown_stage(tmp_path):
    scripts = sorted((ROOT / "tools").glob("*.sh"))
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_run.sh"), "tests", "no-such-stage"], capture_output=True,
                          text=True, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "unknown stage 'no-such-stage'" in proc.stderr
    assert not (tmp_path / "run.log").exists()  # refused before running anything


@pytest.mark.skipif(build.find_nvcc() is None, reason="needs nvcc")
def test_barrier_probe_builds(tmp_path):
    from tools.barrier_drain import build_probe

    assert build_probe(tmp_path).is_file()


def test_package_does_not_ship_or_import_tools():
    """Dev tooling lives outside the package: nothing under clusterfuse/ imports tools or bench, and
    pyproject packages clusterfuse* only."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "clusterfuse").rglob("*.py")
                 if any(line.lstrip().startswith(("from tools", "import tools", "from bench", "import bench"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
    assert 'include = ["clusterfuse*"]' in (ROOT / "pyproject.toml").read_text()
    assert not (ROOT / "clusterfuse" / "kernels" / "probes").exists()


def test_ops_import_nothing_above_them():
    """Layering: clusterfuse/ops uses the kernels and itself (and torch), never models, engine, serve or cli."""
    above = tuple(f"clusterfuse.{m}" for m in ("models", "engine", "serve", "cli", "reference"))
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "clusterfuse" / "ops").glob("*.py")
                 if any(line.strip().startswith(("from " + a, "import " + a)) for a in above
                        for line in p.read_text().splitlines())]
    assert offenders == []
