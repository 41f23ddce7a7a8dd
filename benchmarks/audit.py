"""Reliability audit: bad inputs, kills and races tried against the ``slimlm`` command as a new user would.

Every case runs the real command line in a fresh process on a tiny model built here (no download),
then is classified: a *clear error* (exit 1, one ``error:`` line, no traceback, nothing the user had
lost or changed), *recovered* (a kill or damage after which slimlm finished the job), *silent wrong*
(exit 0 where it should have refused, or a user's file lost), or *traceback* (anything else).

    python benchmarks/audit.py            # prints the table; exit code 1 if any case is silent wrong or a traceback
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tiny-model builders of the tests

from safetensors.torch import load_file, save_file  # noqa: E402
from tests.conftest import TEXT, save_tiny, tiny_loaded  # noqa: E402

from slimlm.subnet import LayerKeep, SubNetwork  # noqa: E402

SLIMLM = [sys.executable, "-c", "from slimlm.cli import app; app()"]
TINY = ["--seq-len", "16"]
SEARCH = [*TINY, "--calib-windows", "8", "--fitness-windows", "2", "--selection-windows", "2", "--eval-windows", "2"]


@dataclass
class Case:
    name: str
    args: Callable[[Path], list]  # the command's arguments, given the scratch folder
    expect: str  # a piece of the one error line
    setup: Callable[[Path], None] = lambda scratch: None
    keep: Callable[[Path], list[Path]] = lambda scratch: []  # files that must be unchanged afterwards


def run(args: list, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*SLIMLM, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def classify(result: subprocess.CompletedProcess, expect: str, kept_before: dict, kept_after: dict) -> str:
    if "Traceback" in result.stderr + result.stdout or result.returncode not in (0, 1):
        return "traceback"
    if result.returncode == 0 or kept_before != kept_after:
        return "silent wrong"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return "clear error" if len(errors) == 1 and expect in errors[0] else "traceback"


def snapshot(paths: list[Path]) -> dict:
    return {str(p): p.read_bytes() if p.is_file() else None for p in paths}


def rewrite(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def poisoned(folder: Path, value: float) -> None:
    def poison(tensors):
        tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = value

    rewrite(folder, poison)


def copy_model(scratch: Path, name: str, change=None) -> None:
    shutil.copytree(scratch / "model", scratch / name)
    if change:
        change(scratch / name)


def remote_code(scratch: Path) -> None:
    copy_model(scratch, "evil")
    (scratch / "evil" / "evil.py").write_text(f"open({str(scratch / 'ran')!r}, 'w')\n")
    config = json.loads((scratch / "evil" / "config.json").read_text())
    config |= {"model_type": "evil", "auto_map": {"AutoModelForCausalLM": "evil.Model"}}
    (scratch / "evil" / "config.json").write_text(json.dumps(config))


def subnet_file(scratch: Path, name: str, content: str) -> None:
    (scratch / name).write_text(content)


SMALL = SubNetwork({0: LayerKeep((0, 1, 2), (0,), tuple(range(16))), 2: LayerKeep((3, 4, 5), (1,), tuple(range(20)))})


def cases() -> list[Case]:
    model = lambda s: s / "model"  # noqa: E731
    text = lambda s: s / "words.txt"  # noqa: E731
    ev = lambda s, m: ["eval", m, "--data", text(s), *TINY, "--windows", "2"]  # noqa: E731

    def search(s: Path, *extra) -> list:
        return ["search", model(s), "--params", "0.6", "--calib", text(s), "--eval", text(s), *SEARCH, *extra]

    precious = lambda s: [s / "mine" / "pareto.json"]  # noqa: E731

    def mine(s: Path) -> None:
        (s / "mine").mkdir(exist_ok=True)
        (s / "mine" / "pareto.json").write_text("my results")

    return [
        Case(
            "missing tensor",
            lambda s: ev(s, s / "m1"),
            "is missing tensors",
            lambda s: copy_model(s, "m1", lambda f: rewrite(f, lambda t: t.pop("model.layers.2.mlp.down_proj.weight"))),
        ),
        Case(
            "unexpected tensor",
            lambda s: ev(s, s / "m2"),
            "unexpected tensors",
            lambda s: copy_model(
                s, "m2", lambda f: rewrite(f, lambda t: t.update(extra=t["model.norm.weight"].clone()))
            ),
        ),
        Case(
            "wrongly shaped tensor",
            lambda s: ev(s, s / "m3"),
            "wrongly shaped",
            lambda s: copy_model(
                s,
                "m3",
                lambda f: rewrite(f, lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:7].clone()})),
            ),
        ),
        Case(
            "NaN weight",
            lambda s: ev(s, s / "m4"),
            "NaN or infinite",
            lambda s: copy_model(s, "m4", lambda f: poisoned(f, float("nan"))),
        ),
        Case(
            "inf weight",
            lambda s: ev(s, s / "m5"),
            "NaN or infinite",
            lambda s: copy_model(s, "m5", lambda f: poisoned(f, float("inf"))),
        ),
        Case(
            "truncated config.json",
            lambda s: ev(s, s / "m6"),
            "cannot load",
            lambda s: copy_model(s, "m6", lambda f: (f / "config.json").write_text('{"model_')),
        ),
        Case(
            "remote code in a user's folder",
            lambda s: ev(s, s / "evil"),
            "unsupported architecture 'evil'",
            remote_code,
            lambda s: [s / "ran"],
        ),
        Case(
            "sub-network of another shape",
            lambda s: [*ev(s, model(s)), "--subnet", s / "deep.json"],
            "another shape",
            lambda s: save_tiny(tiny_loaded(num_hidden_layers=5), s / "deep") and _record(s, "deep"),
        ),
        Case(
            "sub-network of other weights",
            lambda s: [*ev(s, model(s)), "--subnet", s / "other.json"],
            "other weights",
            lambda s: save_tiny(tiny_loaded(seed=3), s / "other") and _record(s, "other"),
        ),
        Case(
            "hand-written sub-network",
            lambda s: [*ev(s, model(s)), "--subnet", s / "hand.json"],
            "does not say",
            lambda s: SMALL.save(s / "hand.json"),
        ),
        Case(
            "float index",
            lambda s: [*ev(s, model(s)), "--subnet", s / "f.json", "--foreign-subnet"],
            "not an integer",
            lambda s: subnet_file(
                s,
                "f.json",
                '{"format":"slimlm.subnetwork/1","layers":{"0":{"heads":[0,1,2],"kv_heads":[0],"neurons":[1.7]}}}',
            ),
        ),
        Case(
            "string index",
            lambda s: [*ev(s, model(s)), "--subnet", s / "g.json", "--foreign-subnet"],
            "not an integer",
            lambda s: subnet_file(
                s,
                "g.json",
                '{"format":"slimlm.subnetwork/1","layers":{"0":{"heads":[0,1,2],"kv_heads":[0],"neurons":["5"]}}}',
            ),
        ),
        Case(
            "extract --out = input",
            lambda s: ["extract", model(s), "--subnet", s / "own.json", "--out", model(s)],
            "input model's folder",
            lambda s: _record(s, "model", "own.json"),
            lambda s: [model(s) / "model.safetensors"],
        ),
        Case(
            "extract --out in the cache",
            lambda s: ["extract", model(s), "--subnet", s / "own.json", "--out", s / "cache" / "models" / "x"],
            "inside slimlm's cache",
            lambda s: _record(s, "model", "own.json"),
        ),
        Case(
            "extract --out non-empty",
            lambda s: ["extract", model(s), "--subnet", s / "own.json", "--out", s / "mine"],
            "not empty",
            lambda s: (_record(s, "model", "own.json"), mine(s)),
            precious,
        ),
        Case(
            "prune --out = input",
            lambda s: [
                "prune",
                model(s),
                "--method",
                "flap",
                "--params",
                "0.7",
                "--out",
                model(s),
                "--calib",
                text(s),
                "--eval",
                text(s),
                *TINY,
            ],
            "input model's folder",
            keep=lambda s: [model(s) / "model.safetensors"],
        ),
        Case(
            "reform --out a file",
            lambda s: [
                "reform",
                model(s),
                "--subnet",
                s / "own.json",
                "--out",
                s / "words.txt",
                "--calib",
                text(s),
                "--eval",
                text(s),
                *TINY,
            ],
            "not a folder",
            lambda s: _record(s, "model", "own.json"),
            lambda s: [text(s)],
        ),
        Case(
            "search --out non-empty", lambda s: search(s, "--out", s / "mine"), "holds no slimlm search", mine, precious
        ),
        Case("search --out a file", lambda s: search(s, "--out", text(s)), "not a folder", keep=lambda s: [text(s)]),
        Case("search --out under a file", lambda s: search(s, "--out", text(s) / "run"), "is a file"),
        Case("search --out = input", lambda s: search(s, "--out", model(s)), "input model's folder"),
        Case(
            "--frozen a,b", lambda s: search(s, "--out", s / "r1", "--frozen", "a,b"), "comma-separated layer numbers"
        ),
        Case("--frozen 99", lambda s: search(s, "--out", s / "r2", "--frozen", "99"), "out of range"),
        Case(
            "unknown --metric", lambda s: search(s, "--out", s / "r3", "--metric", "wanda"), "unknown importance metric"
        ),
        Case("unknown --fitness", lambda s: search(s, "--out", s / "r4", "--fitness", "bleu"), "unknown fitness"),
        Case(
            "evaluation text too short",
            lambda s: search(s, "--out", s / "r5", "--eval-windows", "100000"),
            "--eval-windows",
        ),
        Case("calibration text too short", lambda s: search(s, "--out", s / "r6", "--calib-windows", "100000"), "need"),
        Case(
            "--reform-candidates, text too short",
            lambda s: search(s, "--out", s / "r7", "--reform-candidates", "--calib-windows", "100000"),
            "need",
        ),
        Case("--params 1.5", lambda s: search(s, "--out", s / "r8", "--params", "1.5"), "fraction in (0, 1]"),
        Case(
            "unknown prune method",
            lambda s: ["prune", model(s), "--method", "nope", "--params", "0.7", "--out", s / "p"],
            "unknown",
        ),
        Case(
            "--seq-len beyond the context",
            lambda s: ["eval", model(s), "--data", text(s), "--seq-len", "4096"],
            "longer than",
        ),
        Case("missing data file", lambda s: ["eval", model(s), "--data", s / "none.txt", *TINY], "unknown data spec"),
        Case(
            "train --out a file",
            lambda s: ["train", model(s), "--out", text(s), "--data", text(s), *TINY],
            "not a folder",
            keep=lambda s: [text(s)],
        ),
    ]


def _record(scratch: Path, model_name: str, file: str | None = None) -> bool:
    """A sub-network file written as slimlm writes them, for the model in ``scratch / model_name``."""
    from slimlm.models import load_model
    from slimlm.subnet import model_record

    loaded = load_model(scratch / model_name)
    SMALL.save(scratch / (file or f"{model_name}.json"), model_record(loaded.dims, loaded.fingerprint()))
    return True


def search_args(scratch: Path, out: str, evaluations: int) -> list:
    text = scratch / "words.txt"
    return ["search", scratch / "model", "--params", "0.6", "--calib", text, "--eval", text, *SEARCH,
            "--evaluations", str(evaluations), "--out", scratch / out]  # fmt: skip


def kill_and_resume(scratch: Path) -> str:
    """kill -9 of a search mid-way, then --resume: finishes with every candidate evaluated, none RUNNING."""
    import optuna

    args = search_args(scratch, "k", 30)
    process = subprocess.Popen([*SLIMLM, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = scratch / "k" / "search.db"
    for _ in range(1200):
        time.sleep(0.1)
        try:
            done = (
                store.is_file()
                and len(optuna.load_study(study_name="slimlm", storage=f"sqlite:///{store}").trials) >= 8
            )
        except Exception:
            done = False
        if done:
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    result = run([*args, "--resume"])
    study = optuna.load_study(study_name="slimlm", storage=f"sqlite:///{store}")
    states = {t.state.name for t in study.trials}
    ok = result.returncode == 0 and "RUNNING" not in states and (scratch / "k" / "best" / "config.json").is_file()
    return "recovered" if ok else ("traceback" if "Traceback" in result.stderr else "silent wrong")


def damaged_cache(scratch: Path) -> str:
    """A truncated calibration-cache entry is a cache miss, not a broken model."""
    entries = list((scratch / "cache" / "calibration").glob("*.pt"))
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:100])
    args = search_args(scratch, "d", 4)
    result = run(args)
    if not entries:
        return "traceback"  # nothing was damaged: the case did not run
    return "recovered" if result.returncode == 0 else ("traceback" if "Traceback" in result.stderr else "silent wrong")


def main() -> int:
    counts = {"clear error": 0, "recovered": 0, "silent wrong": 0, "traceback": 0}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        os.environ["SLIMLM_CACHE"] = str(scratch / "cache")
        save_tiny(tiny_loaded(), scratch / "model")
        (scratch / "words.txt").write_text(TEXT)
        for case in cases():
            case.setup(scratch)
            kept = case.keep(scratch)
            before = snapshot(kept)
            result = run(case.args(scratch))
            outcome = classify(result, case.expect, before, snapshot(kept))
            rows.append((case.name, outcome, (result.stderr.strip().splitlines() or [""])[-1][:110]))
        for name, check in (
            ("kill -9 mid-search, then --resume", kill_and_resume),
            ("truncated calibration cache entry", damaged_cache),
        ):
            rows.append((name, check(scratch), ""))
    for name, outcome, line in rows:
        counts[outcome] += 1
        print(f"{outcome:13} {name:40} {line}")
    print()
    print("| cases tried | clear errors | recovered | silent wrong | traceback |")
    print("|---|---|---|---|---|")
    print(f"| {len(rows)} | " + " | ".join(str(n) for n in counts.values()) + " |")
    return 1 if counts["silent wrong"] or counts["traceback"] else 0


if __name__ == "__main__":
    sys.exit(main())
