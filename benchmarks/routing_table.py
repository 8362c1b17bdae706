"""The routing comparison table, from the runs in a results folder (and, if present, its benchmark JSON).

Each sub-folder of ``RESULTS`` that holds a finished run (``config.json`` and ``results.json`` from ``train.py``) is one
row: the routing (``model.routing``; the architecture for other models), epochs, best validation and final test
accuracy, the median epoch time (``metrics.jsonl``), the command and the machine (``record.json`` written by
``python -m capsjax.results collect``, or a ``command`` file). With
``RESULTS/benchmark.json`` (``benchmarks/routing_compare.py``'s output) the step time, XLA scratch and peak RSS of the
same routing join the row. Prints a Markdown table (``--json``: the rows as JSON; ``--write README.md``: puts it
between the README's routing-table markers; ``--check``: fails if the README's table is not current).

    python benchmarks/routing_table.py results/routing --write README.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


SINGLE_PASS = ("self_attention", "efficient_capsnet")  # routings without iterations

def run_row(folder: Path) -> dict | None:
    """One finished run's row, or None if ``folder`` holds none."""
    if not (folder / "config.json").exists() or not (folder / "results.json").exists():
        return None
    config = json.loads((folder / "config.json").read_text())
    results = json.loads((folder / "results.json").read_text())
    model = config["model"]
    arch = model.get("arch", "capsnet")
    epoch_times = []
    if (folder / "metrics.jsonl").exists():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("split") == "validation" and "epoch_time_s" in record:
                epoch_times.append(record["epoch_time_s"])
    record = json.loads((folder / "record.json").read_text()) if (folder / "record.json").exists() else {}
    command = (folder / "command").read_text().strip() if (folder / "command").exists() else record.get("command", "")
    routing = model.get("routing", "dynamic") if arch == "capsnet" else arch  # other models ignore model.routing
    return {
        "run": folder.name,
        "routing": routing,
        # EM's final inverse temperature (runs made before the field existed used 1)
        "em_inverse_temperature": model.get("routing_em_inverse_temperature", 1.0) if routing == "em" else None,
        # self-attention routing (Efficient-CapsNet's too) is one pass, whatever model.routing_iterations says
        "routing_iterations": "one pass" if routing in SINGLE_PASS else model.get("routing_iterations"),
        "epochs": results.get("epochs"),
        "best_validation_accuracy": results.get("best_validation_accuracy"),
        "test_accuracy": results.get("test_accuracy"),
        "epoch_time_s": round(statistics.median(epoch_times), 1) if epoch_times else None,
        "command": command,
        "machine": record.get("machine", ""),
    }


def rows(results_dir: Path) -> list[dict]:
    """The rows of every finished run under ``results_dir``, joined with ``benchmark.json`` by routing."""
    table = [row for folder in sorted(results_dir.iterdir()) if folder.is_dir() for row in [run_row(folder)] if row]
    table.sort(key=lambda row: (row["routing"], row["em_inverse_temperature"] or 0.0))
    bench_file = results_dir / "benchmark.json"
    if bench_file.exists():
        bench = {r["routing"]: r for r in json.loads(bench_file.read_text().strip().splitlines()[-1])["routings"]}
        for row in table:
            measured = bench.get(row["routing"], {})
            for key in ("params", "train_step_s", "scratch_mib", "peak_rss_mib"):
                row[key] = measured.get(key)
    return table


def markdown(table: list[dict]) -> str:
    def pct(x):
        return "" if x is None else f"{100 * x:.2f}%"

    def val(x):
        return "" if x is None else str(x)

    lines = ["| routing | iterations | epochs | validation accuracy | test accuracy | s/epoch | parameters | train step (s) "
             "| XLA scratch (MiB) | peak RSS (MiB) | command | machine |", "|" + "---|" * 12]  # fmt: skip
    for r in table:
        routing = r["routing"]
        if r.get("em_inverse_temperature") is not None:
            routing += f" (final λ {r['em_inverse_temperature']:g})"
        cells = [routing, val(r["routing_iterations"]), val(r["epochs"]), pct(r["best_validation_accuracy"]),
                 pct(r["test_accuracy"]), val(r["epoch_time_s"]), val(r.get("params")), val(r.get("train_step_s")),
                 val(r.get("scratch_mib")), val(r.get("peak_rss_mib")), f"`{r['command']}`" if r["command"] else "",
                 r.get("machine", "")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def BEGIN(results: Path) -> str:
    return f"<!-- routing table: begin (python benchmarks/routing_table.py {results.as_posix()} --write README.md) -->"


END = "<!-- routing table: end -->"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="folder of runs, e.g. results/routing")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of Markdown")
    parser.add_argument("--write", type=Path, metavar="README", help="put the table between README's markers")
    parser.add_argument("--check", action="store_true", help="with --write: fail if README's table is not current")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        raise SystemExit(f"{args.results} is not a folder of runs")
    table = rows(args.results)
    if args.write:
        from capsjax.results import replace_between_markers

        try:
            current = replace_between_markers(args.write, BEGIN(args.results), END, markdown(table), check=args.check)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        if not current:
            raise SystemExit(f"{args.write}'s routing table differs from {args.results}: rerun without --check")
    else:
        print(json.dumps(table) if args.json else markdown(table))
    return table


if __name__ == "__main__":
    main()
