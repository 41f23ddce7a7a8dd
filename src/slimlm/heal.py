"""Recovery distillation: a pruned model learns again from the dense model it came from.

Structure removal costs quality that a short distillation from the original model wins back, as in
Minitron, DarwinLM, Sheared-LLaMA and LLM-Pruner's recovery: the student (an extracted model folder)
is trained on calibration text to match the teacher's next-token distribution (KL divergence at
``temperature``, mixed with the labels' cross-entropy by ``1 - distillation``). Full fine-tuning or
LoRA through ``peft``, merged when done. The loop, its checkpoints every ``checkpoint_every`` steps,
``resume`` and the devices of ``accelerate`` are the super-network trainer's (``train.run_steps``).

The result is a model folder like the one healed: plain ``from_pretrained``, or the same remote-code
folder (its modeling file, sub-network record and llama.cpp tokenizer keys are carried over), so it
extracts to GGUF as before.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from slimlm.data import model_windows
from slimlm.errors import SlimlmError
from slimlm.extract import REMOTE_CODE_FILE, SUBNET_FILE
from slimlm.gguf_tokenizer import TOKENIZER_GGUF
from slimlm.jobs import HealJob  # the job's home is the torch-free slimlm.jobs
from slimlm.jobs import check_heal as check
from slimlm.models import LoadedModel, load_model
from slimlm.progress import quiet_transformers
from slimlm.train import add_lora, open_run, run_steps, sub_loss

HEAL_FILE = "slimlm_heal.json"  # what healed the model: teacher, data, steps, settings
CARRIED = (REMOTE_CODE_FILE, SUBNET_FILE, TOKENIZER_GGUF)  # the student folder's files the healed one keeps


def heal(job: HealJob, student: LoadedModel | None = None, teacher: LoadedModel | None = None) -> Path:
    """Distil ``job.model`` from ``job.teacher`` on ``job.data``; write the healed model to ``job.out``."""
    check(job)
    out, checkpoint = open_run(job)
    student = student or load_model(job.model)
    teacher = teacher or load_model(job.teacher)
    _check_same_vocabulary(student, teacher)
    windows = model_windows(student, job.data, job.seq_len, answerer=teacher)  # chat: the teacher speaks
    if len(windows) < job.batch_size:
        raise SlimlmError(
            f"`{job.data}` gives {len(windows)} windows of {job.seq_len} tokens; a batch needs {job.batch_size}"
        )
    peft_model = add_lora(student, job.lora_rank) if job.lora_rank else None
    teacher.model.eval().requires_grad_(False)

    def step_loss(model, accelerator, ids, _step) -> float:
        teacher.model.to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():  # the teacher computes in the student's precision
            target = teacher.model(input_ids=ids, use_cache=False).logits
        loss = sub_loss(model(input_ids=ids, use_cache=False).logits, ids, target, job)
        accelerator.backward(loss)
        return loss.item()

    accelerator = run_steps(job, student, windows, checkpoint, step_loss, "healing")
    if accelerator.is_main_process:
        _save(student, peft_model, job, out, accelerator.mixed_precision)
    return out


def _check_same_vocabulary(student: LoadedModel, teacher: LoadedModel) -> None:
    """Distillation compares distributions token by token: both models must read the same tokens."""
    same = student.dims.vocab_size == teacher.dims.vocab_size
    if not same or student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise SlimlmError(
            f"the teacher {teacher.source} does not share the vocabulary of {student.source}; "
            "heal a pruned model with the dense model it was pruned from"
        )


def _save(student: LoadedModel, peft_model, job: HealJob, out: Path, precision: str) -> None:
    model = peft_model.merge_and_unload() if peft_model is not None else student.model
    with quiet_transformers():
        model.save_pretrained(out)
        student.tokenizer.save_pretrained(out)
    for name in CARRIED:
        if (Path(student.folder) / name).is_file():
            shutil.copy(Path(student.folder) / name, out / name)
    record = asdict(job) | {"resume": False, "computed_in": precision}  # what auto became on this machine
    (out / HEAL_FILE).write_text(json.dumps(record, indent=1) + "\n")
