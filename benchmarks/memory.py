"""Peak resident memory of `slimlm compress`, phase by phase, against the size of the model's weights.

Runs `slimlm compress MODEL` in a child process (piped, as a batch job runs it) and samples the
child's resident memory every 0.2 s, charging each sample to the phase its log was in (the text of
the last progress line before its counts). Also measures a process that only loads the model, so the
runtime's own share (Python, torch, the tokenizer) is visible. Example:

    python benchmarks/memory.py --models smollm2-135m,gemma3-270m --evaluations 24 --name memory
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PHASE = re.compile(r"^(.*?)(?::? \d+/\d+ \(|$)")  # "calibrating: 3/32 (12 s ...)" -> "calibrating"
LOAD_ONLY = "import sys; from slimlm.models import load_model; load_model(sys.argv[1], dtype=sys.argv[2])"


def resident_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None  # the process has ended
    return None


def last_phase(log: Path) -> str:
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 4096))
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    return PHASE.match(lines[-1]).group(1).strip()[:60] if lines else "starting"


def sampled(args: list[str], log: Path) -> tuple[int, dict[str, int], float, int]:
    """Run ``args`` with its output in ``log``; its peak resident bytes, the peak per phase, seconds, exit code."""
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        phases: dict[str, int] = {}
        while child.poll() is None:
            rss = resident_bytes(child.pid)
            if rss is not None:
                phase = last_phase(log)
                phases[phase] = max(phases.get(phase, 0), rss)
            time.sleep(0.2)
    return max(phases.values(), default=0), phases, time.perf_counter() - start, child.returncode


def weights_bytes(model: str, dtype: str) -> tuple[int, int]:
    """Parameters and their bytes in ``dtype``, read from the loaded model (in this process, then gone)."""
    import torch

    from slimlm.costs import static_cost
    from slimlm.models import load_model

    params = static_cost(load_model(model).dims).params
    return params, params * torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def measure(model: str, dtype: str, fraction: float, evaluations: int, work: Path) -> dict:
    params, weights = weights_bytes(model, dtype)
    load_peak, _, _, code = sampled([sys.executable, "-c", LOAD_ONLY, model, dtype], work / f"{model}-load.log")
    if code:
        raise SystemExit(f"loading {model} failed: see {work / f'{model}-load.log'}")
    run = work / f"{model}-{dtype}"
    command = ["slimlm", "compress", model, "--non-embedding", str(fraction), "--out", str(run)]
    command += ["--evaluations", str(evaluations)] + (["--dtype", dtype] if dtype != "float32" else [])
    peak, phases, seconds, code = sampled(command, work / f"{model}-{dtype}.log")
    if code:
        raise SystemExit(f"compress failed ({code}): see {work / f'{model}-{dtype}.log'}")
    top = sorted(phases.items(), key=lambda kv: -kv[1])[:4]
    return {
        "model": model,
        "dtype": dtype,
        "params": params,
        "weights_bytes": weights,
        "load_only_peak_bytes": load_peak,
        "compress_peak_bytes": peak,
        "peak_over_weights": peak / weights,
        "peak_over_load_only": peak / load_peak,
        "peak_phases": dict(top),
        "phases": phases,  # every phase's peak, in the order the phases began
        "seconds": seconds,
        "command": " ".join(command),
    }


def table(rows: list[dict]) -> str:
    mb = 2**20
    lines = [
        "| model | dtype | weights | load only | compress peak | peak / weights | peak / load only | peak phases |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        phases = "; ".join(f"{name} {rss / mb:.0f} MB" for name, rss in r["peak_phases"].items())
        weights, load_only = r["weights_bytes"] / mb, r["load_only_peak_bytes"] / mb
        lines.append(
            f"| {r['model']} | {r['dtype']} | {weights:.0f} MB | {load_only:.0f} MB"
            f" | {r['compress_peak_bytes'] / mb:.0f} MB | {r['peak_over_weights']:.2f}x"
            f" | {r['peak_over_load_only']:.2f}x | {phases} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--fraction", type=float, default=0.7, help="kept fraction of the non-embedding parameters")
    parser.add_argument("--evaluations", type=int, default=24, help="memory hardly depends on it; time does")
    parser.add_argument("--name", default="memory")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for dtype in args.dtypes.split(","):
                rows.append(measure(model, dtype, args.fraction, args.evaluations, Path(tmp)))
                print(table(rows[-1:]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2))
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{args.name}.md").write_text(f"# Peak memory of compress\n\n`{command}`\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
