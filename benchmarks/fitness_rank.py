"""Which fitness predicts the shipped model: KL to dense or perplexity, as rank correlations.

Takes candidates from a finished search's store (spread over its first-stage fitness, so they span
good and bad), scores each on every fitness window as the search does (stitched from the variant
library: KL divergence to the dense model, and perplexity), then builds the model that would be
shipped (sequential reformation on the calibration windows) and measures its perplexity on
evaluation text no fitness saw. Prints and writes the Spearman correlation of each fitness with
that held-out perplexity (``results/fitness_rank.{md,json}``).

    python benchmarks/fitness_rank.py --run runs/demo --candidates 24
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import optuna

from slimlm.apply import subnetwork_applied
from slimlm.data import model_windows
from slimlm.evaluate import fitness, perplexity
from slimlm.reform import reform
from slimlm.report import spearman
from slimlm.search import STUDY_NAME, SearchJob, prepare
from slimlm.space import SearchSpace
from slimlm.strategies import candidate, completed, stage_of

RESULTS = Path(__file__).parent / "results"


def stored_job(run: Path) -> SearchJob:
    """The job a run folder's store was searched with (its identity), pointed at that folder."""
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run.resolve() / 'search.db'}")
    identity = dict(study.user_attrs["job"])
    space = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in identity.pop("space").items()})
    return SearchJob(out=str(run), space=space, **identity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished search's run folder")
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--evaluation", default="austen:prideprejudice")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    job = stored_job(args.run)
    searcher = prepare(job)
    study = optuna.load_study(study_name=STUDY_NAME, storage=job.storage_url())
    first = sorted((t for t in completed(study) if stage_of(t) == 0), key=lambda t: t.values[0])
    picks = [first[round(i * (len(first) - 1) / (args.candidates - 1))] for i in range(args.candidates)]
    evaluation = model_windows(searcher.loaded, args.evaluation, job.seq_len, args.eval_windows)
    rows = []
    for i, trial in enumerate(picks):
        subnet = candidate(trial)
        with subnetwork_applied(searcher.loaded, subnet, searcher.reformed(subnet)) as model:
            scores = fitness(model, searcher.dense, job.fitness_windows)
            stitched = perplexity(model, evaluation)
        with subnetwork_applied(
            searcher.loaded, subnet, reform(searcher.loaded, subnet, searcher.calibration_ids)
        ) as m:
            shipped = perplexity(m, evaluation)
        rows.append({"trial": trial.number, **scores, "evaluation_stitched": stitched, "evaluation_shipped": shipped})
        print(f"{i + 1}/{len(picks)} {json.dumps(rows[-1])}", flush=True)
    shipped = [r["evaluation_shipped"] for r in rows]
    result = {
        "command": "python benchmarks/fitness_rank.py " + " ".join(sys.argv[1:]),
        "minutes": (time.perf_counter() - start) / 60,
        "spearman_kl_shipped": spearman([r["kl"] for r in rows], shipped),
        "spearman_perplexity_shipped": spearman([r["perplexity"] for r in rows], shipped),
        "spearman_kl_stitched": spearman([r["kl"] for r in rows], [r["evaluation_stitched"] for r in rows]),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fitness_rank.json").write_text(json.dumps(result, indent=1) + "\n")
    text = (
        f"`{result['command']}` ({result['minutes']:.0f} min, 2 cores): {len(rows)} candidates of `{job.model}` at "
        f"{job.params_fraction} kept, fitness on {job.fitness_windows} windows, held-out perplexity on "
        f"{args.eval_windows} windows of `{args.evaluation}`.\n\n"
        "| fitness | Spearman with the shipped (sequentially reformed) model's held-out perplexity |\n|---|---|\n"
        f"| KL to dense (stitched library) | {result['spearman_kl_shipped']:.3f} |\n"
        f"| perplexity (stitched library) | {result['spearman_perplexity_shipped']:.3f} |\n\n"
        f"KL against the stitched candidate's own held-out perplexity: {result['spearman_kl_stitched']:.3f}.\n"
    )
    (args.out / "fitness_rank.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
