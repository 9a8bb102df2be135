"""A small, representative set of primitive launches for compute-sanitizer (racecheck, memcheck,
synccheck): every algorithm and exchange, a multi-chunk tile, back-to-back calls, to-root, the
softmax merge and the gather. Checks results too, so a run that "passes" the tool but computes
garbage still fails.

    compute-sanitizer --tool racecheck python3 tools/sanitize_primitives.py
"""

import torch

from clusterfuse.ops import primitives as P


def main() -> None:
    torch.manual_seed(0)
    for n in (2, 4):
        x = torch.randn(2, n, 2500, device="cuda")  # > one 2048-float chunk: two chunks per call (tree)
        want = x.amax(1)
        for algo in P.ALGOS:
            for exchange in P.EXCHANGES:
                out = P.cluster_reduce(x, "max", algo, exchange, repeats=3)
                assert torch.equal(out[:, 0], want), (n, algo, exchange)
                out = P.cluster_reduce(x, "max", algo, exchange, root=n - 1, repeats=2)
                assert torch.equal(out[:, n - 1], want), (n, algo, exchange, "root")
        m = torch.randn(1, n, 5, device="cuda")
        l = torch.rand(1, n, 5, device="cuda") + 1
        o = torch.randn(1, n, 5, 64, device="cuda")
        gm, _, _ = P.softmax_merge(m, l, o)
        assert torch.equal(gm, m.amax(1))
        for exchange in P.EXCHANGES:
            tiles = x[:, :, :300].contiguous()
            g = P.cluster_gather(tiles, exchange, repeats=3)
            assert torch.equal(g[:, 0], tiles[:, (torch.arange(n, device="cuda") + 2) % n])
    torch.cuda.synchronize()
    print("sanitize_primitives: all results correct")


if __name__ == "__main__":
    main()
