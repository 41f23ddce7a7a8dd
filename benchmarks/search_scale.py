"""Search throughput with 1 and 2 worker processes on one store (SQLite), on a real model.

Each run is a fresh store with the same job; candidates per minute are over the whole search call,
including the extra worker's start-up (it loads torch, the model and the cached calibration). With
2 workers each uses one torch thread; 1 worker uses both cores. Prints one line per worker count
and the ratio.

    python benchmarks/search_scale.py --model smollm2-135m --evaluations 24
"""

from __future__ import annotations

import argparse
import tempfile
import time

from slimlm.models import load_model
from slimlm.search import SearchJob, search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--evaluations", type=int, default=24)
    parser.add_argument("--strategy", default="random")
    args = parser.parse_args()

    loaded = load_model(args.model)
    rates = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as run:
            job = SearchJob(
                model=args.model,
                out=run,
                params_fraction=0.7,
                strategy=args.strategy,
                evaluations=args.evaluations,
                workers=workers,
            )
            start = time.perf_counter()
            search(job, loaded)
            rates[workers] = args.evaluations / ((time.perf_counter() - start) / 60)
        print(f"{workers} worker(s): {rates[workers]:.1f} candidates/min", flush=True)
    print(f"2 workers / 1 worker = {rates[2] / rates[1]:.2f}x ({args.evaluations} candidates, {args.strategy})")


if __name__ == "__main__":
    main()
