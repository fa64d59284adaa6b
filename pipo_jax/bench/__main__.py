"""``python -m pipo_jax.bench report RESULTS... [--json OUT] [--markdown OUT]``.

Prints one markdown table across benchmarks and runs, in the layout of the paper's Table 1
(avg@k / pass@k in % per benchmark, then Overall), from the result files that
``python decode.py --run RUN --bench FILE...`` writes; then the decode statistics of every
(model, benchmark) and, where questions carry tags, avg@k per tag value. RESULTS are result files
(``<benchmark>.<model>.jsonl``) or directories of them.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipo_jax.bench.report import (
    build_report,
    format_markdown,
    load_results,
    report_json,
    write_text,
)
from pipo_jax.cli import run_main


def main(argv: list[str]) -> int:
    """The command line; returns the exit status (user errors are raised as ``BenchError``)."""
    p = argparse.ArgumentParser(prog="python -m pipo_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="one results table across benchmarks")
    report.add_argument("results", nargs="+", metavar="RESULTS",
                        help="result files or directories of them (every *.jsonl there with "
                        "a result header)")
    report.add_argument("--json", metavar="OUT", help="also write the report as JSON, every "
                        "number unrounded")
    report.add_argument("--markdown", metavar="OUT", help="also write the markdown to OUT")
    args = p.parse_args(argv)
    result = build_report(load_results(args.results))
    text = format_markdown(result)
    # Files are written before printing, so a bad --json path fails before any output.
    if args.json:
        write_text(json.dumps(report_json(result), indent=2) + "\n", args.json)
    if args.markdown:
        write_text(text, args.markdown)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
