"""How the fused kernels launch: one frozen options object, built by the engine or a benchmark and
passed down to every op call (`attention_block(..., options=)`, `ffn_block(..., options=)`).

    opts = KernelOptions(programmatic_launch=1)
    attention_block(..., options=opts); ffn_block(..., options=opts)

Every option leaves the results bit-identical; the defaults are the measured fastest (the
records named below). Shapes and launch choices that the tuner settles (cluster size, exchange
path, block size) are op arguments, not options.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Programmatic dependent launch modes (``clusterfuse/kernels/include/clusterfuse/pdl.cuh``): a
#: kernel's blocks may start before the previous kernel of the stream has finished, prefetch their
#: first weights and wait on chip for its results, which hides the launch gap and the prologue.
#:   0: fully ordered launches;
#:   1: a fused kernel's successor may start as its blocks exit;
#:   2: as 1, but the attention kernel lets its successor (the FFN) start already once all its
#:      blocks are done with their last GEMV, before its grid barrier;
#:   3: as 2 for the FFN kernel too.
PROGRAMMATIC_LAUNCH_MODES = (0, 1, 2, 3)


@dataclass(frozen=True)
class KernelOptions:
    """Launch options of the fused attention and FFN kernels (results are the same under all).

    * ``programmatic_launch``: one of `PROGRAMMATIC_LAUNCH_MODES` (default 2). A CUDA graph keeps
      the mode its launches were captured with.
    * ``kv_prefetch_keys``: cached keys per sequence that each attention block prefetches into L2
      before the q,k,v exchange, the first tiles of each warp's run of the key loop (0: none).
    * ``flat_ordered_launch``: the flat exchange (``exchange="flat"``, never chosen by the tuner)
      launches in order whatever ``programmatic_launch`` says. False only to reproduce the race it
      showed under programmatic launches (``bench/flat_pdl_race.py``).
    * ``attention_launch``: ``(cluster size, exchange, block threads)`` that every attention call
      naming none of the three runs with, instead of the tuner's choice (None: tuned). For tests
      and reproducers that pin a launch inside the engine's decode step.
    """

    programmatic_launch: int = 2
    kv_prefetch_keys: int = 64
    flat_ordered_launch: bool = True
    attention_launch: tuple[int, str, int] | None = None

    def __post_init__(self) -> None:
        mode = self.programmatic_launch
        if isinstance(mode, bool) or mode not in PROGRAMMATIC_LAUNCH_MODES:
            raise ValueError(f"programmatic_launch: expected one of {PROGRAMMATIC_LAUNCH_MODES}, got {mode!r}")
        keys = self.kv_prefetch_keys
        if isinstance(keys, bool) or not isinstance(keys, int) or keys < 0:
            raise ValueError(f"kv_prefetch_keys: expected an int >= 0, got {keys!r}")
        if not isinstance(self.flat_ordered_launch, bool):
            raise ValueError(f"flat_ordered_launch: expected a bool, got {self.flat_ordered_launch!r}")
        pin = self.attention_launch
        if pin is not None and not (isinstance(pin, tuple) and len(pin) == 3 and isinstance(pin[0], int)
                                    and isinstance(pin[1], str) and isinstance(pin[2], int)):
            raise ValueError(f"attention_launch: expected None or (cluster size, exchange, block threads), "
                             f"got {pin!r}")

    def launch_mode(self, kernel: str, exchange: str | None = None) -> int:
        """The programmatic mode ``kernel`` ("attention" or "ffn") launches with, as its library
        takes it: 0 ordered, 1 the successor starts at exit, 2 the successor starts before the
        kernel's grid barrier. Flat-exchange attention launches are ordered (see
        `clusterfuse.ops.attention_block`) unless ``flat_ordered_launch`` is off."""
        if kernel not in ("attention", "ffn"):
            raise ValueError(f"kernel: expected 'attention' or 'ffn', got {kernel!r}")
        if kernel == "attention" and exchange == "flat" and self.flat_ordered_launch:
            return 0
        early = self.programmatic_launch >= (2 if kernel == "attention" else 3)
        return 2 if early else min(self.programmatic_launch, 1)

    def non_default(self) -> dict[str, int | bool]:
        """The options that differ from the defaults (what tuner keys and benchmark labels name)."""
        return {k: v for k, v in vars(self).items() if v != getattr(DEFAULT_KERNEL_OPTIONS, k)}


DEFAULT_KERNEL_OPTIONS = KernelOptions()
