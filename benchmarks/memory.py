"""Peak resident memory of `slimlm compress`, phase by phase, against the size of the model's weights.

Runs `slimlm compress MODEL` in a child process (piped, as a batch job runs it), held in memory or
streamed layer by layer (`--modes memory,stream`), and samples the child's resident memory every
0.2 s, charging each sample to the phase its log was in (the text of the last progress line before its
counts). Also measures a process that only imports slimlm (the runtime: Python, torch, transformers)
and one that only loads the model, so their shares are visible.

The target of issue 17 is at most 1.5x the weights plus the calibration activations, the states that
sequential reformation must hold at once: for every calibration token, a layer's input and output
(2 x hidden) and the widest projection input it solves for (all heads' outputs or all neurons), in
float32. Example:

    python benchmarks/memory.py --models smollm2-135m --modes memory,stream --name memory
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PHASE = re.compile(r"^(.*?)(?::? \d+/\d+ \(|$)")  # "calibrating: 3/32 (12 s ...)" -> "calibrating"
LOAD_ONLY = "import sys; from slimlm.models import load_model; load_model(sys.argv[1], dtype=sys.argv[2])"
RUNTIME_ONLY = "import torch, transformers, slimlm.pipeline"


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


def model_bytes(model: str, dtype: str, tokens: int) -> tuple[int, int, int]:
    """Parameters, their bytes in ``dtype`` and the calibration activations of ``tokens`` tokens, read
    from the loaded model (in this process, then gone)."""
    import torch

    from slimlm.costs import static_cost
    from slimlm.models import load_model

    dims = load_model(model).dims
    params = static_cost(dims).params
    widest = max(max(shape.heads * dims.head_dim, shape.neurons) for shape in dims.layers)
    activations = tokens * (2 * dims.hidden_size + widest) * 4  # float32, whatever the weights' dtype
    return params, params * torch.empty(0, dtype=getattr(torch, dtype)).element_size(), activations


def measure(model: str, dtype: str, mode: str, settings: list[str], tokens: int, work: Path) -> dict:
    params, weights, activations = model_bytes(model, dtype, tokens)
    name = f"{Path(model).name}-{dtype}-{mode}"
    runtime_peak, _, _, code = sampled([sys.executable, "-c", RUNTIME_ONLY], work / f"{name}-runtime.log")
    if code:
        raise SystemExit(f"importing slimlm failed: see {work / f'{name}-runtime.log'}")
    load_peak, _, _, code = sampled([sys.executable, "-c", LOAD_ONLY, model, dtype], work / f"{name}-load.log")
    if code:
        raise SystemExit(f"loading {model} failed: see {work / f'{name}-load.log'}")
    command = ["slimlm", "compress", model, "--out", str(work / name), *settings]
    command += (["--dtype", dtype] if dtype != "float32" else []) + (["--stream"] if mode == "stream" else [])
    peak, phases, seconds, code = sampled(command, work / f"{name}.log")
    if code:
        raise SystemExit(f"compress failed ({code}): see {work / f'{name}.log'}")
    target = 1.5 * weights + activations
    top = sorted(phases.items(), key=lambda kv: -kv[1])[:4]
    return {
        "model": model,
        "dtype": dtype,
        "mode": mode,
        "params": params,
        "weights_bytes": weights,
        "calibration_activations_bytes": activations,
        "target_bytes": target,
        "runtime_only_peak_bytes": runtime_peak,
        "load_only_peak_bytes": load_peak,
        "compress_peak_bytes": peak,
        "peak_over_weights": peak / weights,
        "peak_over_target": peak / target,
        "peak_above_runtime_over_target": (peak - runtime_peak) / target,
        "peak_phases": dict(top),
        "phases": phases,  # every phase's peak, in the order the phases began
        "seconds": seconds,
        "command": " ".join(command),
    }


def table(rows: list[dict]) -> str:
    mb = 2**20
    lines = [
        "| model | dtype | mode | weights | calibration activations | target (1.5x weights + activations)"
        " | runtime only | load only"
        " | compress peak | peak / target | (peak - runtime) / target | time | peak phases |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        phases = "; ".join(f"{name} {rss / mb:.0f} MB" for name, rss in r["peak_phases"].items())
        sizes = ("weights_bytes", "calibration_activations_bytes", "target_bytes", "runtime_only_peak_bytes")
        sizes += ("load_only_peak_bytes", "compress_peak_bytes")
        cells = [f"{r[key] / mb:.0f} MB" for key in sizes]
        lines.append(
            f"| {Path(r['model']).name} | {r['dtype']} | {r['mode']} | {' | '.join(cells)}"
            f" | {r['peak_over_target']:.2f}x | {r['peak_above_runtime_over_target']:.2f}x"
            f" | {r['seconds']:.0f} s | {phases} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--modes", default="memory,stream", help="memory (the default compress), stream (--stream)")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--settings",
        default="--non-embedding 0.7 --evaluations 24",
        help="more compress options (memory hardly depends on --evaluations; time does)",
    )
    parser.add_argument("--name", default="memory")
    parser.add_argument("--keep", help="a folder to keep each compress's run folder and logs in (default: deleted)")
    args = parser.parse_args()
    settings = [*shlex.split(args.settings), "--calib-windows", str(args.calib_windows), "--seq-len", str(args.seq_len)]
    tokens, rows = args.calib_windows * args.seq_len, []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in args.models.split(","):
            for dtype in args.dtypes.split(","):
                for mode in args.modes.split(","):
                    rows.append(measure(model, dtype, mode, settings, tokens, work))
                    print(table(rows[-1:]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2))
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{args.name}.md").write_text(f"# Peak memory of compress\n\n`{command}`\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
