"""Layer-wise refinement (``slimlm.refine``) of an extracted model, measured before and after.

FOLDER is a smaller model slimlm extracted reformed but not refined (``best/`` of a
``compress --refine-epochs 0`` run; ``slimlm extract RUN --trial N`` now refines as the run did). It is
refined in memory with the given settings on the windows ``compress`` refines on (``--windows``: the
128 calibration windows of the default calibration text, then windows past fitness and selection),
then measured, before and after, on 48 later windows of the calibration source that neither
calibration, fitness nor selection used (the ones the settings are chosen on), on Pride and Prejudice
and pydoc (never used to choose), and on slimlm's chat prompts (KL to the dense model's answers).
Nothing is written to FOLDER.

    python benchmarks/refine.py RUN/best --out benchmarks/results/refine_09
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from slimlm.chat import chat_fidelity, chat_reference
from slimlm.data import model_windows
from slimlm.evaluate import perplexity
from slimlm.jobs import DEFAULT_CALIBRATION, SearchJob
from slimlm.models import load_model
from slimlm.refine import EPOCHS, LEARNING_RATE, refine
from slimlm.reform import DRIFT
from slimlm.search import search_windows
from slimlm.subnet import SubNetwork

HELD = slice(512, 560)  # far past calibration (128), fitness (16), selection (8) and refinement's windows
TEXTS = {"austen": "austen:prideprejudice", "pydoc": "pydoc"}


def measure(model, dense, held, texts, reference) -> dict:
    chat = chat_fidelity(model, dense.tokenizer, reference)
    return {
        "held": perplexity(model, held),
        **{name: perplexity(model, windows) for name, windows in texts.items()},
        "chat_kl": chat["kl_per_token"],
        "dense_token_agreement": chat["dense_token_agreement"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--drift", type=float, default=DRIFT)
    parser.add_argument("--windows", type=int, default=SearchJob.refine_windows, help="refinement windows")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args()

    dense, small = load_model(args.dense), load_model(args.folder)
    kept = SubNetwork.load(Path(args.folder) / "slimlm_subnetwork.json").kept_layers
    job = SearchJob(model=args.dense, out="", refine_windows=args.windows)
    calibration = search_windows(job, dense)[3]  # as compress refines
    end = job.fitness_windows + job.selection_windows + max(args.windows, job.calibration_windows)
    if end > HELD.start:  # the last window refinement trains on
        parser.error(f"--windows {args.windows} reaches the held windows ({HELD.start}-{HELD.stop - 1})")
    held = model_windows(dense, DEFAULT_CALIBRATION, SearchJob.seq_len, HELD.stop)[HELD]
    texts = {name: model_windows(dense, spec, SearchJob.seq_len, 16) for name, spec in TEXTS.items()}
    reference = chat_reference(dense.model, dense.tokenizer)
    before = measure(small.model, dense, held, texts, reference)
    start = time.perf_counter()
    refine(small, dense, kept, calibration, args.epochs, args.learning_rate, args.drift)
    seconds = time.perf_counter() - start
    after = measure(small.model, dense, held, texts, reference)
    result = {"folder": args.folder, **vars(args), "seconds": seconds, "before": before, "after": after}
    rows = [f"| {key} | {before[key]:.3f} | {after[key]:.3f} |" for key in before]
    table = "\n".join(["| measure | before | after |", "|---|---|---|", *rows])
    print(f"{args.epochs} epochs from {args.learning_rate:g}, drift {args.drift:g}: {seconds:.0f} s\n{table}")
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=2))
        Path(f"{args.out}.md").write_text(
            f"`python benchmarks/refine.py {' '.join(sys.argv[1:])}`\n\n{args.epochs} epochs over "
            f"{len(calibration)} windows, learning rate "
            f"{args.learning_rate:g} (cosine to 0), drift {args.drift:g}; refinement {seconds:.0f} s on this machine."
            f"\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
