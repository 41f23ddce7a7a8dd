"""The settings of slimlm's jobs (search, super-network training, healing) and the choices they take.

The command line builds its options from these defaults and lists of choices on every start,
``slimlm --help`` included, so this module imports nothing heavy (no torch, no transformers): each
setting has its one home here, and the modules that do the work (``search``, ``train``, ``heal``,
``data``, ``prune``, ``export``, ``quantize``, ``strategies``, ``importance``) import it from here and
re-export it. ``test_cli`` checks that importing the command line leaves torch unimported.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from slimlm.errors import SlimlmError
from slimlm.llamacpp import NATIVE_QUANT_TYPES

if TYPE_CHECKING:
    from slimlm.space import SearchSpace

# Texts (read by ``slimlm.data``). Calibration mixes prose and technical text, so what a search keeps
# serves both; evaluation texts are other books and sections than the calibration ones.
DEFAULT_CALIBRATION = "austen:emma+pydoc:library"
DEFAULT_EVALUATION = "austen:prideprejudice"
MIX = "+"  # joins specs: ``austen:emma+pydoc:library``
CHAT = "chat"  # the dense model's own answers through its chat template; chat:N to N questions
AUSTEN_BOOKS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)


def describe_specs() -> str:
    """One line listing the accepted data spec forms (for error messages and CLI help)."""
    books = ", ".join(AUSTEN_BOOKS)
    return (
        f"{CHAT} (the model's own answers to slimlm's calibration prompts, through its chat template) or "
        f"{CHAT}:N (to N questions: those prompts, then questions the model writes itself); "
        "a .txt or .md file or a folder of them; a .jsonl file (its text field, or FILE.jsonl:FIELD); "
        f"austen or austen:BOOK (BOOK: {books}); "
        "pydoc or pydoc:SECTION (e.g. pydoc:library, pydoc:tutorial); hf:NAME[:CONFIG[:SPLIT]] via datasets; "
        f"several joined with {MIX} (e.g. {DEFAULT_CALIBRATION}) to mix them window by window"
    )


def chat_questions(spec: str) -> int | None:
    """How many questions a ``chat`` or ``chat:N`` spec asks for (None: slimlm's calibration prompts)."""
    count = spec.partition(":")[2]
    if not count:
        return None
    if not count.isdigit() or int(count) < 1:
        raise SlimlmError(f"`{spec}`: the number of chat questions must be a positive whole number, as in {CHAT}:2000")
    return int(count)


def is_chat(spec: str) -> bool:
    """Whether ``spec`` names the model's own chat (``chat`` or ``chat:N``) rather than a text."""
    return spec == CHAT or spec.startswith(CHAT + ":")


def heal_data(calibration: str, chat_template: bool) -> str:
    """What ``compress --heal-steps`` heals on by default: its calibration text and, for a model with
    a chat template, the dense model's own chat (an assistant loses its answers before its prose)."""
    if not chat_template or any(is_chat(part) for part in calibration.split(MIX)):
        return calibration
    return f"{CHAT}{MIX}{calibration}"


# Choices, by name: their modules register the implementations under these names, in this order
# (tests/test_jobs.py holds the two to each other)
DEFAULT_METRIC = "reconstruction"  # importance metric (``slimlm.importance``)
SEARCH_STRATEGIES = ("evolution", "nsga2", "linas", "random")  # ``slimlm.strategies.STRATEGIES``
DEFAULT_STRATEGY = "evolution"
TRAIN_STRATEGIES = ("sandwich", "random", "alternate")  # sub-networks per super-network training step
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")  # accelerate's autocast; auto: bf16 where the device has it
PRUNE_METHODS = ("magnitude", "wanda-sp", "flap", "shortgpt", "llm-pruner")  # ``slimlm.prune.METHODS``
GGUF_QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # gguf's own writer
TORCH_QUANT_TYPES = ("int8",)  # a transformers folder (torchao)
ALL_QUANT_TYPES = (*TORCH_QUANT_TYPES, *GGUF_QUANT_TYPES, *NATIVE_QUANT_TYPES)  # llama.cpp's quantizer last

# Search
STUDY_NAME = "slimlm"
STORE_FILE = "search.db"


def parse_fractions(text: str, option: str = "--params") -> tuple[float, ...]:
    """``"0.9,0.8,0.7"`` -> (0.9, 0.8, 0.7): kept fractions in (0, 1], each once; else a clear error."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        fractions = tuple(float(p) for p in parts)
    except ValueError:
        fractions = ()
    if not fractions or not all(0 < f <= 1 for f in fractions) or len(set(fractions)) < len(fractions):
        raise SlimlmError(f"{option} must be a fraction in (0, 1], or several different ones such as 0.9,0.8,0.7")
    return fractions


def budget_jobs(job: SearchJob, fractions: tuple[float, ...]) -> list[SearchJob]:
    """``job`` at each kept fraction of the parameters: one fraction keeps the run folder, several get
    one each, ``RUN/params-0.9`` and so on (calibration, importance and the variant library do not
    depend on the budget: cached, they are computed once for all)."""
    if len(fractions) <= 1:
        return [replace(job, params_fraction=fractions[0]) if fractions else job]
    return [replace(job, params_fraction=f, out=str(Path(job.out) / f"params-{f:g}")) for f in fractions]


def parse_size(text: str) -> float:
    """``90M`` -> 9e7, ``1.5G`` -> 1.5e9, ``300MB`` -> 3e8 (decimal units, as parameter counts are quoted)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not match:
        raise SlimlmError(f"cannot read size '{text}': use a number with an optional K, M, G suffix (e.g. 90M)")
    return float(match.group(1)) * 1000 ** " KMGT".index(match.group(2).upper() or " ")


def default_space() -> SearchSpace:
    """A job's search space when none is given. ``slimlm.space`` needs torch, so it is imported when
    a job is made, not with this module (the command line reads the defaults above without it)."""
    from slimlm.space import SearchSpace

    return SearchSpace()


@dataclass
class SearchJob:
    """Everything a search (or one of its workers) needs; plain values so it crosses processes."""

    model: str
    out: str
    dtype: str = "float32"  # the weights' dtype while searching, and of the model written
    device: str = "cpu"  # cpu, cuda or auto
    stream: bool = False  # decoder layers read from disk as they run (slimlm.stream): models larger than memory
    params_fraction: float | None = None
    non_embedding_fraction: float | None = None  # a kept fraction of the parameters outside the embeddings
    max_params: int | None = None
    max_memory_bytes: int | None = None
    max_latency_ms: float | None = None
    min_speedup: float | None = None  # predicted speed-up over the dense model in latency_runtime
    strategy: str = DEFAULT_STRATEGY
    objective: str = "params"
    latency_runtime: str = "transformers"  # latency: prefill in transformers, or ms per generated token in llama.cpp
    evaluations: int = 200
    space: SearchSpace = field(default_factory=default_space)
    metric: str = DEFAULT_METRIC
    calibration: str = DEFAULT_CALIBRATION
    evaluation: str = DEFAULT_EVALUATION
    seq_len: int = 256
    calibration_windows: int = 128  # importance, the library, reformation: 32k tokens (benchmarks/calibration_size.py)
    fitness_windows: int = 16  # scored per candidate (at the last fidelity stage); disjoint from calibration
    selection_windows: int = 8  # choose among the finalists; disjoint from calibration and fitness
    evaluation_windows: int = 16
    fitness: str = "kl"
    stages: int = 3  # fidelity stages of multi-fidelity strategies
    seed: int = 0
    storage: str | None = None
    study_name: str = STUDY_NAME  # the study in the store: one database may hold many searches
    workers: int = 1
    resume: bool = False
    reform: bool = True  # score candidates as stitched from the reformed variant library; ship the winner reformed
    reform_candidates: bool = False  # instead reform every candidate sequentially before scoring it (slow)
    refine_epochs: int = 4  # layer-wise refinement of the reformed winner (slimlm.refine); 0: none
    # what refinement trains on: the calibration windows, then windows past fitness and selection (64k tokens)
    refine_windows: int = 256
    overwrite: bool = False  # write into a non-empty --out that holds no search of this job (replacing its store)

    @property
    def refines(self) -> bool:
        """Whether the shipped winner is refined: it is reformed, refinement is on, and its layers fit in memory."""
        return self.reform and self.refine_epochs > 0 and not self.stream

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.private_store().resolve()}"

    def private_store(self) -> Path:
        """The SQLite file in the run folder that holds the study when no ``storage`` URL is given."""
        return Path(self.out) / STORE_FILE

    def identity(self) -> dict:
        """What must match for ``--resume`` to continue a study rather than mix two searches."""
        keys = (
            "model",
            "params_fraction",
            "non_embedding_fraction",
            "max_params",
            "max_memory_bytes",
            "max_latency_ms",
            "min_speedup",
            "strategy",
            "objective",
            "latency_runtime",
            "metric",
            "calibration",
            "seq_len",
            "calibration_windows",
            "fitness_windows",
            "selection_windows",
            "fitness",
            "stages",
            "seed",
            "reform",
            "reform_candidates",
        )
        return {k: getattr(self, k) for k in keys} | {"space": asdict(self.space)}

    def to_dict(self) -> dict:
        """The job as plain values (JSON and TOML alike): unset options (None) left out, tuples as
        lists, and the invocation flags (``resume``, ``overwrite``) dropped: they are not the job."""
        values = {k: v for k, v in asdict(self).items() if v is not None and k not in INVOCATION_FLAGS}
        values["space"] = {k: list(v) if isinstance(v, tuple) else v for k, v in values["space"].items()}
        return values

    @classmethod
    def from_dict(cls, values: dict, source: str = "the job") -> SearchJob:
        """The job ``values`` describe (as ``to_dict`` writes them); an unknown key or a value of the
        wrong type is one clear error naming ``source``, never silently dropped."""
        from slimlm.space import SearchSpace

        values, space = dict(values), dict(values.get("space", {}))
        values.pop("space", None)
        defaults = cls(model="", out="")
        _check_values(values, asdict(defaults), set(INVOCATION_FLAGS) | {"space"}, source)
        _check_values(space, asdict(defaults.space), set(), f"{source} (space)")
        if "frozen_layers" in space:
            space["frozen_layers"] = tuple(space["frozen_layers"])
        return replace(defaults, **values, space=SearchSpace(**space))


INVOCATION_FLAGS = ("resume", "overwrite")
OPTIONAL_FIELDS = {  # the type of the settings that default to None (unset)
    "params_fraction": float,
    "non_embedding_fraction": float,
    "max_params": int,
    "max_memory_bytes": int,
    "max_latency_ms": float,
    "min_speedup": float,
    "storage": str,
}


def _check_values(values: dict, defaults: dict, excluded: set[str], source: str) -> None:
    """Every key known, every value of its default's type (a float may be written as an integer)."""
    unknown = sorted(set(values) - (set(defaults) - excluded))
    if unknown:
        raise SlimlmError(f"{source} has unknown settings: {', '.join(unknown)}")
    for key, value in values.items():
        default = defaults[key]
        kind = OPTIONAL_FIELDS.get(key) or type(default)
        kinds = {tuple: (list, tuple), float: (float, int)}.get(kind, kind)
        if not isinstance(value, kinds) or (kind is not bool and isinstance(value, bool)):
            raise SlimlmError(f"{source}: {key} must be a {kind.__name__}, got {value!r}")


# Super-network training and healing (``slimlm.train``, ``slimlm.heal``)


@dataclass
class TrainJob:
    """A super-network training run; plain values, saved with its checkpoints."""

    model: str
    out: str
    data: str = DEFAULT_CALIBRATION
    strategy: str = "sandwich"
    steps: int = 100
    batch_size: int = 2
    seq_len: int = 256
    learning_rate: float = 2e-5
    random_subnets: int = 2
    distillation: float = 0.5  # weight of the KL to the full model's logits in a sub-network's loss
    temperature: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    space: SearchSpace = field(default_factory=default_space)
    metric: str = DEFAULT_METRIC
    checkpoint_every: int = 25
    seed: int = 0
    mixed_precision: str = "auto"  # accelerate's no, fp16, bf16; auto: bf16 where the device computes it natively
    resume: bool = False

    def identity(self) -> dict:
        return run_identity(self)


@dataclass
class HealJob:
    """A recovery distillation run; plain values, saved with its checkpoints."""

    model: str  # the pruned model folder (the student)
    teacher: str  # the dense model it came from
    out: str
    data: str = DEFAULT_CALIBRATION
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    learning_rate: float = 2e-4  # chosen on held-out self-written questions (benchmarks/results/heal_selfchat.md)
    distillation: float = 1.0  # weight of the KL to the teacher; the rest goes to the labels' cross-entropy
    temperature: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    checkpoint_every: int = 25
    seed: int = 0
    mixed_precision: str = "auto"  # accelerate's no, fp16, bf16; auto: bf16 where the device computes it natively
    resume: bool = False

    def identity(self) -> dict:
        return run_identity(self)


def run_identity(job: TrainJob | HealJob) -> dict:
    """What must match for ``resume`` to continue a training or healing run: every setting but
    ``steps`` (which may grow), ``resume`` and ``checkpoint_every``, as plain JSON values."""
    values = asdict(job)
    for key in ("steps", "resume", "checkpoint_every"):
        values.pop(key)
    return json.loads(json.dumps(values))


def check_train(job: TrainJob) -> None:
    """Refuse bad training settings before any work."""
    if job.strategy not in TRAIN_STRATEGIES:
        raise SlimlmError(f"unknown training strategy '{job.strategy}'; choose from {', '.join(TRAIN_STRATEGIES)}")
    if min(job.steps, job.batch_size, job.checkpoint_every) < 1 or job.random_subnets < 0 or job.lora_rank < 0:
        raise SlimlmError("--steps, --batch-size and --checkpoint-every must be at least 1; ranks and counts >= 0")
    if job.strategy != "sandwich" and job.random_subnets < 1:
        raise SlimlmError(f"strategy '{job.strategy}' needs --random-subnets of at least 1")
    if not 0 <= job.distillation <= 1 or job.temperature <= 0:
        raise SlimlmError("--distillation must be in [0, 1] and --temperature positive")
    _check_precision(job.mixed_precision)


def check_heal(job: HealJob) -> None:
    """Refuse bad healing settings before any work."""
    if min(job.steps, job.batch_size, job.checkpoint_every, job.seq_len) < 1 or job.lora_rank < 0:
        raise SlimlmError("--steps, --batch-size, --seq-len and --checkpoint-every must be at least 1; --lora-rank 0+")
    if not 0 <= job.distillation <= 1 or job.temperature <= 0 or job.learning_rate <= 0:
        raise SlimlmError("--distillation must be in [0, 1]; --temperature and --learning-rate positive")
    _check_precision(job.mixed_precision)


def _check_precision(mixed_precision: str) -> None:
    if mixed_precision not in MIXED_PRECISIONS:
        choices = ", ".join(MIXED_PRECISIONS)
        raise SlimlmError(f"unknown --mixed-precision '{mixed_precision}'; choose from {choices}")
