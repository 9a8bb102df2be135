"""How far a plain bf16 model is from the fp32 oracle, teacher-forced, on the CPU: the yardstick for
the GPU parity tests' error bounds (`clusterfuse.engine.parity`).

Each case runs, on the same token stream (`clusterfuse.engine.parity.teacher_stream`), and with
random weights made as the GPU test makes them (same recipe and seed; the CPU generator gives other
values than the GPU's):

* ``exact``: the reference with the bf16 weights converted to fp32 (fp32 activations): the oracle;
* ``ref16``: the reference with the bf16 weights (activations held in bf16 where the kernels hold
  them, fp32 accumulation): what the GPU tests compare against;
* ``torch16`` (Llama cases): the torch backend's own code (`TorchModel`, eager) in bf16, on the CPU;
* ``prefill16`` (DeepSeek): the engine's bf16 prefill (`DeepseekPrefill`, CPU SDPA) of the prompt
  into a paged latent cache, then the ``ref16`` decode step on that cache: the fused backend's path
  with its decode kernels replaced by the reference's bf16 math.

It prints, for every pair, the per-step relative logits errors (`clusterfuse.engine.parity.relative_error`:
worst, mean, median, first step), the top-1 flips (and whether each is a near tie), the prompt's
cached rows per layer against the oracle's; for DeepSeek the fp32 oracle's router margin (6th against
7th expert, over the router logits' standard deviation) at each step and MoE layer and whether a bf16
run chose another top-6 set there; and whether the bf16 engine path holds the parity rule against the
oracle with ``ref16`` as its yardstick (`clusterfuse.engine.parity.within_yardstick`). ``--json``
keeps every number.

    python tools/parity_yardstick.py smollm2 [--steps 256] [--json out.json]   # ~1 min on one core
    python tools/parity_yardstick.py batch20                                   # ~10 s
    python tools/parity_yardstick.py deepseek3 [--steps 256]   # ~7 min, ~10 GB of memory (fp32 + bf16)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from clusterfuse.engine.parity import (
    RouterWatch,
    near_tie,
    relative_error,
    router_tie,
    teacher_stream,
    within_yardstick,
)
from clusterfuse.models.config import ModelConfig
from clusterfuse.models.presets import preset
from clusterfuse.models.random_init import random_weights
from clusterfuse.reference import build_reference_model


class PrefillThenReference:
    """DeepSeek: the engine's bf16 prefill into a paged latent cache, then ``ref``'s decode on it."""

    def __init__(self, ref) -> None:
        from clusterfuse.engine.deepseek_layers import DeepseekPrefill
        from clusterfuse.engine.llama_layers import Fp32Matmul
        from clusterfuse.engine.prefill import PrefillOptions

        self.ref, self.device = ref, ref.device
        self.prefill = DeepseekPrefill(ref, PrefillOptions(), Fp32Matmul())

    def new_cache(self, max_batch: int, capacity: int):
        from clusterfuse.engine.paged_cache import PagedKVCache, pages_for

        mla = self.ref.config.mla
        return PagedKVCache.for_latent(self.ref.config.num_hidden_layers, max_batch, capacity,
                                       mla.kv_lora_rank + mla.qk_rope_head_dim, page_size=16,
                                       num_pages=max_batch * pages_for(capacity, 16), dtype=self.ref.dtype,
                                       device=self.device)

    def forward(self, ids: torch.Tensor, cache):
        if ids.shape[1] > 1:
            return self.prefill.run(ids[0], cache, 0)[None]
        return self.ref.forward(ids, cache)


def _backends(config: ModelConfig, seed: int) -> dict:
    weights = random_weights(config, dtype=torch.bfloat16, seed=seed)
    out = {"exact": build_reference_model(config, {k: v.float() for k, v in weights.items()}, device="cpu")}
    out["ref16"] = build_reference_model(config, weights, device="cpu")
    if config.family == "llama":
        from clusterfuse.engine.torch_model import TorchModel

        out["torch16"] = TorchModel(config, weights, device="cpu", capture_graphs=False)
    else:
        out["prefill16"] = PrefillThenReference(out["ref16"])
    return out


def _pairs(names: list[str]) -> list[tuple[str, str]]:
    """(tested, against): every bf16 run against the oracle, and against ``ref16``."""
    pairs = [(n, "exact") for n in names if n != "exact"]
    return pairs + [(n, "ref16") for n in names if n not in ("exact", "ref16")]


def teacher_forced_table(case: str, config: ModelConfig, seed: int, prompt_len: int, steps: int) -> dict:
    backends = _backends(config, seed)
    names = list(backends)
    # The router logits of every decode step, per run (prefill16 decodes with ref16's model).
    watches = {n: RouterWatch(backends[n]) for n in ("exact", "ref16")} if config.moe is not None else {}
    routed: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    stream = teacher_stream(config.vocab_size, prompt_len, steps, torch.device("cpu"), seed=1)
    caches = {n: b.new_cache(1, prompt_len + steps + 1) for n, b in backends.items()}
    for n, b in backends.items():
        b.forward(stream[:, :prompt_len], caches[n])
    for w in watches.values():
        w.take()  # the prompt's routings
    # The cached rows the prompt left in every layer (K, or DeepSeek's latent), against the oracle's.
    prompt_rows = {f"{n}~exact": [relative_error(caches[n].stores[layer][0].read(0, prompt_len),
                                                 caches["exact"].stores[layer][0].read(0, prompt_len))
                                  for layer in range(config.num_hidden_layers)] for n in names if n != "exact"}
    rows = []
    for t in range(prompt_len, prompt_len + steps):
        logits = {}
        for n, b in backends.items():
            logits[n] = b.forward(stream[:, t:t + 1], caches[n])[0, -1].float()
            if watches:
                routed[n] += watches["exact" if n == "exact" else "ref16"].take()
        row = {"step": t}
        for a, r in _pairs(names):
            row[f"{a}~{r}"] = relative_error(logits[a], logits[r])
            top = int(logits[a].argmax())
            if top != int(logits[r].argmax()):
                row.setdefault("flips", []).append(f"{a}~{r}" + ("" if near_tie(logits[r], top) else " NOT-TIE"))
        rows.append(row)
    result = {"case": case, "prompt_len": prompt_len, "steps": steps, "rows": rows, "prompt_rows": prompt_rows}
    if watches:
        for w in watches.values():
            w.close()
        result["router"] = _router_table(routed, names, config, steps)
    return _with_rule(result)


def _with_rule(result: dict) -> dict:
    """``result`` with the parity rule's verdict on its bf16 engine path against the oracle, the
    ``ref16`` run as the yardstick, the steps with a routing near tie in the oracle excused."""
    rows = result["rows"]
    tested = next(k.split("~")[0] for k in rows[0] if k.endswith("~exact") and not k.startswith("ref16"))
    excused = sorted({e["step"] for e in result.get("router", []) if e["tie"]})
    result["rule"] = {"tested": tested, "yardstick": "ref16", "oracle": "exact", "routing_ties": len(excused),
                      "problems": within_yardstick([r[f"{tested}~exact"] for r in rows],
                                                   [r["ref16~exact"] for r in rows], excused)}
    return result


def _router_table(routed: dict[str, list[torch.Tensor]], names: list[str], config: ModelConfig,
                  steps: int) -> list[dict]:
    """Per decode step and MoE layer: the oracle's 6th-7th margin, and which bf16 runs chose another set."""
    k = config.moe.num_experts_per_tok
    layers = len(routed["exact"]) // steps
    out = []
    for i, logits in enumerate(routed["exact"]):
        ordered = logits.sort(descending=True).values
        chosen = set(logits.topk(k).indices.tolist())
        entry = {"step": i // layers, "layer": i % layers, "logit_gap": float(ordered[k - 1] - ordered[k]),
                 "gap_over_std": float(ordered[k - 1] - ordered[k]) / float(logits.std()),
                 "tie": router_tie(logits, k)}
        for n in names:
            if n != "exact":
                other = set(routed[n][i].topk(k).indices.tolist())
                entry[f"{n}_differs"] = other != chosen
        out.append(entry)
    return out


def batch_table(config: ModelConfig, seed: int, batch: int, prompt_len: int, steps: int) -> dict:
    """test_batch_beyond_16's measure: one relative error over the whole batch's logits per step."""
    backends = _backends(config, seed)
    gen = torch.Generator().manual_seed(seed)
    slots = list(range(batch))
    caches = {n: b.new_cache(batch, 64) for n, b in backends.items()}
    ids = torch.randint(config.vocab_size, (batch, prompt_len), generator=gen)
    for n, b in backends.items():
        b.forward(ids, caches[n], slots)
    rows = []
    for t in range(steps):
        step = torch.randint(config.vocab_size, (batch, 1), generator=gen)
        logits = {n: b.forward(step, caches[n], slots).float() for n, b in backends.items()}
        rows.append({"step": t, **{f"{a}~{r}": relative_error(logits[a], logits[r]) for a, r in _pairs(list(logits))}})
    return _with_rule({"case": "batch20", "batch": batch, "prompt_len": prompt_len, "steps": steps, "rows": rows})


def summary(result: dict) -> str:
    rows = result["rows"]
    keys = [k for k in rows[0] if "~" in k]
    lines = [f"{result['case']}: {len(rows)} steps"]
    for k in keys:
        v = [r[k] for r in rows]
        lines.append(f"  {k:18s} worst {max(v):.3e}  mean {statistics.mean(v):.3e}  median {statistics.median(v):.3e}"
                     f"  first {v[0]:.3e}")
    for k, errs in result.get("prompt_rows", {}).items():
        lines.append(f"  prompt's cached rows {k}, per layer: {', '.join(f'{e:.2e}' for e in errs)}")
    flips = [(r["step"], r["flips"]) for r in rows if r.get("flips")]
    if flips:
        lines.append(f"  top-1 flips: {flips}")
    if "router" in result:
        ties = [e for e in result["router"] if e["tie"]]
        differs = [e for e in result["router"] if any(v for k, v in e.items() if k.endswith("_differs"))]
        lines.append(f"  router: {len(result['router'])} (step, layer) routings, {len(ties)} near ties, "
                     f"{len(differs)} with another top-6 set in a bf16 run: "
                     + ", ".join(f"step {e['step']} layer {e['layer']} gap/std {e['gap_over_std']:.3f}"
                                 f"{' tie' if e['tie'] else ''}" for e in differs))
        worst = sorted(rows, key=lambda r: -r["ref16~exact"])[:5]
        for r in worst:
            margins = [e for e in result["router"] if e["step"] == r["step"] - result["prompt_len"]]
            lines.append(f"  step {r['step']}: ref16~exact {r['ref16~exact']:.3e}; oracle 6th-7th gap/std "
                         + ", ".join(f"L{e['layer']} {e['gap_over_std']:.3f}" for e in margins))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=["smollm2", "batch20", "deepseek3"],
                   help="smollm2: the SmolLM2-135M shape (30 layers), seed 3, as test_teacher_forced_parity; "
                        "batch20: the same shape, seed 6, 20 sequences of 9 tokens, 4 steps (test_batch_beyond_16); "
                        "deepseek3: DeepSeek-V2-Lite's shape with 3 layers, seed 5 (test_deepseek_engine_gpu)")
    p.add_argument("--steps", type=int, default=None, help="decode steps (default: the GPU test's)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens of the teacher-forced cases (16)")
    p.add_argument("--json", default=None, help="also write every per-step number to this file")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps: expected >= 1")
    if args.prompt_len < 2:
        p.error("--prompt-len: expected >= 2 (a prefill)")
    torch.set_grad_enabled(False)
    start = time.time()
    if args.case == "smollm2":
        result = teacher_forced_table("smollm2", preset("smollm2-135m"), 3, args.prompt_len, args.steps or 256)
    elif args.case == "batch20":
        result = batch_table(preset("smollm2-135m"), 6, 20, 9, args.steps or 4)
    else:
        from tests.deepseek_fixtures import lite_config

        result = teacher_forced_table("deepseek3", lite_config(3), 5, args.prompt_len, args.steps or 256)
    print(summary(result))
    rule = result["rule"]
    print(f"parity rule (clusterfuse.engine.parity.within_yardstick): {rule['tested']} against the fp32 oracle, "
              f"yardstick ref16, {rule['routing_ties']} steps with a routing near tie: "
              f"{rule['problems'] or 'holds'}")
    print(f"({time.time() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
