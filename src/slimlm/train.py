"""Super-network training: fine-tune a model once so that its sub-networks work (one-shot NAS).

Every step trains the full model and sub-networks drawn from the search space on one batch, with
shared weights (``subnetwork_masked``), and takes one optimizer step on the summed gradients:

- ``sandwich`` (whittle, after the sandwich rule of slimmable networks): the full model, the
  smallest sub-network and ``random_subnets`` random ones;
- ``random``: ``random_subnets`` random sub-networks;
- ``alternate`` (InstaTune-like): the full model on even steps, one random sub-network on odd ones.

The full model learns from the labels (cross-entropy). A sub-network learns from the labels and,
with weight ``distillation``, from the full model's logits on the same batch (in-place
distillation: KL divergence at ``temperature``). Units are ranked by importance once, before
training, and every sub-network keeps the most important ones; the ranking is saved with the
trained model so that a search on it keeps the units training kept.

Full fine-tuning, or LoRA through ``peft`` (merged into the weights at the end). Devices, mixed
precision and several GPUs come from ``accelerate``. A checkpoint (model, optimizer, step) is
written every ``checkpoint_every`` steps; ``resume`` continues from it to the same result, since
the batch and sub-networks of a step depend only on the seed and the step.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState

from slimlm.allocator import reusing
from slimlm.apply import subnetwork_masked
from slimlm.data import model_windows
from slimlm.errors import SlimlmError
from slimlm.importance import (
    IMPORTANCE_FILE,
    Importance,
    cached_calibration,
    importance,
    save_importance,
)
from slimlm.jobs import TRAIN_STRATEGIES, TrainJob  # the job's home is the torch-free slimlm.jobs
from slimlm.jobs import check_train as check
from slimlm.models import LoadedModel, load_model
from slimlm.outputs import writable_folder
from slimlm.progress import progress_bar, quiet_transformers
from slimlm.space import keep_most_important
from slimlm.subnet import SubNetwork

STRATEGIES = TRAIN_STRATEGIES
CHECKPOINT = "checkpoint"
IMPORTANCE_WINDOWS = 16


def step_subnets(job: TrainJob, loaded: LoadedModel, scores: Importance, step: int) -> list[SubNetwork | None]:
    """The sub-networks one step trains (None: the full model, always first when present)."""
    rng = np.random.default_rng([job.seed, step])
    dims = loaded.dims

    def drawn() -> SubNetwork:
        return keep_most_important(dims, scores, job.space.sample(dims, rng))

    if job.strategy == "sandwich":
        smallest = keep_most_important(dims, scores, job.space.smallest(dims))
        return [None, smallest, *(drawn() for _ in range(job.random_subnets))]
    if job.strategy == "random":
        return [drawn() for _ in range(job.random_subnets)]
    return [None] if step % 2 == 0 else [drawn()]


def batch_of(job: TrainJob, windows: torch.Tensor, step: int) -> torch.Tensor:
    """The step's batch: windows in an order fixed by the seed, reshuffled each pass over the data."""
    per_pass = len(windows) // job.batch_size
    epoch, position = divmod(step, per_pass)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(job.seed * 100_003 + epoch))
    return windows[order[position * job.batch_size : (position + 1) * job.batch_size]]


def sub_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, job: TrainJob) -> torch.Tensor:
    """Next-token cross-entropy, mixed with the KL to the teacher's distribution when there is one."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]

    def cross_entropy() -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    if teacher is None or job.distillation == 0:
        return cross_entropy()
    t = job.temperature
    student = F.log_softmax(logits / t, dim=-1).reshape(-1, logits.shape[-1])
    target = F.log_softmax(teacher[:, :-1].float() / t, dim=-1).reshape(-1, logits.shape[-1])
    kl = F.kl_div(student, target, log_target=True, reduction="batchmean") * t * t
    if job.distillation == 1:  # pure distillation: the labels' loss would be computed for nothing
        return kl
    return (1 - job.distillation) * cross_entropy() + job.distillation * kl


def train(job: TrainJob, loaded: LoadedModel | None = None) -> Path:
    """Train ``job.model`` as a super-network; write the trained model (and its unit ranking) to ``job.out``."""
    check(job)
    out, checkpoint = open_run(job)
    loaded = loaded or load_model(job.model)
    windows = model_windows(loaded, job.data, job.seq_len)
    if len(windows) < job.batch_size:
        needed = f"a batch needs {job.batch_size}"
        raise SlimlmError(f"`{job.data}` gives {len(windows)} windows of {job.seq_len} tokens; {needed}")
    calib = windows[:IMPORTANCE_WINDOWS]
    scores = importance(loaded, cached_calibration(loaded, calib, job.data), job.metric)
    peft_model = add_lora(loaded, job.lora_rank) if job.lora_rank else None

    def step_loss(model, accelerator, ids, step) -> float:
        return _train_step(job, loaded, model, accelerator, ids, step_subnets(job, loaded, scores, step))

    if run_steps(job, loaded, windows, checkpoint, step_loss, "training the super-network").is_main_process:
        _save_model(loaded, peft_model, scores, out)
    return out


def open_run(job) -> tuple[Path, Path]:
    """The run's output folder and checkpoint, checked: a stored run continues only with ``resume``
    and the same settings (``job.identity()``)."""
    out = writable_folder(job.out, job.model)
    checkpoint = out / CHECKPOINT
    _recover_checkpoint(checkpoint)
    theirs = [p for p in out.iterdir() if not p.name.startswith(f".{CHECKPOINT}.")] if out.is_dir() else []
    if theirs and not checkpoint.exists():  # the user's files: never written over (our own scratch aside)
        raise SlimlmError(f"{out} exists, is not empty and holds no slimlm training run; choose another --out")
    if not job.resume and checkpoint.exists():
        raise SlimlmError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    if job.resume and checkpoint.exists():
        stored = json.loads((checkpoint / "job.json").read_text())
        if stored != job.identity():
            changed = sorted(k for k in job.identity() if stored.get(k) != job.identity()[k])
            raise SlimlmError(f"--resume with different settings than the stored run: {', '.join(changed)}")
    return out, checkpoint


def run_steps(
    job, loaded: LoadedModel, windows: torch.Tensor, checkpoint: Path, step_loss, description: str
) -> Accelerator:
    """The optimisation loop of training and healing: AdamW on the trainable parameters through
    accelerate, batches from ``batch_of``, a checkpoint every ``job.checkpoint_every`` steps and
    resumption from it, progress with the loss and tokens per second. ``step_loss(model,
    accelerator, ids, step)`` runs the step's backward passes and returns its loss. Returns the
    accelerator (its ``is_main_process`` writes the result)."""
    torch.manual_seed(job.seed)
    accelerator = _accelerator(job.mixed_precision)
    if job.batch_size < accelerator.num_processes:
        raise SlimlmError(f"--batch-size {job.batch_size} is smaller than the {accelerator.num_processes} processes")
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=job.learning_rate)
    model, optimizer = accelerator.prepare(loaded.model, optimizer)
    loaded.model.train()
    start = 0
    if job.resume and checkpoint.exists():
        accelerator.load_state(str(checkpoint / "state"))
        start = json.loads((checkpoint / "progress.json").read_text())["step"]
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with progress_bar() as bar, reusing():  # every step takes the same large blocks again
        task = bar.add_task(description, total=job.steps, completed=start)
        tokens, began = 0, time.perf_counter()
        for step in range(start, job.steps):
            ids = batch_of(job, windows, step)[accelerator.process_index :: accelerator.num_processes]  # data parallel
            ids = ids.to(accelerator.device)
            loss = step_loss(model, accelerator, ids, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += ids.numel()
            rate = tokens / (time.perf_counter() - began)
            bar.update(task, advance=1, description=f"{description} (loss {loss:.3f}, {rate:.0f} tokens/s)")
            if (step + 1) % job.checkpoint_every == 0 or step + 1 == job.steps:
                _save_checkpoint(accelerator, job, checkpoint, step + 1)
    loaded.model.eval()
    return accelerator


def native_precision(mixed_precision: str) -> str:
    """``auto`` made concrete: bf16 on a CUDA GPU that has it and on a CPU with AVX-512 BF16 or AMX
    (a healing step of SmolLM2 on 2 AVX-512 BF16 cores: 2.5 s against 7.0 s in float32, the same
    quality after 100 steps), else no autocast (elsewhere bf16 is emulated, and slower)."""
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's, private: absent -> no
    return "bf16" if any(getattr(torch.cpu, name, lambda: False)() for name in checks) else "no"


def _accelerator(mixed_precision: str) -> Accelerator:
    """accelerate keeps one mixed precision per process; a single process (a library user healing twice,
    the tests) may change it between runs, a launched multi-process run may not."""
    mixed_precision = native_precision(mixed_precision)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def _train_step(job, loaded, model, accelerator, ids, subnets: list[SubNetwork | None]) -> float:
    """Forward and backward every sub-network of the step; gradients summed, mean loss returned."""
    teacher = None
    if job.distillation > 0 and any(s is not None for s in subnets) and None not in subnets:
        with torch.no_grad():  # no full-model update this step, but its logits still teach
            teacher = model(input_ids=ids, use_cache=False).logits
    total = 0.0
    for subnet in subnets:
        if subnet is None:
            logits = model(input_ids=ids, use_cache=False).logits
            teacher = logits.detach()
            loss = sub_loss(logits, ids, None, job)
        else:
            with subnetwork_masked(loaded, subnet):
                loss = sub_loss(model(input_ids=ids, use_cache=False).logits, ids, teacher, job)
        accelerator.backward(loss / len(subnets))
        total += loss.item() / len(subnets)
    return total


def add_lora(loaded: LoadedModel, rank: int):
    """Inject LoRA adapters into every linear of the decoder layers, in place; the rest is frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(loaded.model, config)  # the wrapped model keeps its modules: masks still apply


def _recover_checkpoint(checkpoint: Path) -> None:
    """Finish a checkpoint swap a kill interrupted: the new checkpoint if it was complete (its
    ``progress.json`` is written last), else the old one; never a silent restart from step 0."""
    fresh, old = checkpoint.with_name(f".{CHECKPOINT}.tmp"), checkpoint.with_name(f".{CHECKPOINT}.old")
    for candidate in (fresh, old):
        if not checkpoint.exists() and (candidate / "progress.json").is_file() and (candidate / "job.json").is_file():
            os.replace(candidate, checkpoint)
    shutil.rmtree(old, ignore_errors=True)


def _save_checkpoint(accelerator: Accelerator, job: TrainJob, checkpoint: Path, step: int) -> None:
    """Write the checkpoint beside the old one, then swap, so a kill never leaves a half-written one."""
    fresh = checkpoint.with_name(f".{CHECKPOINT}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(fresh, ignore_errors=True)
    accelerator.wait_for_everyone()
    with quiet_transformers():
        accelerator.save_state(str(fresh / "state"), safe_serialization=True)  # every process saves its share
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (fresh / "job.json").write_text(json.dumps(job.identity(), indent=1) + "\n")
        (fresh / "progress.json").write_text(json.dumps({"step": step}) + "\n")
        old = checkpoint.with_name(f".{CHECKPOINT}.old")
        shutil.rmtree(old, ignore_errors=True)
        if checkpoint.exists():
            os.replace(checkpoint, old)
        os.replace(fresh, checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _save_model(loaded: LoadedModel, peft_model, scores: Importance, out: Path) -> None:
    model = peft_model.merge_and_unload() if peft_model is not None else loaded.model
    with quiet_transformers():
        model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
    save_importance(scores, out / IMPORTANCE_FILE)
