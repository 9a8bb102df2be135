"""Tables and plots from result records (DESIGN.md: "tables and plots are made from these files").

    python -m bench.report bench/results/X.json [more.json ...] --md out.md --png out.png

For each ``bench`` kind: one row per configuration (model, batch, seq_len, dtype), one
column per variant (``variant``, plus ``@cN`` when a record has a cluster size), each cell
the median time and its share of the floor (floor / time), then the floor itself and,
where a ``clusterfuse`` variant and a baseline are both present, the speed-up of
clusterfuse over the fastest baseline.  The PNG has one panel per ``bench``: grouped bars
of the times, the floor as a black tick.

``--by-code`` splits our columns by the code that made them (commit, and the extra defines of a
``bench.variants`` run), to compare versions of a kernel side by side; ``--variants`` keeps only
the named columns (e.g. ``clusterfuse,torch_cuda_graph``: the tuned kernel and the baseline).

The performance pages::

    python -m bench.report perf [--gpu h100]

rewrite ``docs/perf/<gpu>.md`` (replaced, never appended) from the records of the current code,
``bench/results/<gpu>/<bench>.json``, and the README's marked blocks
(``<!-- perf GPU BENCH [field=v1,v2 ...] -->`` ... ``<!-- /perf -->``) from the same tables.
Per bench the page keeps our tuned kernel and the baselines (the sweeps over fixed cluster sizes
stay in the records).  A ``bench`` kind without a layout here (a new benchmark's records) gets a
table of its records' own fields, so it appears without a change to this file.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import load_records, non_default_knobs

RowKey = tuple[Any, ...]
OURS = "clusterfuse"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Layout:
    """How the records of one ``bench`` kind become a table: the fields that name a row (and their
    headers), and what one measurement means (for the performance pages)."""

    row_fields: tuple[str, ...] = ("model", "batch", "seq_len", "dtype")
    row_headers: tuple[str, ...] = ("model", "batch", "S", "dtype")
    about: str = ""

    @property
    def cluster_in_row(self) -> bool:
        return "cluster_size" in self.row_fields


#: The bench kinds laid out as rows × variant columns.  Any other kind gets `generic_markdown`.
LAYOUTS: dict[str, Layout] = {
    "decode_step": Layout(about="One decode step of the whole model under its CUDA graph (time per output token), "
                                "random weights, bf16, paged KV cache; S = tokens already cached per sequence."),
    "attention_block": Layout(about="The attention block alone (RMSNorm, QKV, RoPE, KV append, attention over S "
                                    "cached tokens, O projection + residual), inputs rotated past L2."),
    "ffn_block": Layout(about="The FFN block alone (RMSNorm, gate/up, SiLU·up, down + residual), inputs rotated "
                              "past L2."),
    "mla_block": Layout(about="DeepSeek-V2's absorbed MLA attention block alone."),
    "moe_block": Layout(about="A mixture-of-experts FFN block alone."),
    "primitives": Layout(("cluster_size", "message_bytes", "dtype"), ("cluster", "bytes", "dtype"),
                         about="One cluster's all-reduce (tree or ring) or all-gather of a message per block, "
                               "through DSM or, for the ablation, through global memory."),
}
DEFAULT_LAYOUT = Layout()

#: What the variant names stand for, in the pages' legends.
VARIANTS = {
    "clusterfuse": "ours, with the tuner's choice of cluster size and exchange",
    "clusterfuse_global_memory": "ours with the exchanges through global memory instead of DSM",
    "clusterfuse_no_qk_norm": "ours with QK-norm off (a Qwen3 model's shapes; what QK-norm costs)",
    "clusterfuse_persistent": "ours with every layer of the step in one persistent launch (`@cN`: its cluster size)",
    "torch_cuda_graph": "PyTorch ops (cuBLAS GEMMs/GEMVs, SDPA) captured in one CUDA graph",
    "hf_transformers": "Hugging Face transformers generate",
    "dsm_tree": "recursive-doubling tree through DSM",
    "dsm_ring": "ring through DSM",
    "global_tree": "the tree's dataflow through global memory",
    "global_ring": "the ring's dataflow through global memory",
    "dsm_gather": "all-gather through DSM",
    "global_gather": "all-gather through global memory",
}

#: Fields that say how a record was made, not what was measured (the generic table leaves them out).
PROVENANCE = ("bench", "device", "command", "git_commit", "torch", "cuda", "date", "defines")


def layout_of(bench: str) -> Layout:
    return LAYOUTS.get(bench, DEFAULT_LAYOUT)


def column_of(record: dict[str, Any], by_code: bool = False) -> str:
    """Column label of a record: its variant, with the cluster size where it has one (unless its
    bench puts the cluster size in the row); with `by_code`, ours also with the commit and extra
    defines that made it."""
    size = record.get("cluster_size")
    in_row = layout_of(str(record.get("bench"))).cluster_in_row
    label = f"{record['variant']}@c{size}" if size is not None and not in_row else str(record["variant"])
    if by_code and label.startswith(OURS):
        code = str(record.get("git_commit") or "?")[:9]
        extra = [record["defines"]] if record.get("defines") else []
        label += f" [{'; '.join([code, *extra, *non_default_knobs(record)])}]"
    return label


def _row_value(record: dict[str, Any], name: str) -> Any:
    """A row field of a record; per-sequence lengths (``seq_lens``) stand in for a missing ``seq_len``."""
    value = record.get(name)
    if name == "seq_len" and value is None and isinstance(record.get("seq_lens"), list):
        return ",".join(str(n) for n in record["seq_lens"])
    return value


def _sort_key(value: Any) -> tuple[int, Any]:
    # None sorts first; numbers numerically; anything else as text.
    if value is None:
        return (0, 0)
    if isinstance(value, (int, float)):
        return (1, value)
    return (2, str(value))


@dataclass
class BenchTable:
    """The records of one ``bench`` kind arranged as rows × variant columns (latest record wins)."""

    bench: str
    by_code: bool = False
    layout: Layout = DEFAULT_LAYOUT
    records: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    cells: dict[RowKey, dict[str, dict[str, Any]]] = field(default_factory=dict)
    floors: dict[RowKey, float] = field(default_factory=dict)
    anchors: dict[RowKey, float] = field(default_factory=dict)  # bench/README.md, "The anchors"
    bandwidths: set[float] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    commits: set[str] = field(default_factory=set)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        row = tuple(_row_value(record, f) for f in self.layout.row_fields)
        col = column_of(record, self.by_code)
        if col not in self.columns:
            self.columns.append(col)
        self.cells.setdefault(row, {})[col] = record
        if record.get("floor_us") is not None:
            self.floors.setdefault(row, float(record["floor_us"]))
            if record.get("bandwidth_GBs") is not None:
                self.bandwidths.add(round(float(record["bandwidth_GBs"]), 1))
        if record.get("anchor_us") is not None:
            self.anchors.setdefault(row, float(record["anchor_us"]))
        for attr, key in ((self.devices, "device"), (self.commits, "git_commit")):
            if record.get(key):
                attr.add(str(record[key]))

    @property
    def rows(self) -> list[RowKey]:
        return sorted(self.cells, key=lambda row: tuple(_sort_key(v) for v in row))

    @property
    def ordered_columns(self) -> list[str]:
        """Ours first, then the baselines, each group in order of first appearance."""
        return sorted(self.columns, key=lambda c: not c.startswith(OURS))

    def speedup(self, row: RowKey) -> float | None:
        """Fastest baseline time / clusterfuse time, where both exist."""
        cells = self.cells[row]
        ours = cells.get(OURS)
        baselines = [r["time_us"] for c, r in cells.items() if not c.startswith(OURS)]
        if ours is None or not baselines:
            return None
        return min(baselines) / ours["time_us"]


    def chosen(self, row: RowKey) -> str | None:
        """The cluster size and exchange the tuner chose for ours in this row, where recorded."""
        ours = self.cells[row].get(OURS)
        if ours is None or ours.get("chosen_cluster_size") is None:
            return None
        return " ".join(str(ours[k]) for k in ("chosen_cluster_size", "chosen_exchange") if ours.get(k) is not None)


def build_tables(records: Iterable[dict[str, Any]], by_code: bool = False) -> list[BenchTable]:
    tables: dict[str, BenchTable] = {}
    for record in records:
        bench = str(record.get("bench"))
        tables.setdefault(bench, BenchTable(bench, by_code, layout_of(bench))).add(record)
    return list(tables.values())


def _unit(table: BenchTable) -> tuple[str, float, int]:
    """ms for tables whose times are all above 5 ms (decode steps), else µs; and the digits to show."""
    times = [r["time_us"] for cells in table.cells.values() for r in cells.values()]
    if times and min(times) > 5000:
        return "ms", 1e-3, 3
    return "µs", 1.0, 2 if times and min(times) < 10 else 1


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def made_by(records: Iterable[dict[str, Any]]) -> list[str]:
    """One line per distinct way the records were made: commit, versions, date(s), command."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for r in records:
        key = tuple(str(r.get(k) or "") for k in ("git_commit", "torch", "cuda", "command", "defines"))
        groups.setdefault(key, []).append(str(r.get("date") or "")[:10])
    lines = []
    for (commit, torch_v, cuda_v, command, defines), dates in sorted(groups.items()):
        days = sorted({d for d in dates if d})
        when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}" if days else "date not recorded"
        versions = ", ".join([f"torch {torch_v}"] * bool(torch_v) + [f"CUDA {cuda_v}"] * bool(cuda_v))
        code = f"commit `{commit[:9]}`" if commit else "commit not recorded"
        code += f" with `{defines}`" if defines else ""
        lines.append(f"- {code}, {versions or 'versions not recorded'}, {when}: `{command or 'command not recorded'}`")
    return lines


def table_markdown(table: BenchTable, heading: str | None = None, legend: bool = False) -> str:
    """One bench's table: ours and the baselines per row, each cell the median time and its share of
    the floor, the floor, the speed-up over the fastest baseline; the card, and how it was made."""
    unit, scale, digits = _unit(table)
    cols = table.ordered_columns
    has_speedup = any(table.speedup(row) is not None for row in table.rows)
    has_chosen = any(table.chosen(row) is not None for row in table.rows)
    out: list[str] = [f"{heading}\n"] if heading else []
    if legend and table.layout.about:
        out.append(f"{table.layout.about}\n")
    has_floor = bool(table.floors)
    facts = [f"Card: {', '.join(sorted(table.devices)) or 'not recorded'}"]
    if table.bandwidths:
        facts.append(f"bandwidth for the floor: {', '.join(f'{bw:.0f}' for bw in sorted(table.bandwidths))} GB/s")
    facts.append(f"commit: {', '.join(sorted(table.commits)) or 'not recorded'}")
    out.append("; ".join(facts) + f". Cells: median {unit}" + (" (floor / time)" if has_floor else "") + ".\n")
    if legend:
        named = [f"`{c}`: {VARIANTS[c]}" for c in cols if c in VARIANTS]
        if named:
            out.append("Columns: " + "; ".join(named) + ".\n")
    has_anchor = bool(table.anchors)
    header = [*table.layout.row_headers, *(f"{c} ({unit})" for c in cols), *([f"floor ({unit})"] * has_floor)]
    if has_chosen:
        header.append("tuner's cluster, exchange")
    if has_anchor:
        header.append(f"anchor ({unit})")
    if has_speedup:
        header.append("speed-up vs best baseline")
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(" --- " for _ in header) + "|")
    for row in table.rows:
        cells = table.cells[row]
        floor = table.floors.get(row)
        line = ["–" if v is None else str(v) for v in row]
        for col in cols:
            rec = cells.get(col)
            if rec is None:
                line.append("")
                continue
            share = f" ({floor / rec['time_us']:.0%})" if floor else ""
            line.append(f"{rec['time_us'] * scale:.{digits}f}{share}")
        if has_floor:
            line.append(_fmt(floor * scale if floor else None, digits))
        if has_chosen:
            line.append(table.chosen(row) or "")
        if has_anchor:
            anchor = table.anchors.get(row)
            line.append(_fmt(anchor * scale if anchor else None, digits))
        if has_speedup:
            s = table.speedup(row)
            line.append(f"{s:.2f}×" if s else "")
        out.append("| " + " | ".join(line) + " |")
    out.append("\nMade by:\n")
    out.extend(made_by(table.records))
    out.append("")
    return "\n".join(out)


def markdown(tables: Sequence[BenchTable]) -> str:
    return "\n".join(table_markdown(t, heading=f"## {t.bench}") for t in tables)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value).replace("|", "\\|")


def generic_markdown(bench: str, records: Sequence[dict[str, Any]], heading: str | None = None) -> str:
    """A table of records of a bench kind this file has no layout for: one row per record, one column
    per field that any of them has (in order of first appearance), fields that are null in every
    record and the provenance fields left out, plus the share of the floor where time and floor exist."""
    fields: list[str] = []
    for r in records:
        fields.extend(k for k in r if k not in fields and k not in PROVENANCE)
    fields = [f for f in fields if any(r.get(f) is not None for r in records)]
    with_share = any(r.get("time_us") and r.get("floor_us") for r in records)
    devices = sorted({str(r["device"]) for r in records if r.get("device")})
    out: list[str] = [f"{heading}\n"] if heading else []
    out.append(f"Card: {', '.join(devices) or '–'}. One row per record, as written by the benchmark.\n")
    header = [*fields, *(["share of floor"] if with_share else [])]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(" --- " for _ in header) + "|")
    for r in records:
        line = [_cell(r.get(f)) for f in fields]
        if with_share:
            line.append(f"{r['floor_us'] / r['time_us']:.0%}" if r.get("time_us") and r.get("floor_us") else "")
        out.append("| " + " | ".join(line) + " |")
    out.append("\nMade by:\n")
    out.extend(made_by(records))
    out.append("")
    return "\n".join(out)


def _row_label(table: BenchTable, row: RowKey) -> str:
    named = dict(zip(table.layout.row_fields, row, strict=True))
    parts = [str(named[f]) for f in ("model",) if named.get(f) is not None]
    parts += [f"{prefix}{named[f]}" for f, prefix in (("batch", "B"), ("seq_len", "S"), ("cluster_size", "c"),
                                                      ("message_bytes", "b")) if named.get(f) is not None]
    return " ".join(parts) or "-"


def plot(tables: Sequence[BenchTable], path: str | Path) -> None:
    """One panel per bench: grouped bars of time per variant, floor as a black tick."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the GPU machine and CI have no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 1, figsize=(max(6.0, 1.2 * max(len(t.rows) for t in tables) + 3),
                                                       3.6 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables, strict=True):
        unit, scale, _ = _unit(table)
        rows, cols = table.rows, table.ordered_columns
        width = 0.8 / max(1, len(cols))
        for i, col in enumerate(cols):
            xs = [j + (i - (len(cols) - 1) / 2) * width for j, row in enumerate(rows) if col in table.cells[row]]
            ys = [table.cells[row][col]["time_us"] * scale for row in rows if col in table.cells[row]]
            ax.bar(xs, ys, width, label=col)
        floor_x = [j for j, row in enumerate(rows) if row in table.floors]
        floor_y = [table.floors[rows[j]] * scale for j in floor_x]
        ax.scatter(floor_x, floor_y, marker="_", s=600, color="black", label="floor", zorder=3)
        ys_all = [r["time_us"] * scale for cells in table.cells.values() for r in cells.values()] + floor_y
        if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 20:
            ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), [_row_label(table, r) for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"time ({unit})")
        ax.set_title(table.bench)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def split_by_layout(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Records of the bench kinds with a layout, and the others grouped by kind (for `generic_markdown`)."""
    laid_out: list[dict[str, Any]] = []
    other: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        bench = str(r.get("bench"))
        if bench in LAYOUTS:
            laid_out.append(r)
        else:
            other.setdefault(bench, []).append(r)
    return laid_out, other


# ------------------------------------------------------------------------------ performance pages
PAGE_HEADER = ("<!-- Generated by `python -m bench.report perf --gpu {gpu}` from bench/results/{gpu}/*.json; "
               "edits here are overwritten. -->")
BLOCK = re.compile(r"(<!-- perf (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /perf -->)", re.S)


def results_of(results: Path, gpu: str) -> list[dict[str, Any]]:
    """The records of one GPU's folder, ``results/<gpu>/*.json``, in file-name order."""
    return [r for recs in files_of(results, gpu).values() for r in recs]


def files_of(results: Path, gpu: str) -> dict[str, list[dict[str, Any]]]:
    """The records of one GPU's folder by file (``bench/results/<gpu>/<file>.json``), in name order."""
    folder = results / gpu
    if not folder.is_dir():
        raise ValueError(f"--gpu: no records folder {folder}")
    return {f"bench/results/{gpu}/{path.name}": load_records([path]) for path in sorted(folder.glob("*.json"))}


def current_tables(records: Sequence[dict[str, Any]]) -> tuple[list[BenchTable], dict[str, list[dict[str, Any]]]]:
    """The pages' view of the records: per laid-out bench our tuned kernel and the baselines (records
    at a fixed cluster size are sweeps, left out where the cluster size is not part of the row);
    the other kinds as they are."""
    laid_out, other = split_by_layout(records)
    kept = [r for r in laid_out if layout_of(str(r["bench"])).cluster_in_row or r.get("cluster_size") is None]
    order = {bench: i for i, bench in enumerate(LAYOUTS)}
    tables = sorted(build_tables(kept), key=lambda t: order[t.bench])
    return tables, dict(sorted(other.items()))


def perf_page(gpu: str, files: dict[str, list[dict[str, Any]]]) -> str:
    """``docs/perf/<gpu>.md`` from the records of `files_of`: one section per bench kind."""
    records = [r for recs in files.values() for r in recs]
    sources: dict[str, list[str]] = {}
    for name, recs in files.items():
        for bench in dict.fromkeys(str(r.get("bench")) for r in recs):
            sources.setdefault(bench, []).append(f"`{name}`")
    tables, other = current_tables(records)
    devices = sorted({str(r["device"]) for r in records if r.get("device")})
    out = [PAGE_HEADER.format(gpu=gpu), "", f"# Performance on {', '.join(devices) or gpu}", "",
           "Medians of CUDA-graph replays (spread in the records). The floor is the bytes a call must move "
           "once (weights, KV cache, activations) over the GEMV bandwidth measured in the same run; a cell's "
           "percentage is floor / time. The speed-up is the fastest baseline's time over ours.", ""]
    for table in tables:
        out.append(table_markdown(table, heading=f"## {table.bench} ({', '.join(sources[table.bench])})",
                                  legend=True))
    for bench, recs in other.items():
        out.append(generic_markdown(bench, recs, heading=f"## {bench} ({', '.join(sources[bench])})"))
    return "\n".join(out).rstrip() + "\n"


def _matches(record: dict[str, Any], filters: dict[str, set[str]]) -> bool:
    return all(str(record.get(k)) in values for k, values in filters.items())


def block_markdown(spec: str, results: Path) -> str:
    """The table a README block asks for: ``GPU BENCH [field=v1,v2 ...]`` (records filtered by the fields)."""
    words = spec.split()
    if len(words) < 2 or any("=" not in w for w in words[2:]):
        raise ValueError(f"perf block {spec!r}: expected 'GPU BENCH [field=v1,v2 ...]'")
    gpu, bench, *conds = words
    filters = {k: set(v.split(",")) for k, v in (c.split("=", 1) for c in conds)}
    records = [r for r in results_of(results, gpu) if r.get("bench") == bench and _matches(r, filters)]
    tables, other = current_tables(records)
    if not tables and not other:
        raise ValueError(f"perf block {spec!r}: no records match in {results / gpu}")
    return table_markdown(tables[0]) if tables else generic_markdown(bench, other[bench])


def rewrite_blocks(text: str, results: Path, gpus: set[str] | None = None) -> str:
    """``text`` with every ``<!-- perf SPEC -->`` block (of the given GPUs) regenerated from the records."""
    def render(m: re.Match[str]) -> str:
        if gpus is not None and m["spec"].split()[0] not in gpus:
            return m.group(0)
        return m.group(1) + block_markdown(m["spec"], results).rstrip() + "\n" + m.group(4)

    return BLOCK.sub(render, text)


def perf_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report perf",
                                     description="Regenerate docs/perf/<gpu>.md and the README's perf blocks "
                                                 "from bench/results/<gpu>/*.json.")
    parser.add_argument("--gpu", action="append", help="only this GPU's folder (repeatable; default: every folder)")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results", help="records root")
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs" / "perf", help="where the pages go")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md",
                        help="file whose perf blocks are rewritten")
    args = parser.parse_args(argv)
    gpus = args.gpu or sorted(p.name for p in args.results.iterdir() if p.is_dir() and any(p.glob("*.json")))
    if not gpus:
        raise SystemExit(f"no records under {args.results}/<gpu>/")
    try:
        args.docs.mkdir(parents=True, exist_ok=True)
        for gpu in gpus:
            page = args.docs / f"{gpu}.md"
            page.write_text(perf_page(gpu, files_of(args.results, gpu)))
            print(f"wrote {page}")
        if args.readme.is_file():
            text = args.readme.read_text()
            new = rewrite_blocks(text, args.results, set(gpus))
            if new != text:
                args.readme.write_text(new)
                print(f"rewrote the perf blocks of {args.readme}")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["perf"]:
        perf_main(argv[1:])
        return
    parser = argparse.ArgumentParser(description="Markdown tables and PNG plots from bench result records "
                                                 "(`perf`: the performance pages, see the module docstring).")
    parser.add_argument("files", nargs="+", type=Path, help="JSON record files (a list or JSON lines)")
    parser.add_argument("--md", type=Path, help="write the markdown here (default: print it)")
    parser.add_argument("--png", type=Path, help="write a plot here")
    parser.add_argument("--bench", action="append", help="only these bench kinds (repeatable)")
    parser.add_argument("--by-code", action="store_true", help="one column of ours per commit and extra defines")
    parser.add_argument("--variants", help="only these columns, by variant[@cN] (comma-separated)")
    args = parser.parse_args(argv)
    records = load_records(args.files)
    if args.bench:
        records = [r for r in records if r.get("bench") in args.bench]
    laid_out, other = split_by_layout(records)
    if args.variants:
        keep = set(args.variants.split(","))
        laid_out = [r for r in laid_out if column_of(r) in keep]
    tables = build_tables(laid_out, args.by_code)
    if not tables and not other:
        raise SystemExit("no records found")
    text = "\n".join([markdown(tables), *(generic_markdown(b, recs, heading=f"## {b}") for b, recs in other.items())])
    if args.md:
        args.md.write_text(text)
    else:
        print(text)
    if args.png and tables:
        plot(tables, args.png)


if __name__ == "__main__":
    main()
