"""Every CUDA source under clusterfuse/kernels compiles with its default macros (CPU only, CI).

The kernels specialise through -D macros with #ifndef defaults, so compiling each .cu with no
defines checks the code the JIT build will see for any configuration's syntax and templates."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from clusterfuse.ops import build

pytestmark = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found: cannot compile CUDA kernels here")

SOURCES = build.all_kernel_sources()


@pytest.fixture(scope="module")
def compile_results() -> dict[str, str | None]:
    """Compile every source once, in parallel (nvcc is single-threaded per file); None = compiled."""

    def one(src: str) -> str | None:
        try:
            build.compile_check(src)
            return None
        except build.BuildError as e:
            return str(e)

    with ThreadPoolExecutor() as pool:
        return dict(zip(SOURCES, pool.map(one, SOURCES), strict=True))


def test_kernel_sources_exist():
    assert SOURCES, f"no .cu files found under {build.KERNEL_DIR}"


@pytest.mark.parametrize("source", SOURCES)
def test_compiles_with_defaults(source, compile_results):
    error = compile_results[source]
    assert error is None, error


def test_build_key_depends_on_defines():
    a = build.build_key("x", ["common/runtime.cu"], {"A": 1})
    assert a == build.build_key("x", ["common/runtime.cu"], {"A": 1})
    assert a != build.build_key("x", ["common/runtime.cu"], {"A": 2})
    assert a != build.build_key("x", ["common/runtime.cu"], {"A": 1, "B": True})


def test_define_flags_validate():
    assert build.define_flags({"B": True, "A": "x", "C": 3}) == ["-DA=x", "-DB=1", "-DC=3"]
    with pytest.raises(ValueError, match="identifier"):
        build.define_flags({"1BAD": 1})


def test_library_builds_and_loads(tmp_path, monkeypatch):
    """The JIT path end to end: build into a fresh cache, load, ask the library's cudart a question."""
    monkeypatch.setenv("CLUSTERFUSE_CACHE_DIR", str(tmp_path))
    path = build.build_library("runtime_only", [])
    assert path.parent == tmp_path and path.is_file()
    assert build.build_library("runtime_only", []) == path  # cache hit
    lib = build.load_library("runtime_only", [])
    assert lib.cf_error_string(0) == b"no error"


def test_optional_builds_compile():
    """The profiling builds (CF_ATTN_TIMELINE=1, CF_STEP_TIMELINE=1: bench/attention_timeline.py,
    bench/step_timeline.py), the 256-thread attention block the tuner may pick and the model-feature
    builds (QK-norm, sliding window, also of the persistent decode step) must not rot either."""
    jobs = [("attention/attention_block.cu", {"CF_ATTN_TIMELINE": 1, "CF_ATTN_GQA": 3, "CF_ATTN_HEAD_DIM": 64}),
            ("attention/attention_block.cu", {"CF_ATTN_THREADS": 256, "CF_ATTN_GQA": 4, "CF_ATTN_NT": 2}),
            ("attention/attention_block.cu", {"CF_ATTN_QK_NORM": 1, "CF_ATTN_WINDOW": 1, "CF_ATTN_GQA": 2,
                                              "CF_ATTN_HEAD_DIM": 64}),
            # the persistent decode step with both model features, fp16, batch tile 2
            ("step/decode_step.cu", {"CF_STEP_QK_NORM": 1, "CF_STEP_WINDOW": 1, "CF_STEP_GQA": 2, "CF_STEP_DTYPE": 1,
                                     "CF_STEP_NT": 2}),
            # the step's profiling build (bench/step_timeline.py)
            ("step/decode_step.cu", {"CF_STEP_TIMELINE": 1, "CF_STEP_GQA": 3, "CF_STEP_HEAD_DIM": 64})]
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda job: build.compile_check(*job), jobs))


def test_attention_library_follows_shape_block_size_and_timeline(monkeypatch):
    """The op loads the library its shapes, block size and profiling buffer need."""
    import torch

    from clusterfuse.ops import attention_block as op

    assert op._spec(torch.bfloat16, 1, 32, 8, 128) == (0, 128, 4, 1, 128, False, False, False)
    assert op._spec(torch.float16, 16, 32, 32, 64, threads=256, timeline=True) == (
        1, 64, 1, 2, 256, True, False, False)
    assert op._spec(torch.bfloat16, 1, 16, 8, 128, qk_norm=True, window=True)[-2:] == (True, True)
    assert op._defines(1, 64, 1, 2, 256, True) == {"CF_ATTN_DTYPE": 1, "CF_ATTN_HEAD_DIM": 64, "CF_ATTN_GQA": 1,
                                                   "CF_ATTN_NT": 2, "CF_ATTN_THREADS": 256, "CF_ATTN_TIMELINE": 1}
    base = {"CF_ATTN_DTYPE": 0, "CF_ATTN_HEAD_DIM": 128, "CF_ATTN_GQA": 1, "CF_ATTN_NT": 1}
    # One library per block size; the 128-thread one names no CF_ATTN_THREADS (the kernel's default).
    assert [s[2] for s in op.build_specs(torch.bfloat16, 128, 1, 1)] == [base, {**base, "CF_ATTN_THREADS": 256}]
    # The model features add their define only when on (the other builds keep their cache keys).
    assert [s[2] for s in op.build_specs(torch.bfloat16, 128, 1, 1, qk_norm=True, window=True)][0] == {
        **base, "CF_ATTN_QK_NORM": 1, "CF_ATTN_WINDOW": 1}
    assert op._defines(0, 128, 1, 1, qk_norm=True) == {**base, "CF_ATTN_QK_NORM": 1}
    # Narrowing the candidates to 256 threads still builds the 256-thread kernel.
    monkeypatch.setattr(op, "BLOCK_THREADS", (256,))
    assert [s[2] for s in op.build_specs(torch.bfloat16, 128, 1, 1)] == [{**base, "CF_ATTN_THREADS": 256}]


def test_unique_specs_builds_each_library_once():
    """prebuild's list: a repeated (name, sources, defines) collapses to its first occurrence."""
    a = ("lib_a", ["a.cu"], {"CF_G": 4})
    specs = build.unique_specs([a, ("lib_b", ["b.cu"], {}), a, ("lib_a", ["a.cu"], {"CF_G": 1})])
    assert specs == [("lib_a", ["a.cu"], {"CF_G": 4}), ("lib_b", ["b.cu"], {}), ("lib_a", ["a.cu"], {"CF_G": 1})]


def test_model_prebuild_lists_the_feature_builds(monkeypatch):
    """`clusterfuse build` of a Qwen3 preset builds the QK-norm attention libraries; a model with a
    sliding window builds the window build and the one without it (caches no longer than the window);
    Llama-3.2-1B only the plain ones. Nothing is compiled here (prebuild replaced)."""
    import dataclasses

    import clusterfuse.engine.kernel_build as kernel_build
    from clusterfuse.models.presets import preset

    built: list = []
    monkeypatch.setattr(kernel_build, "prebuild", lambda specs: built.append(specs) or [])
    real_config = kernel_build.load_config
    mistral_window = dataclasses.replace(preset("mistral-7b"), sliding_window=4096)
    monkeypatch.setattr(kernel_build, "load_config",
                        lambda model: mistral_window if model == "mistral-window" else real_config(model))

    def attention_defines(model: str) -> list[dict]:
        built.clear()
        kernel_build.prebuild_for_model(model, batches=(1,))
        return [d for name, _, d in built[0] if name == "attention_block"]

    qwen3 = attention_defines("qwen3-8b")
    assert len(qwen3) == 2 and all(d["CF_ATTN_QK_NORM"] == 1 and "CF_ATTN_WINDOW" not in d for d in qwen3)
    assert all(d["CF_ATTN_GQA"] == 4 for d in qwen3)
    window = attention_defines("mistral-window")
    assert sorted(d.get("CF_ATTN_WINDOW", 0) for d in window) == [0, 0, 1, 1]
    plain = attention_defines("llama-3.2-1b")
    assert plain and all("CF_ATTN_QK_NORM" not in d and "CF_ATTN_WINDOW" not in d for d in plain)
    assert all(d["CF_ATTN_HEAD_DIM"] == 64 for d in plain)


def test_kernel_window_drops_a_window_covering_the_cache():
    """The op launches the window build only where a window can hide a row: a window shorter than the
    cache's capacity (contiguous: its rows; paged: pages per sequence x page size)."""
    import torch

    from clusterfuse.ops.attention_block import kernel_window

    contiguous = torch.empty(2, 8, 1024, 128)
    paged, table = torch.empty(40, 8, 16, 128), torch.zeros(2, 16, dtype=torch.int32)  # 256 rows per sequence
    assert kernel_window(None, contiguous, None, None) == 0
    assert kernel_window(1023, contiguous, None, None) == 1023
    assert kernel_window(1024, contiguous, None, None) == 0
    assert kernel_window(255, paged, table, 16) == 255
    assert kernel_window(256, paged, table, 16) == 0
    assert kernel_window(1, paged, table, 16) == 1


def test_model_prebuild_of_deepseek_v2_lite_lists_mla_moe_and_ffn(monkeypatch):
    """`clusterfuse build` of DeepSeek-V2-Lite: the MLA block (every cluster size, both key loops, per
    batch tile count), the MoE block per batch tile count and the FFN block of its dense first layer;
    no attention block. Nothing is compiled here (prebuild replaced)."""
    import clusterfuse.engine.kernel_build as kernel_build

    built: list = []
    monkeypatch.setattr(kernel_build, "prebuild", lambda specs: built.append(specs) or [])
    kernel_build.prebuild_for_model("deepseek-v2-lite", batches=(1, 16))
    names = [name for name, _, _ in built[0]]
    assert names.count("mla_block") == 2 * 2 * 5 and names.count("moe_block") == 2
    assert names.count("ffn_block") == 1 and "attention_block" not in names
    mla = [d for name, _, d in built[0] if name == "mla_block"]
    assert {(d["CF_MLA_NT"], d["CF_MLA_CLUSTER"], d.get("CF_MLA_KEY_MMA", 0)) for d in mla} == \
        {(nt, c, k) for nt in (1, 2) for c in (1, 2, 4, 8, 16) for k in (0, 1)}
    assert all(d["CF_MLA_DTYPE"] == 0 for d in mla)  # bf16
