"""The drift picture of long quality cells: teacher AP of every arm and pseudo-label precision against the step.

    python bench/drift.py bench/results/long_supervised.json ema0996=bench/results/long_ema0996.json ... \
        --out docs/img

Reads the rows `bench/quality.py` writes (each with its evaluation `history`; `NAME=FILE` names the arm of
a file whose rows carry no variant), or, for an arm still running,
its console log (`--log NAME=FILE`: the `{"step": ..., "teacher/bbox/AP": ...}` lines print_sink writes).
Draws one PNG per cell (arch, labels %, seed): teacher AP of each arm on top, the pseudo-label precision
of each evaluation interval below (the supervised arm's teacher, scored on the same stream, dashed). Prints one table row per arm: AP at the last step,
ratio to the supervised arm, rare-class AP, pseudo-label precision/recall/boxes per image of the last interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Cell = tuple[str, float, int]


def _rows(specs: list[str]) -> list[dict]:
    rows = []
    for spec in specs:
        name, _, path = spec.rpartition("=")
        for row in json.loads(Path(path).read_text()):
            rows.append({**row, "variant": name} if name else row)
    return rows


def _log_history(path: str) -> list[dict]:
    """Evaluation entries from a running arm's console log (teacher/student AP and interval pseudo-labels)."""
    history = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("{") or "teacher/bbox/AP" not in line:
            continue
        entry = json.loads(line)
        history.append(
            {
                "step": entry["step"],
                "teacher_AP": entry["teacher/bbox/AP"],
                "student_AP": entry.get("student/bbox/AP"),
                "pseudo_label_precision": entry.get("interval/pseudo_label_precision"),
                "pseudo_label_recall": entry.get("interval/pseudo_label_recall"),
                "pseudo_labels_per_image": entry.get("interval/pseudo_labels_per_image"),
                "pseudo_label_wrong_class": entry.get("interval/pseudo_label_wrong_class"),
            }
        )
    return history


def _running_rows(logs: list[str], cell: Cell) -> list[dict]:
    rows = []
    for spec in logs:
        name, path = spec.split("=", 1)
        history = _log_history(path)
        if history:
            rows.append({"arch": cell[0], "percent": cell[1], "seed": cell[2], "variant": name, "history": history})
    return rows


def _name(row: dict) -> str:
    if row.get("method") == "supervised":  # the baseline of a file that also holds a named UT arm
        return "supervised"
    return row.get("variant") or row["method"]


def draw(cell: Cell, rows: list[dict], out: Path) -> Path:
    figure = Figure(figsize=(7, 6.5))
    ap_axes, pl_axes = figure.subplots(2, 1, sharex=True)
    for index, row in enumerate(rows):
        color, style = f"C{index}", "--" if _name(row) == "supervised" else "-"
        steps = [h["step"] for h in row["history"]]
        ap_axes.plot(steps, [h["teacher_AP"] for h in row["history"]], marker="o", color=color, label=_name(row))
        precision = [(h["step"], h.get("pseudo_label_precision")) for h in row["history"]]
        precision = [(s, p) for s, p in precision if p is not None]
        if precision:
            pl_axes.plot(*zip(*precision), marker="o", color=color, linestyle=style, label=_name(row))
    arch, percent, seed = cell
    ap_axes.set(ylabel="teacher AP", title=f"{arch}, {percent:g} % labels, seed {seed}")
    pl_axes.set(xlabel="step", ylabel="pseudo-label precision (interval)")
    ap_axes.legend(fontsize=8)
    pl_axes.legend(fontsize=8)
    ap_axes.grid(alpha=0.3)
    pl_axes.grid(alpha=0.3)
    path = out / f"drift_{arch}_p{percent:g}_s{seed}.png"
    FigureCanvasAgg(figure).print_png(str(path))
    return path


def table(rows: list[dict]) -> str:
    def num(value: float | None, digits: int = 2) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    supervised = {(r["arch"], r["percent"], r["seed"]): r for r in rows if _name(r) == "supervised"}
    lines = [
        "| cell | arm | step | AP | ratio | rare AP | PL precision | PL recall | PL / image | PL wrong class |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        last = r["history"][-1]
        base = supervised.get((r["arch"], r["percent"], r["seed"]))
        base_ap = {h["step"]: h["teacher_AP"] for h in base["history"]}.get(last["step"]) if base else None
        ratio = last["teacher_AP"] / base_ap if base_ap and _name(r) != "supervised" else None
        lines.append(
            f"| {r['arch']} {r['percent']:g} % s{r['seed']} | {_name(r)} | {last['step']} | {num(last['teacher_AP'])} "
            f"| {num(ratio)} | {num(r.get('rare_AP'))} | {num(last.get('pseudo_label_precision'))} "
            f"| {num(last.get('pseudo_label_recall'))} | {num(last.get('pseudo_labels_per_image'))} "
            f"| {num(last.get('pseudo_label_wrong_class'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", help="results files of bench/quality.py, each FILE or NAME=FILE")
    parser.add_argument("--log", action="append", default=[], help="NAME=FILE: an arm still running, from its log")
    parser.add_argument("--cell", default="faster_rcnn,1,0", help="the cell of the --log arms: arch,percent,seed")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    arch, percent, seed = args.cell.split(",")
    rows = _rows(args.results) + _running_rows(args.log, (arch, float(percent), int(seed)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = sorted({(r["arch"], r["percent"], r["seed"]) for r in rows})
    for cell in cells:
        print(draw(cell, [r for r in rows if (r["arch"], r["percent"], r["seed"]) == cell], out))
    print(table(rows))


if __name__ == "__main__":
    main()
