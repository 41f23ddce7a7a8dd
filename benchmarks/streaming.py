"""`slimlm compress --stream` on a model whose float32 weights exceed a memory cap set on the process.

The model: SmolLM2-135M-Instruct with every attention head copied ``--heads`` times and every MLP
neuron ``--neurons`` times, each copy's output columns divided by the count. It computes SmolLM2's
function (its logits equal SmolLM2's to float rounding, checked here) with that many times the
layers' parameters, written as safetensors shards. No larger real model is at hand on a machine
without a model hub; this one still speaks (its chat answers are SmolLM2's).

The same compress runs three times, each in a child process whose resident memory is sampled
every 0.2 s and charged to the phase its log was in (as ``benchmarks/memory.py`` does); its exact
peak comes from the kernel (``wait4``'s ``ru_maxrss``):
1. ``--stream`` in a memory cgroup whose limit (``--cap``) is below the model's float32 weights;
2. in memory under the same cap: killed, or the cap does not bind;
3. in memory without a cap: the reference.
The streamed run must ship the reference's sub-network, with its perplexities to float tolerance.
Needs root (a cgroup v1 or v2 memory controller). Example:

    python benchmarks/streaming.py --heads 8 --neurons 2 --cap 1200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from memory import last_phase, resident_bytes
from slimlm.cache import cache_root

RESULTS = Path(__file__).parent / "results"
MB = 2**20
SETTINGS = ["--params", "0.7", "--evaluations", "16", "--calib-windows", "32", "--fitness-windows", "8"]
SETTINGS += ["--selection-windows", "4", "--eval-windows", "8", "--min-ratio", "0.5"]  # fewer library levels


def widened(folder: Path, heads: int, neurons: int) -> Path:
    """SmolLM2 with its attention heads copied ``heads`` times and its MLP neurons ``neurons`` times,
    each copy's output columns divided by the count (the same function), saved in shards to ``folder``.
    Query head ``c * 9 + h`` reads key/value head ``c * 3 + h // 3``: copy ``c`` of its own."""
    if (folder / "config.json").is_file():
        return folder
    import torch

    from slimlm.models import load_model

    loaded = load_model("smollm2-135m")
    model, config = loaded.model, loaded.model.config
    parameter = torch.nn.Parameter
    with torch.no_grad():
        probe = torch.arange(1, 129)[None]
        before = model(input_ids=probe).logits
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
                linear.weight = parameter(linear.weight.repeat(heads, 1))
            attention.o_proj.weight = parameter(attention.o_proj.weight.repeat(1, heads) / heads)
            for linear in (mlp.gate_proj, mlp.up_proj):
                linear.weight = parameter(linear.weight.repeat(neurons, 1))
            mlp.down_proj.weight = parameter(mlp.down_proj.weight.repeat(1, neurons) / neurons)
        config.head_dim = config.hidden_size // config.num_attention_heads  # kept as the heads multiply
        config.num_attention_heads *= heads
        config.num_key_value_heads *= heads
        config.intermediate_size *= neurons
        after = model(input_ids=probe).logits
    print(f"widened: logits differ from SmolLM2's by at most {float((after - before).abs().max()):.2e}")
    model.save_pretrained(folder, max_shard_size="200MB")
    loaded.tokenizer.save_pretrained(folder)
    return folder


class Cgroup:
    """A memory cgroup (v1 or v2) with a limit, for one child process at a time."""

    def __init__(self, limit: int) -> None:
        controllers = Path("/sys/fs/cgroup/cgroup.controllers")
        name = f"slimlm-bench-{os.getpid()}"
        if controllers.is_file() and "memory" in controllers.read_text().split():  # cgroup v2
            self.path, self.limit_file, self.anon_key = Path("/sys/fs/cgroup") / name, "memory.max", "anon"
        else:
            self.path, self.limit_file = Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"
            self.anon_key = "total_rss"
        self.path.mkdir()
        (self.path / self.limit_file).write_text(str(limit))

    def enter(self) -> None:
        """Run in the child before exec: move it into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def anonymous_bytes(self) -> int:
        """The cgroup's anonymous memory: what the cap really bounds (a streamed run's resident size also
        counts mapped weight pages, which the kernel drops under the cap and reads again)."""
        for line in (self.path / "memory.stat").read_text().splitlines():
            key, value = line.split()
            if key == self.anon_key:
                return int(value)
        raise KeyError(self.anon_key)

    def remove(self) -> None:
        self.path.rmdir()


def run(command: list[str], log: Path, cgroup: Cgroup | None) -> dict:
    """Run ``command`` (in ``cgroup``, if given) with a cache of its own, so that it calibrates and builds
    the variant library itself (only the text corpora are shared); its exit status, exact peak, peak per
    phase and seconds."""
    cache = log.with_suffix(".cache")
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    (cache / "corpora").symlink_to(cache_root() / "corpora", target_is_directory=True)
    env = os.environ | {"SLIMLM_CACHE": str(cache)}
    start, phases, anonymous = time.perf_counter(), {}, {}
    with open(log, "w") as out:
        child = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=cgroup and cgroup.enter
        )
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            rss = resident_bytes(child.pid)
            if rss is not None:
                phase = last_phase(log)
                phases[phase] = max(phases.get(phase, 0), rss)
                if cgroup is not None:
                    anonymous[phase] = max(anonymous.get(phase, 0), cgroup.anonymous_bytes())
            time.sleep(0.2)
    seconds, code = time.perf_counter() - start, os.waitstatus_to_exitcode(status)
    result = {"exit": code, "peak_bytes": usage.ru_maxrss * 1024, "phases": phases, "seconds": seconds}
    return result | ({"anonymous_phases": anonymous} if cgroup is not None else {})


def subnetwork_digest(layers) -> str:
    """A sub-network's kept units, as a digest: what equality needs, not thousands of indices per run."""
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()


def compress(model: Path, out: Path, cgroup: Cgroup | None, stream: bool) -> dict:
    command = ["slimlm", "compress", str(model), "--out", str(out), *SETTINGS, *(["--stream"] if stream else [])]
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: an earlier one's store would be resumed or refused
    result = run(command, out.with_suffix(".log"), cgroup)
    report = out / "slimlm_report.json"
    result |= {"command": " ".join(command), "streamed": stream, "capped": cgroup is not None}
    if result["exit"] == 0 and report.is_file():
        data = json.loads(report.read_text())
        subnet = json.loads((out / "best" / "slimlm_subnetwork.json").read_text())
        result |= {
            "subnetwork": subnetwork_digest(subnet["layers"]),
            "dense_perplexity": data["dense"]["perplexity"],
            "perplexity": data["compressed"]["perplexity"],
            "params": data["compressed"]["params"],
            "dense_params": data["dense"]["params"],
            "chat_kl": data["chat"]["kl_per_token"],
        }
    return result


def table(rows: list[dict], weights: int, cap: int) -> str:
    lines = [
        f"Weights in float32: {weights / MB:.0f} MB; cap: {cap / MB:.0f} MB ({cap / weights:.2f}x the weights).",
        "",
        "| run | code | cap | exit | peak resident | peak / weights | peak anonymous (cgroup) | time"
        " | perplexity (dense / compressed) | top phases |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "streamed" if r["streamed"] else "in memory"
        top = "; ".join(f"{p} {b / MB:.0f} MB" for p, b in sorted(r["phases"].items(), key=lambda kv: -kv[1])[:3])
        anonymous = f"{max(r['anonymous_phases'].values()) / MB:.0f} MB" if r.get("anonymous_phases") else "-"
        quality = f"{r['dense_perplexity']:.2f} / {r['perplexity']:.2f}" if "perplexity" in r else "-"
        lines.append(
            f"| {name} | {r.get('commit', '-')} | {'yes' if r['capped'] else 'no'} | {r['exit']}"
            f" | {r['peak_bytes'] / MB:.0f} MB | {r['peak_bytes'] / weights:.2f}x | {anonymous} | {r['seconds']:.0f} s"
            f" | {quality} | {top} |"
        )
    return "\n".join(lines)


def _kept_rows(paths: list[Path], results: dict, rerun: list[str]) -> list[dict]:
    """The runs of earlier results files not rerun now, where they measured the same model and settings;
    each row keeps the commit it measured (the table shows it)."""
    rows = []
    for path in paths:
        earlier = json.loads(path.read_text())
        if any(earlier.get(k) != results[k] for k in ("heads", "neurons", "cap_bytes", "settings")):
            raise SystemExit(f"--keep: {path} measured another model or other settings")
        code = {"commit": earlier["commit"][:10]} if "commit" in earlier else {}  # older files: one for all runs
        rows += [code | r for r in earlier["runs"] if r.get("run") not in rerun]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=8, help="copies of every attention head (576 / 9 / heads whole)")
    parser.add_argument("--neurons", type=int, default=2, help="copies of every MLP neuron")
    parser.add_argument("--cap", type=int, default=1200, help="memory limit of the capped runs, in MiB")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimlm-streaming"))
    parser.add_argument("--runs", default="capped,stream,memory", help="which of the three runs (a subset to rerun)")
    parser.add_argument("--name", default="streaming")
    parser.add_argument("--keep", type=Path, nargs="*", default=[], help="results files whose other runs to keep")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = widened(args.work / f"smollm2-135m-heads{args.heads}-neurons{args.neurons}", args.heads, args.neurons)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))  # float32 already
    cap = args.cap * MB
    if cap >= weights:
        raise SystemExit(f"--cap {args.cap} MiB is not below the weights ({weights / MB:.0f} MiB)")
    # the code measured: the last commit that changed slimlm's sources
    source = Path(__file__).parents[1] / "src"
    commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", "."], capture_output=True, text=True, cwd=source)
    results = {"heads": args.heads, "neurons": args.neurons, "weights_bytes": weights, "cap_bytes": cap}
    results |= {"settings": SETTINGS}
    rows = _kept_rows(args.keep, results, args.runs.split(","))
    for name in args.runs.split(","):
        cgroup = Cgroup(cap) if name in ("stream", "capped") else None
        try:
            measured = compress(model, args.work / name, cgroup, stream=name == "stream")
            rows.append(measured | {"run": name, "commit": commit.stdout.strip()[:10]})
        finally:
            if cgroup is not None:
                cgroup.remove()
        print(table(rows[-1:], weights, cap), flush=True)
    results["runs"] = rows
    streamed = next((r for r in rows if r["streamed"]), None)
    reference = next((r for r in rows if not r["streamed"] and not r["capped"]), None)
    if streamed and reference and "subnetwork" in streamed and "subnetwork" in reference:
        results["same_subnetwork"] = streamed["subnetwork"] == reference["subnetwork"]
        results["perplexity_relative_difference"] = abs(streamed["perplexity"] / reference["perplexity"] - 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    command = "python benchmarks/streaming.py " + " ".join(sys.argv[1:])
    verdict = (
        f"\n\nSame sub-network as the in-memory run: {results['same_subnetwork']}; compressed perplexity differs by "
        f"{results['perplexity_relative_difference']:.2e} (relative)."
        if "same_subnetwork" in results
        else ""
    )
    text = f"# compress on a model larger than a memory cap\n\n`{command}`\n\n{table(rows, weights, cap)}{verdict}\n"
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
