"""Does scoring candidates after reformation (``search --reform-candidates``) change which sub-network wins?

Two evolutionary searches on the same budget, seed and texts: one scores candidates as they are,
one scores them after reformation. Each search's best is then reformed (as ``compress`` does) and
evaluated on the evaluation text. Prints the two perplexities, the search times, and how much the
two winners overlap (shared kept neurons).

    python benchmarks/reform_in_search.py --model smollm2-135m --params 0.7 --evaluations 32
"""

from __future__ import annotations

import argparse
import tempfile
import time

from slimlm.apply import subnetwork_applied
from slimlm.data import model_windows
from slimlm.evaluate import perplexity
from slimlm.models import load_model
from slimlm.reform import reform
from slimlm.report import pareto_front
from slimlm.search import SearchJob, search
from slimlm.strategies import candidate, completed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--params", type=float, default=0.7)
    parser.add_argument("--evaluations", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=8)
    args = parser.parse_args()

    loaded = load_model(args.model)
    winners = {}
    for scored_reformed in (False, True):
        with tempfile.TemporaryDirectory() as run:
            job = SearchJob(
                model=args.model,
                out=run,
                params_fraction=args.params,
                evaluations=args.evaluations,
                reform_candidates=scored_reformed,
                calibration_windows=16,
                fitness_windows=4,
            )
            start = time.perf_counter()
            searcher, study = search(job, loaded)
            minutes = (time.perf_counter() - start) / 60
            best = min(pareto_front(completed(study)), key=lambda t: t.values[0])
            subnet = candidate(best)
            ids = model_windows(loaded, job.evaluation, job.seq_len, args.eval_windows)
            with subnetwork_applied(loaded, subnet, reform(loaded, subnet, searcher.calibration_ids)) as model:
                winners[scored_reformed] = (subnet, perplexity(model, ids), minutes)
    for scored_reformed, (_, ppl, minutes) in winners.items():
        how = "scored after reformation" if scored_reformed else "scored as is"
        print(f"candidates {how:25s}: best, reformed, evaluation perplexity {ppl:.2f} (search {minutes:.1f} min)")
    a, b = winners[False][0], winners[True][0]
    shared = sum(len(set(a.layers[i].neurons) & set(b.layers[i].neurons)) for i in a.layers if i in b.layers)
    total = sum(len(k.neurons) for k in a.layers.values())
    print(f"the two winners share {shared / total:.1%} of kept neurons; identical: {a == b}")


if __name__ == "__main__":
    main()
