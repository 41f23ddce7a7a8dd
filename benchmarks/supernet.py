"""One-shot NAS against training-free search at equal wall-clock time (issue 6's benchmark).

(a) training-free: evolution search on the dense model, then reformation of the best;
(b) train the model as a super-network for ``--train-steps`` steps, then the same search on it;
(c) as (b), with the predictor-assisted search (``linas``).
(b) and (c) run ``--evaluations`` candidates after training; (a) gets as many more candidates as
the training time buys at (b)'s measured search rate, so all three spend about the same wall time. Training
text (``--train-data``) is apart from both the calibration text (fitness) and the evaluation
text. For every kept fraction: wall time, candidates, the hypervolume of the evaluated front on
the evaluation text against the original dense model (so a trained model is not its own
reference), and the evaluation perplexity of the extracted best. Writes ``supernet.md`` and
``supernet.json`` (with every front) and ``supernet.png`` (the fronts) to benchmarks/results/.

    python benchmarks/supernet.py --model smollm2-135m --train-steps 60 --evaluations 40
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

from slimlm.costs import static_cost
from slimlm.data import DEFAULT_EVALUATION, model_windows
from slimlm.evaluate import perplexity
from slimlm.models import load_model
from slimlm.report import hypervolume, perplexity_axes, write_report
from slimlm.search import SearchJob, search
from slimlm.train import TrainJob, train

matplotlib.use("Agg")

from matplotlib import pyplot as plt

RESULTS = Path(__file__).parent / "results"
COLORS = ("tab:blue", "tab:orange", "tab:green")
ONE_SHOT = (("(b) super-network, evolution", "evolution"), ("(c) super-network, linas", "linas"))


def searched(model: str, out: str, fraction: float, strategy: str, evaluations: int, windows: int, dense) -> dict:
    """One search and its report: wall times, candidates, front, hypervolume, best evaluation perplexity."""
    start = time.perf_counter()
    job = SearchJob(
        model=model,
        out=out,
        params_fraction=fraction,
        strategy=strategy,
        evaluations=evaluations,
        evaluation_windows=windows,
    )
    searcher, study = search(job)
    search_seconds = time.perf_counter() - start
    report = write_report(searcher, study)
    front = [(m["params"], m["evaluation_perplexity"]) for m in report["front"]]
    best = next(m for m in report["front"] if m["trial"] == report["best_trial"])
    return {
        "seconds": time.perf_counter() - start,
        "search_seconds": search_seconds,
        "evaluations": report["evaluations"],
        "hypervolume": hypervolume(front, *dense),
        "best_perplexity": report["best_evaluation_perplexity"],
        "best_params": best["params"],
        "best_reformed": report["best_reformed"],
        "front": front,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fractions", default="0.8,0.5")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--train-data", default="austen:sensesensibility+pydoc:tutorial")
    parser.add_argument("--strategy", default="sandwich", help="super-network training strategy")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--evaluations", type=int, default=40, help="candidates per search after training")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    command = "python benchmarks/supernet.py " + " ".join(sys.argv[1:])
    rows = []
    original = load_model(args.model)
    ids = model_windows(original, DEFAULT_EVALUATION, 256, args.eval_windows)
    dense = (static_cost(original.dims).params, perplexity(original.model, ids, description="dense perplexity"))
    del original
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        job = TrainJob(
            model=args.model,
            out=f"{scratch}/super",
            data=args.train_data,
            steps=args.train_steps,
            strategy=args.strategy,
            lora_rank=args.lora_rank,
        )
        trained = str(train(job))
        train_seconds = time.perf_counter() - start
        for fraction in map(float, args.fractions.split(",")):
            one_shot = {}
            for name, strategy in ONE_SHOT:
                out = f"{scratch}/{strategy}-{fraction}"
                one_shot[name] = searched(trained, out, fraction, strategy, args.evaluations, args.eval_windows, dense)
                one_shot[name]["seconds"] += train_seconds
            rate = args.evaluations / one_shot[ONE_SHOT[0][0]]["search_seconds"]  # candidates per second searching
            budget = args.evaluations + round(train_seconds * rate)
            out = f"{scratch}/free-{fraction}"
            free = searched(args.model, out, fraction, "evolution", budget, args.eval_windows, dense)
            for name, result in {"(a) training-free evolution": free, **one_shot}.items():
                rows.append({"fraction": fraction, "method": name, **result})
                print(json.dumps(rows[-1]), flush=True)
    write(args, rows, command, train_seconds)
    plot(rows, dense, args.out / "supernet.png")


def write(args, rows: list[dict], command: str, train_seconds: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "supernet.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        f"`{command}`: super-network training {train_seconds / 60:.1f} min ({args.strategy}, "
        f"{args.train_steps} steps on `{args.train_data}`); evaluation perplexity on `{DEFAULT_EVALUATION}` "
        f"({args.eval_windows} windows of 256 tokens), best model reformed where that scored better; hypervolume "
        "of the evaluated front (kept parameters, log evaluation perplexity over the original dense model), "
        "reference (1, log 100).",
        "",
        "| kept | method | candidates | wall min | hypervolume | best perplexity |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['fraction']} | {r['method']} | {r['evaluations']} | {r['seconds'] / 60:.1f} | {r['hypervolume']:.4f} "
        f"| {r['best_perplexity']:.2f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "supernet.md").write_text(text)
    print(text)


def plot(rows: list[dict], dense: tuple[int, float], path: Path) -> None:
    """Per kept fraction: each method's evaluated front and its extracted best, against the dense model."""
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(fractions), figsize=(6 * len(fractions), 4.5), dpi=120, squeeze=False)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        for color, row in zip(COLORS, (r for r in rows if r["fraction"] == fraction), strict=False):
            params, ppl = zip(*sorted(row["front"]), strict=True)
            ax.plot([p / 1e6 for p in params], ppl, "o-", color=color, label=f"{row['method']} front")
            best = "reformed best" if row["best_reformed"] else "best"
            ax.scatter(
                [row["best_params"] / 1e6],
                [row["best_perplexity"]],
                marker="*",
                s=160,
                color=color,
                edgecolors="black",
                zorder=5,
                label=best,
            )
        ax.scatter([dense[0] / 1e6], [dense[1]], marker="*", s=160, color="black", label="dense")
        perplexity_axes(ax, f"kept {fraction}", "evaluation perplexity (log scale)", legend_size=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
