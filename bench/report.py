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
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import load_records, non_default_knobs

RowKey = tuple[Any, ...]
ROW_FIELDS = ("model", "batch", "seq_len", "dtype")
ROW_HEADERS = ("model", "batch", "S", "dtype")
OURS = "clusterfuse"


def column_of(record: dict[str, Any], by_code: bool = False) -> str:
    """Column label of a record: its variant, with the cluster size where it has one; with
    `by_code`, ours also with the commit and extra defines that made it."""
    size = record.get("cluster_size")
    label = f"{record['variant']}@c{size}" if size is not None else str(record["variant"])
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
    columns: list[str] = field(default_factory=list)
    cells: dict[RowKey, dict[str, dict[str, Any]]] = field(default_factory=dict)
    floors: dict[RowKey, float] = field(default_factory=dict)
    anchors: dict[RowKey, float] = field(default_factory=dict)  # DESIGN.md's number, where a record names it
    bandwidths: set[float] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    commits: set[str] = field(default_factory=set)

    def add(self, record: dict[str, Any]) -> None:
        row = tuple(_row_value(record, f) for f in ROW_FIELDS)
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


def build_tables(records: Iterable[dict[str, Any]], by_code: bool = False) -> list[BenchTable]:
    tables: dict[str, BenchTable] = {}
    for record in records:
        bench = str(record.get("bench"))
        tables.setdefault(bench, BenchTable(bench, by_code)).add(record)
    return list(tables.values())


def _unit(table: BenchTable) -> tuple[str, float]:
    """ms for tables whose times are all above 5 ms (decode steps), else µs."""
    times = [r["time_us"] for cells in table.cells.values() for r in cells.values()]
    return ("ms", 1e-3) if times and min(times) > 5000 else ("µs", 1.0)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(tables: Sequence[BenchTable]) -> str:
    out: list[str] = []
    for table in tables:
        unit, scale = _unit(table)
        cols = table.ordered_columns
        has_speedup = any(table.speedup(row) is not None for row in table.rows)
        out.append(f"## {table.bench}\n")
        bws = ", ".join(f"{bw:.0f}" for bw in sorted(table.bandwidths)) or "–"
        out.append(f"Device: {', '.join(sorted(table.devices)) or '–'}; bandwidth for the floor: {bws} GB/s; "
                   f"commit: {', '.join(sorted(table.commits)) or '–'}. Cells: median {unit} (floor / time).\n")
        has_anchor = bool(table.anchors)
        header = [*ROW_HEADERS, *(f"{c} ({unit})" for c in cols), f"floor ({unit})"]
        if has_anchor:
            header.append(f"DESIGN anchor ({unit})")
        if has_speedup:
            header.append("speed-up vs best baseline")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(" --- " for _ in header) + "|")
        for row in table.rows:
            cells = table.cells[row]
            floor = table.floors.get(row)
            line = ["–" if v is None else str(v) for v in row]
            digits = 3 if unit == "ms" else 1
            for col in cols:
                rec = cells.get(col)
                if rec is None:
                    line.append("")
                    continue
                share = f" ({floor / rec['time_us']:.0%})" if floor else ""
                line.append(f"{rec['time_us'] * scale:.{digits}f}{share}")
            line.append(_fmt(floor * scale if floor else None, digits))
            if has_anchor:
                anchor = table.anchors.get(row)
                line.append(_fmt(anchor * scale if anchor else None, digits))
            if has_speedup:
                s = table.speedup(row)
                line.append(f"{s:.2f}×" if s else "")
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def _row_label(row: RowKey) -> str:
    model, batch, seq_len, dtype = row
    parts = [str(model) if model is not None else ""]
    if batch is not None:
        parts.append(f"B{batch}")
    if seq_len is not None:
        parts.append(f"S{seq_len}")
    return " ".join(p for p in parts if p) or "-"


def plot(tables: Sequence[BenchTable], path: str | Path) -> None:
    """One panel per bench: grouped bars of time per variant, floor as a black tick."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the GPU machine and CI have no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 1, figsize=(max(6.0, 1.2 * max(len(t.rows) for t in tables) + 3),
                                                       3.6 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables, strict=True):
        unit, scale = _unit(table)
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
        ax.set_xticks(range(len(rows)), [_row_label(r) for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"time ({unit})")
        ax.set_title(table.bench)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Markdown tables and PNG plots from bench result records.")
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
    if args.variants:
        keep = set(args.variants.split(","))
        records = [r for r in records if column_of(r) in keep]
    tables = build_tables(records, args.by_code)
    if not tables:
        raise SystemExit("no records found")
    text = markdown(tables)
    if args.md:
        args.md.write_text(text)
    else:
        print(text)
    if args.png:
        plot(tables, args.png)


if __name__ == "__main__":
    main()
