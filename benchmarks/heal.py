"""Recovery distillation on SmolLM2: what `slimlm heal` wins back, and what a step costs.

For each kept fraction, the sub-network `compress` starts its search from (FLAP's per-layer
allocation at the budget, units ranked by the default importance, reformed sequentially from the
default calibration windows) is extracted, then healed from the dense model with `slimlm heal`'s
defaults on the calibration text, measured after each number of steps (a run resumed to the next
count, as `--resume` does). Measured each time: perplexity on the evaluation texts (never trained
on), slimlm's last-word cloze accuracy and chat fidelity against the dense model's answers.
Writes ``results/NAME.{md,json}``.

    python benchmarks/heal.py --model smollm2-135m --fractions 0.7 --steps 100,300
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from slimlm.chat import chat_fidelity, chat_reference
from slimlm.costs import static_cost
from slimlm.data import DEFAULT_CALIBRATION, model_windows
from slimlm.evaluate import perplexity
from slimlm.extract import extract
from slimlm.heal import HealJob, heal
from slimlm.importance import cached_calibration, importance
from slimlm.models import load_model
from slimlm.prune import flap_shapes, params_budget
from slimlm.reform import reform
from slimlm.search import SearchJob
from slimlm.space import SearchSpace
from slimlm.tasks import LASTWORD, build_task, evaluate_task

RESULTS = Path(__file__).parent / "results"
TEXTS = {"austen": "austen:prideprejudice", "pydoc": "pydoc"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fractions", default="0.7")
    parser.add_argument("--steps", default="100,300", help="step counts measured (one run, resumed)")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=HealJob.learning_rate)
    parser.add_argument("--mixed-precision", default=HealJob.mixed_precision, help="auto, no, bf16, fp16")
    parser.add_argument("--calib", default=DEFAULT_CALIBRATION, help="calibration of the start (importance, reform)")
    parser.add_argument("--data", default=HealJob.data, help="what the student heals on (e.g. chat+austen:emma)")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--cloze-examples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="heal", help="results file stem (OUT/NAME.md, OUT/NAME.json)")
    args = parser.parse_args()
    command = "python benchmarks/heal.py " + " ".join(sys.argv[1:])
    seq_len, calib_windows = SearchJob.seq_len, SearchJob.calibration_windows

    dense = load_model(args.model)
    calib = model_windows(dense, args.calib, seq_len, calib_windows)
    texts = {n: model_windows(dense, s, seq_len, args.eval_windows) for n, s in TEXTS.items()}
    cloze = build_task(LASTWORD, TEXTS["austen"], dense.tokenizer, examples=args.cloze_examples)
    reference = chat_reference(dense.model, dense.tokenizer)
    calibration = cached_calibration(dense, calib, args.calib)
    scores = importance(dense, calibration)
    dims, space = dense.dims, SearchSpace()
    settings = dict(data=args.data, lora_rank=args.lora_rank, learning_rate=args.learning_rate)
    settings |= dict(mixed_precision=args.mixed_precision)
    defaults = asdict(HealJob(model="", teacher="", out="", **settings)) | {"calibration": args.calib}
    began = time.perf_counter()  # the healing data made once (the teacher's chat is cached), not in a step's time
    model_windows(dense, args.data, HealJob.seq_len)
    defaults["data_seconds"] = round(time.perf_counter() - began, 1)
    rows = [{"fraction": 1.0, "steps": None} | measure(dense.model, dense, texts, cloze, reference)]
    write(args, rows, command, defaults)
    with tempfile.TemporaryDirectory(prefix="slimlm-heal-") as tmp:
        for fraction in map(float, args.fractions.split(",")):
            budget = params_budget(dims, fraction)

            def within(shapes, budget=budget) -> bool:
                return static_cost(dims, shapes, context=seq_len).params <= budget

            start = space.starts(dims, scores, within, flap_shapes(dense, calibration, budget))[0]
            pruned = extract(dense, start, Path(tmp) / f"pruned-{fraction}", reform(dense, start, calib)).folder
            student = load_model(pruned)
            rows.append({"fraction": fraction, "steps": 0} | measure(student.model, dense, texts, cloze, reference))
            write(args, rows, command, defaults)
            done = 0
            for steps in [int(s) for s in args.steps.split(",") if s]:  # "" measures the start only
                job = HealJob(model=str(pruned), teacher=args.model, out=str(Path(tmp) / f"healed-{fraction}"))
                job = replace(job, **settings, steps=steps, resume=done > 0)
                began = time.perf_counter()
                healed = load_model(heal(job, teacher=dense))
                seconds = time.perf_counter() - began
                row = {"fraction": fraction, "steps": steps, "seconds_per_step": seconds / (steps - done)}
                rows.append(row | measure(healed.model, dense, texts, cloze, reference))
                write(args, rows, command, defaults)
                done = steps


def measure(model, dense, texts: dict, cloze, reference) -> dict:
    chat = chat_fidelity(model, dense.tokenizer, reference)
    return {f"ppl_{n}": perplexity(model, w) for n, w in texts.items()} | {
        "cloze": evaluate_task(model, cloze).accuracy,
        "chat_kl": chat["kl_per_token"],
        "chat_first_tokens": chat["first_tokens_match"],
        "chat_agreement": chat["dense_token_agreement"],
        "chat_position_agreement": chat["position_agreement"],
        "sample": chat["samples"][0],
    }


def write(args, rows: list[dict], command: str, defaults: dict) -> None:
    """Rewrite the tables after every row, so a stopped run keeps what it measured."""
    print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "heal": defaults, "rows": rows}
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    lines = [
        "# Recovery distillation (`slimlm heal`)",
        "",
        f"`{command}`",
        "",
        "Per fraction: `compress`'s start sub-network (FLAP allocation, default importance, reformed), calibrated "
        f"on `{defaults['calibration']}`, extracted, "
        f"then healed from the dense model with `slimlm heal` (learning rate {defaults['learning_rate']}, "
        f"batch {defaults['batch_size']} x {defaults['seq_len']} tokens, pure KL at temperature "
        f"{defaults['temperature']}, LoRA rank {args.lora_rank or 'none: full fine-tuning'}, mixed precision "
        f"{defaults['mixed_precision']}) on `{defaults['data']}`. "
        "Perplexity on evaluation texts never trained on; cloze: slimlm-lastword; chat: KL to the dense model's "
        "answers (nats per token) and the share of answers whose first 10 tokens are the dense one's. "
        f"Seconds per step on this machine (2 cores); making the healing data took {defaults['data_seconds']:.0f} s "
        "before the first step (the teacher's chat answers; cached on disk after the first run).",
        "",
        "| kept | steps | s/step | austen | pydoc | cloze | chat KL | first tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        steps = "dense" if r["steps"] is None else str(r["steps"])
        per_step = f"{r['seconds_per_step']:.1f}" if "seconds_per_step" in r else "-"
        lines.append(
            f"| {r['fraction']:g} | {steps} | {per_step} | {r['ppl_austen']:.2f} | {r['ppl_pydoc']:.2f} "
            f"| {r['cloze']:.3f} | {r['chat_kl']:.3f} | {r['chat_first_tokens']:.0%} |"
        )
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
