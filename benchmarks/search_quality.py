"""Search quality and cost on a real model: each strategy's best vs the importance-ranked uniform sub-network.

For every kept fraction and strategy, one search (same calibration and evaluation texts, same
seed), then the evaluation-text perplexity of the best sub-network within the budget, next to the
uniform importance-ranked sub-network at the same budget and the dense model. Also candidates per
minute. Prints a Markdown table and writes it to benchmarks/results/search_quality.md; the best
sub-networks go to benchmarks/results/subnets/ for the reformation benchmark. Perplexities here
are without reformation (see reform_quality.py).

    python benchmarks/search_quality.py --model smollm2-135m --evaluations 40
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from slimlm.models import load_model
from slimlm.report import write_report
from slimlm.search import SearchJob, search
from slimlm.strategies import STRATEGIES
from slimlm.subnet import SubNetwork

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fractions", default="0.9,0.8,0.7,0.5")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--evaluations", type=int, default=40)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "search_quality.md")
    args = parser.parse_args()

    loaded = load_model(args.model)
    strategies = args.strategies.split(",")
    rows, dense = [], None
    with tempfile.TemporaryDirectory() as runs:
        for fraction in map(float, args.fractions.split(",")):
            row = {"fraction": fraction}
            for strategy in strategies:
                job = SearchJob(
                    model=args.model,
                    out=f"{runs}/{strategy}-{fraction}",
                    params_fraction=fraction,
                    strategy=strategy,
                    evaluations=args.evaluations,
                    evaluation_windows=args.eval_windows,
                    reform=False,
                )
                start = time.perf_counter()
                searcher, study = search(job, loaded)
                minutes = (time.perf_counter() - start) / 60
                report = write_report(searcher, study, front_size=3)
                best = next(m for m in report["front"] if m["trial"] == report["best_trial"])
                (RESULTS / "subnets").mkdir(parents=True, exist_ok=True)
                SubNetwork.from_json(best["subnet"]).save(RESULTS / "subnets" / f"{strategy}-{fraction}.json")
                row[strategy] = (best["evaluation_perplexity"], best["params_fraction"], args.evaluations / minutes)
                row["uniform"] = (
                    report["uniform_importance"]["evaluation_perplexity"],
                    report["uniform_importance"]["params_fraction"],
                )
                dense = report["dense"]["evaluation_perplexity"]
            rows.append(row)
            print(row, flush=True)

    lines = [
        f"Model `{args.model}`, {args.evaluations} evaluated candidates per search, evaluation perplexity on "
        f"`austen:prideprejudice` ({args.eval_windows} windows of 256 tokens); calibration and fitness on "
        f"`austen:emma`. Dense perplexity {dense:.2f}. Cells: perplexity (kept fraction of parameters).",
        "",
        "| kept | uniform (importance) | " + " | ".join(strategies) + " |",
        "|---|---|" + "---|" * len(strategies),
    ]
    for row in rows:
        cells = [f"{row['uniform'][0]:.2f} ({row['uniform'][1]:.3f})"]
        cells += [f"{row[s][0]:.2f} ({row[s][1]:.3f})" for s in strategies]
        lines.append(f"| {row['fraction']} | " + " | ".join(cells) + " |")
    speed = ", ".join(f"{s} {sum(r[s][2] for r in rows) / len(rows):.1f}" for s in strategies)
    lines += ["", f"Candidates per minute (search loop only, 2 cores): {speed}.", ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
