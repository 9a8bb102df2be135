"""The fused decode engine end to end on a Hopper GPU, against the reference backend.

Teacher forcing: the backends read the same token stream (a prompt, then 256 fixed random
tokens), so every step's logits can be compared even where greedy choices would differ. The fused
backend is measured against the fp32 oracle and bounded by the plain reference in bf16 on the same
steps (`clusterfuse.engine.parity.within_yardstick`), not by an absolute number.

Top-1 agreement is counted strictly and reported; where the two backends pick different tokens,
the test also requires a near tie in the reference (its logit of the fused choice within
`clusterfuse.engine.parity.TIE_TOLERANCE` x the logits' standard deviation of its maximum).
Two correct bf16 implementations that accumulate in different orders round some hidden values
to neighbouring bf16 numbers, and on random weights (flat logits) that flips 2-4% of top-1 choices
once the prompt is prefilled in bf16 too (`clusterfuse.engine.parity.MIN_AGREEMENT`).
SmolLM2 runs with its real weights: the first 4 layers of the embedded GGUF, written by
``tools/make_smollm2_subset.py`` to the ignored folder ``.weights/`` (the whole file is
too large to carry to the GPU machine); the test is skipped when that file is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clusterfuse.engine.fused_model import FusedModel
from clusterfuse.engine.llm_engine import LLMEngine
from clusterfuse.engine.parity import fp32_oracle, near_tie, teacher_forced
from clusterfuse.engine.reference_backend import ReferenceBackend
from clusterfuse.engine.sampling import SamplingParams
from clusterfuse.models.byte_tokenizer import ByteTokenizer
from clusterfuse.models.loader import load_model
from clusterfuse.models.presets import preset
from clusterfuse.models.random_init import random_weights
from clusterfuse.ops import attention_block as attn_op
from clusterfuse.ops import ffn_block as ffn_op
from clusterfuse.ops.options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from clusterfuse.ops.tuner import Tuner
from clusterfuse.reference import build_reference_model

pytestmark = pytest.mark.gpu

SMOLLM2_SUBSET = Path(__file__).resolve().parents[2] / ".weights" / "smollm2-135m-4layers.gguf"
STEPS = 256


def _needs_hopper() -> None:
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the fused kernels need a Hopper (sm_90) GPU")


def _models(config, weights, kernel_options: KernelOptions = DEFAULT_KERNEL_OPTIONS):
    _needs_hopper()
    fused = FusedModel(config, weights, device="cuda", kernel_options=kernel_options)
    reference = build_reference_model(config, weights, device="cuda")
    return fused, reference


def _check_teacher_forced(fused, reference, config, weights) -> None:
    """Teacher-forced against the fp32 oracle, within the error of ``reference`` (the plain reference over
    the bf16 ``weights``) on the same steps (`clusterfuse.engine.parity`: `TeacherForced.problems` with a
    yardstick)."""
    r = teacher_forced(fused, fp32_oracle(config, weights, "cuda"), config.vocab_size, steps=STEPS,
                       yardstick=reference)
    print(r.summary())
    assert not r.problems(), r.problems()


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b"])
def test_teacher_forced_random_weights_4_layers(name):
    config = preset(name).replace(num_hidden_layers=4)
    weights = random_weights(config, device="cuda", dtype=torch.bfloat16, seed=5)
    _check_teacher_forced(*_models(config, weights), config, weights)


def test_teacher_forced_flat_exchange_is_repeatable(monkeypatch, tmp_path):
    """The attention kernel pinned to the flat exchange at its widest grid (16 blocks per KV head,
    256 threads: 128 blocks, one per SM) in the engine's decode step, twice over the same stream:
    the per-step errors must be bit-identical and within the bound. Under programmatic launches
    this configuration drifted (errors up to 6e-2, different on every run), hence its ordered
    launches (attention_block.FLAT_RACE)."""
    monkeypatch.setattr(attn_op, "TUNER", Tuner(tmp_path / "attention.json", samples=2, inner=2))
    monkeypatch.setattr(ffn_op, "TUNER", Tuner(tmp_path / "ffn.json", samples=2, inner=2))
    config = preset("llama-3-8b").replace(num_hidden_layers=4)
    weights = random_weights(config, device="cuda", dtype=torch.bfloat16, seed=5)
    fused, reference = _models(config, weights, KernelOptions(attention_launch=(16, "flat", 256)))
    oracle = fp32_oracle(config, weights, "cuda")
    runs = [teacher_forced(fused, oracle, config.vocab_size, steps=STEPS, yardstick=reference),
            teacher_forced(fused, oracle, config.vocab_size, steps=STEPS)]
    print(runs[0].summary())
    assert runs[0].errors == runs[1].errors, "per-step logits errors differ between two identical runs"
    assert not runs[0].problems(), runs[0].problems()


@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2_SUBSET.exists():
        pytest.skip(f"{SMOLLM2_SUBSET} missing: run tools/make_smollm2_subset.py")
    return load_model(str(SMOLLM2_SUBSET), device="cuda", dtype=torch.bfloat16, progress=False)


def test_teacher_forced_smollm2_real_weights(smollm2):
    """Real weights, but only the first layers of SmolLM2's 30 (the whole file does not travel to the
    GPU machine): its logits are flat on some steps, where rounding differences weigh more (against
    the bf16 reference: worst 2.2e-2 on an H100)."""
    _check_teacher_forced(*_models(smollm2.config, smollm2.weights), smollm2.config, smollm2.weights)


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):", "Once upon a time"])
def test_greedy_text_equals_reference_backend(smollm2, prompt):
    """64 greedy tokens: equal to the reference backend's up to the first near tie; from there
    the fused stream is replayed through the reference, and every fused choice must be the
    reference's best token or within a near tie of it.  (The 6-layer subset of SmolLM2 has
    flat distributions on which bf16 rounding differences decide ties.)"""
    fused, reference = _models(smollm2.config, smollm2.weights)
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    prompt_ids = smollm2.tokenizer.encode(prompt)
    fused_tokens, ref_tokens = (_generate(LLMEngine(b, smollm2.tokenizer, capacity=256, max_num_seqs=1),
                                          [prompt_ids], params)[0]
                                for b in (fused, ReferenceBackend(reference)))
    _check_near_greedy(reference, prompt_ids, fused_tokens, ref_tokens)


def _generate(engine: LLMEngine, prompts: list[list[int]], params) -> list[list[int]]:
    """Token ids of each prompt, all requests added at once to ``engine`` (continuous batching)."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    for i, (ids, p) in enumerate(zip(prompts, per_prompt, strict=True)):
        engine.add_request(str(i), ids, p)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert engine.stats().kv_pages_used == 0
    return [done[str(i)] for i in range(len(prompts))]


def _check_near_greedy(reference, prompt_ids: list[int], tokens: list[int], expected: list[int]) -> None:
    """The engine test's near-tie rule: ``tokens`` equal ``expected`` (another greedy run of the same
    prompt) up to the first difference, where both choices are near ties of the reference; and every
    token of ``tokens``, replayed through the reference, is its best token or a near tie."""
    stream = torch.tensor([prompt_ids + tokens], device=reference.device)
    logits = reference.forward(stream, reference.new_cache(1, stream.shape[1]))[0]
    first = len(prompt_ids) - 1
    for i, tok in enumerate(tokens):
        assert near_tie(logits[first + i], tok), f"token {i} ({tok}) is no near tie of the reference's best"
    diverge = next((i for i, (a, b) in enumerate(zip(tokens, expected, strict=False)) if a != b), None)
    if diverge is not None:
        assert near_tie(logits[first + diverge], expected[diverge]), f"the runs part at token {diverge}, no near tie"


def test_graph_replay_equals_eager_and_is_deterministic():
    config = preset("llama-3-8b").replace(num_hidden_layers=2)
    fused, _ = _models(config, random_weights(config, device="cuda", dtype=torch.bfloat16, seed=9))
    check_graph_replay_equals_eager(fused, config.vocab_size)


def check_graph_replay_equals_eager(fused, vocab_size: int) -> None:
    """A decode graph (batch bucket 4, 3 live rows) replayed twice and the same step run eagerly over
    the graph's static buffers give bit-identical logits."""
    cache = fused.new_cache(3, 128)
    prompt = torch.randint(vocab_size, (3, 20), device="cuda")
    fused.forward(prompt, cache, [0, 1, 2])
    ids = torch.randint(vocab_size, (3, 1), device="cuda")
    graph = fused._graph(cache, 4, 128)  # batch bucket 4, the one context class of 128 rows
    replayed = graph.run(ids[:, 0], [0, 1, 2])
    again = graph.run(ids[:, 0], [0, 1, 2])  # same inputs, same cache rows rewritten
    eager = fused.decode_step(graph.ids, graph.lens, graph.lens, graph.table, cache)[:3]
    assert torch.equal(replayed, again)
    assert torch.equal(replayed, eager)


def test_context_classes_run_the_same_step():
    """The graphs of two context classes (tuned at 1024 and at 2048 rows, whose launch choices may
    differ) run the same step to the same logits up to summation order, and the reference's;
    forward() replays the class of the longest sequence."""
    config = preset("llama-3-8b").replace(num_hidden_layers=2)
    fused, reference = _models(config, random_weights(config, device="cuda", dtype=torch.bfloat16, seed=5))
    cache = fused.new_cache(2, 2048)
    prompt = torch.randint(config.vocab_size, (2, 40), device="cuda")
    fused.forward(prompt, cache, [0, 1])
    ids = torch.randint(config.vocab_size, (2, 1), device="cuda")
    short = fused._graph(cache, 2, 1024).run(ids[:, 0], [0, 1])
    long = fused._graph(cache, 2, 2048).run(ids[:, 0], [0, 1])  # rewrites the same cache rows
    ref = reference.forward(torch.cat([prompt, ids], dim=1), reference.new_cache(2, 64))[:, -1].float()
    for logits in (short, long):
        assert ((logits - ref).norm() / ref.norm()).item() < 2e-2
    assert ((short - long).norm() / long.norm()).item() < 1e-2
    assert set(fused._graphs) == {(id(cache), 2, 1024), (id(cache), 2, 2048)}
    stepped = fused.forward(ids, cache, [0, 1])[:, 0]  # 41 rows: the 1024 class, no new graph
    assert len(fused._graphs) == 2 and torch.equal(stepped, short)
    assert fused.release_graphs(reference.new_cache(1, 16)) == 0  # another cache: nothing of it captured
    assert fused.release_graphs(cache) == 2 and not fused._graphs
    after = fused.forward(ids, cache, [0, 1])[:, 0]  # row 41: captured again
    assert len(fused._graphs) == 1 and torch.isfinite(after).all()


def test_batch_decode_and_too_long_prompt_keeps_serving(smollm2):
    fused, _ = _models(smollm2.config, smollm2.weights)
    engine = LLMEngine(fused, smollm2.tokenizer, capacity=64, max_num_seqs=4)
    with pytest.raises(ValueError, match="exceed the capacity"):
        engine.add_request("long", "word " * 80, SamplingParams(max_tokens=8))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [smollm2.tokenizer.encode(p) for p in ("Hello", "The quick brown fox jumps")]
    together = _generate(engine, prompts, params)
    alone = [_generate(engine, [p], params)[0] for p in prompts]
    assert together == alone and all(len(t) == 8 for t in together)


class _Counting:
    """A backend that records the batch size of every decode call of the backend it wraps."""

    def __init__(self, model) -> None:
        self.model, self.device = model, model.device
        self.prefill_chunk, self.max_decode_batch = model.prefill_chunk, model.max_decode_batch
        self.decode_batches: list[int] = []

    def new_cache(self, max_batch: int, capacity: int, num_pages: int | None = None):
        return self.model.new_cache(max_batch, capacity, num_pages)

    def prepare_decode(self, cache, batch: int) -> None:
        self.model.prepare_decode(cache, batch)

    def forward(self, input_ids: torch.Tensor, cache, slots=None, *, logits: str = "all") -> torch.Tensor:
        if input_ids.shape[1] == 1:
            self.decode_batches.append(input_ids.shape[0])
        return self.model.forward(input_ids, cache, slots, logits=logits)


def _continuous_batching_equals_alone(fused, reference, tokenizer, prompts, max_tokens, **engine_kw):
    """Requests of different lengths, all added at once to an engine (so, with fewer slots than
    requests, some wait, join later and decode beside others; long prompts are prefilled in chunks),
    give each the tokens it gets alone in the same engine, within the near-tie rule. Returns the
    decode batch sizes of the batched run."""
    params = [SamplingParams(max_tokens=max_tokens - i % 5, ignore_eos=True) for i in range(len(prompts))]
    counting = _Counting(fused)
    engine = LLMEngine(counting, tokenizer, **engine_kw)  # one engine: its decode graphs are captured once
    alone = [_generate(engine, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    counting.decode_batches.clear()
    together = _generate(engine, prompts, params)
    for p, sp, t, a in zip(prompts, params, together, alone, strict=True):
        assert len(t) == len(a) == sp.max_tokens
        _check_near_greedy(reference, p, t, a)
    fused.release_graphs(engine.cache)
    return counting.decode_batches


def test_continuous_batching_equals_alone_smollm2(smollm2):
    """12 SmolLM2 prompts through 6 slots, prefill in chunks of 8 tokens."""
    fused, reference = _models(smollm2.config, smollm2.weights)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,",
             "The quick brown fox jumps over the lazy dog because it", "Hello", "Water boils at",
             "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole", "Roses are red,",
             "import torch", "My name is", "The meaning of life is"]
    prompts = [smollm2.tokenizer.encode(t) for t in texts]
    batches = _continuous_batching_equals_alone(fused, reference, smollm2.tokenizer, prompts, 24, capacity=128,
                                                max_num_seqs=6, prefill_chunk=8)
    assert max(batches) == 6 and len(set(batches)) > 1  # full batches, and batches that shrink and grow


def test_continuous_batching_beyond_16_random_weights():
    """20 requests on random Llama-3-8B-shaped weights (2 layers): 20 slots, more than the largest decode
    graph (16), so a step decodes as two calls (16 + 4); each request still gets its tokens alone."""
    config = preset("llama-3-8b").replace(num_hidden_layers=2)
    fused, reference = _models(config, random_weights(config, device="cuda", dtype=torch.bfloat16, seed=13))
    tokenizer = ByteTokenizer(config.vocab_size, config.bos_token_id, config.eos_token_ids)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(config.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 40, (20,), generator=gen)]
    batches = _continuous_batching_equals_alone(fused, reference, tokenizer, prompts, 16, capacity=64,
                                                max_num_seqs=20)
    assert max(batches) == 16 and any(a == 16 and b == 4 for a, b in zip(batches, batches[1:], strict=False))


class _SyncChecked(_Counting):
    """The fused backend; once ``armed``, it sets CUDA sync debug mode to "error" when a decode
    step starts, so that from then on, until the test resets the mode, any operation that makes
    the host wait for the GPU (``.item()``, ``.tolist()`` of a CUDA tensor, a blocking copy from
    pageable memory, a stream synchronisation) raises. Prefill and graph capture, which may
    synchronise, come before the first decode step."""

    armed = False

    def forward(self, input_ids: torch.Tensor, cache, slots=None, *, logits: str = "all") -> torch.Tensor:
        if self.armed and input_ids.shape[1] == 1:
            torch.cuda.set_sync_debug_mode("error")
        return super().forward(input_ids, cache, slots, logits=logits)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 11}],
                         ids=["greedy", "sampled"])
def test_decode_loop_never_synchronises_the_host(sampling):
    """The engine's steady-state loop over the fused backend: 32 and 24 tokens (greedy, or sampled with
    a seed: the same tokens in both runs) for 2 prompts of 6 and 40 tokens, under sync debug mode
    "error" from the first decode step to the end (after a first, unchecked run has warmed up the
    allocators; the engine captured the graphs when it was built).

    What stays allowed is the host's wait, each step, for the event that marks the end of the
    previous step's token copy (``Event.synchronize``, which the mode does not flag): the GPU is
    already running the next step then. The longer request ends first, so the batch also shrinks
    under the check (its input ids picked on the device, the batch-1 graph), and both take new KV
    pages as they grow (block-table writes)."""
    _needs_hopper()
    config = preset("smollm2-135m").replace(num_hidden_layers=2)
    fused = FusedModel(config, random_weights(config, device="cuda", dtype=torch.bfloat16, seed=3), device="cuda")
    tokenizer = ByteTokenizer(config.vocab_size, config.bos_token_id, config.eos_token_ids)
    prompts = [[config.bos_token_id, 72, 101, 108, 108, 111], list(range(100, 140))]  # 6 and 40 tokens
    params = [SamplingParams(max_tokens=n, ignore_eos=True, **sampling) for n in (32, 24)]
    backend = _SyncChecked(fused)
    engine = LLMEngine(backend, tokenizer, capacity=64, max_num_seqs=2)

    def run() -> list[list[int]]:
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(str(i), p, sp)
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        return [done["0"], done["1"]]

    warm = run()
    backend.armed = True
    try:
        checked = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [len(t) for t in checked] == [32, 24]
    assert checked == warm
    assert 2 in backend.decode_batches and 1 in backend.decode_batches


def test_batched_sampling_gives_each_row_its_alone_token_on_the_gpu():
    """The batched sampler on CUDA (softmax, sort, cumsum and argmax kernels over [B, V] rows, the
    noise drawn per row from each request's CUDA generator): every row's token equals the one the
    same request draws alone, over a SmolLM2-sized vocabulary, mixed temperatures / top-k / top-p
    and greedy rows, and it never synchronises the host."""
    from clusterfuse.engine.sampling import sample, sample_rows

    vocab = 49152
    logits = torch.randn(16, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 4
    params = [SamplingParams(temperature=0.5 + (i % 5) / 4, top_k=(0, 20, 500)[i % 3], top_p=(1.0, 0.9, 0.5)[i % 3])
              if i % 4 else SamplingParams() for i in range(16)]

    def generators(draw: int) -> list[torch.Generator]:
        return [torch.Generator("cuda").manual_seed(1000 * draw + i) for i in range(16)]

    for draw in range(5):
        gens = generators(draw)
        torch.cuda.set_sync_debug_mode("error")
        try:
            rows = sample_rows(logits, params, gens)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        alone = [int(sample(logits[i:i + 1], p, g)) for i, (p, g) in enumerate(zip(params, generators(draw),
                                                                                    strict=True))]
        assert rows.tolist() == alone, draw
