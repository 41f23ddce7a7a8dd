"""Reformation on a real model: evaluation perplexity without and with it, for the same sub-networks.

For each kept fraction: the uniform importance-ranked sub-network and the search's best (from
benchmarks/results/subnets/, written by search_quality.py), each reformed with 8, 32 and 128
calibration windows; time and peak memory (process RSS growth) of each reformation. Prints a
Markdown table and writes benchmarks/results/reform_quality.md.

    python benchmarks/reform_quality.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from pathlib import Path

from slimlm.apply import subnetwork_applied
from slimlm.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, model_windows
from slimlm.evaluate import perplexity
from slimlm.importance import cached_calibration, importance
from slimlm.models import load_model
from slimlm.reform import reform
from slimlm.space import uniform_subnetwork
from slimlm.subnet import SubNetwork

RESULTS = Path(__file__).parent / "results"
SEQ_LEN = 256


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_growth(fn):
    """Run ``fn``; return its result and the peak resident memory above the level it started at (MiB)."""
    start, peak, done = rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_mib())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], rss_mib()) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fractions", default="0.9,0.8,0.7,0.5")
    parser.add_argument("--sizes", default="8,32,128", help="calibration windows for reformation")
    parser.add_argument("--strategy", default="evolution", help="whose best sub-networks to reform")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "reform_quality.md")
    args = parser.parse_args()

    loaded = load_model(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    calib = model_windows(loaded, DEFAULT_CALIBRATION, SEQ_LEN, max(sizes))
    ids = model_windows(loaded, DEFAULT_EVALUATION, SEQ_LEN, args.eval_windows)
    scores = importance(loaded, cached_calibration(loaded, calib[:16], DEFAULT_CALIBRATION))
    with subnetwork_applied(loaded, SubNetwork.full(loaded.dims)) as model:
        dense = perplexity(model, ids)
    lines = [
        f"Model `{args.model}`; evaluation perplexity on `{DEFAULT_EVALUATION}` ({args.eval_windows} windows of "
        f"{SEQ_LEN} tokens), dense {dense:.2f}; reformation calibrated on `{DEFAULT_CALIBRATION}`. "
        "Cells: perplexity, reformation seconds, peak RSS growth.",
        "",
        "| kept | sub-network | no reformation | "
        + " | ".join(f"reformed, {n} windows" for n in sizes)
        + " | change at "
        f"{max(sizes)} |",
        "|---|---|---|" + "---|" * (len(sizes) + 1),
    ]
    for fraction in map(float, args.fractions.split(",")):
        subnets = {"uniform importance": uniform_subnetwork(loaded.dims, scores, fraction)}
        path = RESULTS / "subnets" / f"{args.strategy}-{fraction}.json"
        if path.is_file():
            subnets[f"{args.strategy} best"] = SubNetwork.load(path)
        for name, subnet in subnets.items():
            with subnetwork_applied(loaded, subnet) as model:
                before = perplexity(model, ids)
            cells = [f"{before:.2f}"]
            after = before
            for n in sizes:
                start = time.perf_counter()
                reformed, grown = peak_growth(lambda n=n, subnet=subnet: reform(loaded, subnet, calib[:n]))
                seconds = time.perf_counter() - start
                with subnetwork_applied(loaded, subnet, reformed) as model:
                    after = perplexity(model, ids)
                cells.append(f"{after:.2f} ({seconds:.0f} s, +{grown:.0f} MiB)")
            lines.append(f"| {fraction} | {name} | " + " | ".join(cells) + f" | {100 * (after / before - 1):+.1f}% |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
