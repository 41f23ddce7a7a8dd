"""Cost of evaluating a candidate in place vs a bare forward pass of the same sub-network.

Every search evaluates candidate after candidate on one loaded model, so applying a sub-network
must cost little more than running it. This times, side by side in one run and interleaved:
  apply   entering and leaving ``subnetwork_applied`` alone
  in place  apply + forward over the windows + restore (what a search pays per candidate)
  bare    the extracted, reloaded model's forward over the same windows
and prints in-place / bare (goal: <= 1.2).

    python benchmarks/apply_cost.py --model smollm2-135m --params 0.7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from slimlm.apply import subnetwork_applied
from slimlm.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, model_windows
from slimlm.extract import extract
from slimlm.importance import activation_importance
from slimlm.models import load_model
from slimlm.space import uniform_subnetwork


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--params", type=float, default=0.7)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    dense = load_model(args.model)
    calib = model_windows(dense, DEFAULT_CALIBRATION, 256, 4)
    subnet = uniform_subnetwork(dense.dims, activation_importance(dense, calib), args.params)
    ids = model_windows(dense, DEFAULT_EVALUATION, args.seq_len, args.windows)
    with tempfile.TemporaryDirectory() as folder:
        bare = load_model(extract(dense, subnet, folder).folder).model

    def apply_only() -> None:
        with subnetwork_applied(dense, subnet):
            pass

    def in_place() -> None:
        with subnetwork_applied(dense, subnet) as model:
            model(input_ids=ids, use_cache=False)

    def bare_forward() -> None:
        bare(input_ids=ids, use_cache=False)

    runs = {"apply": apply_only, "in place": in_place, "bare": bare_forward}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.model}, {args.params:.2f} of parameters, {ids.numel()} tokens ({args.windows}x{args.seq_len}),"
        f" median of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    for name, seconds in median.items():
        print(f"  {name:9s} {1000 * seconds:9.1f} ms")
    print(f"  in place / bare = {median['in place'] / median['bare']:.3f}  (goal <= 1.2)")
    print(f"  apply / bare    = {median['apply'] / median['bare']:.3f}")


if __name__ == "__main__":
    main()
