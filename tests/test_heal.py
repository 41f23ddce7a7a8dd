"""Recovery distillation on tiny models: it moves the student towards the teacher, the result loads
as the folder it came from did, LoRA merges, a killed run resumes, bad input is refused."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import slimlm.heal as healing
from slimlm.data import model_windows
from slimlm.errors import SlimlmError
from slimlm.evaluate import perplexity
from slimlm.extract import REMOTE_CODE_FILE, SUBNET_FILE, extract
from slimlm.heal import HEAL_FILE, HealJob, heal
from slimlm.jobs import DEFAULT_CALIBRATION, heal_data
from slimlm.models import load_model
from slimlm.train import native_precision

from .conftest import TEXT, invoke, one_error, save_tiny, tiny_loaded
from .test_apply import heterogeneous

SEQ = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny dense teacher and a heterogeneous sub-network of it (remote-code folder), as files."""
    root = tmp_path_factory.mktemp("heal")
    dense = tiny_loaded(tie_word_embeddings=False)
    with torch.no_grad():  # confident predictions, so that pruning moves them measurably (random: near uniform)
        dense.model.lm_head.weight.mul_(30)
    teacher = save_tiny(dense, root / "dense")
    student = extract(load_model(teacher), heterogeneous(), root / "pruned").folder
    assert (student / REMOTE_CODE_FILE).is_file()
    return teacher, student


def job_for(models, text, out, **changes) -> HealJob:
    teacher, student = models
    values = dict(model=str(student), teacher=str(teacher), out=str(out), data=str(text), seq_len=SEQ)
    values |= dict(steps=8, batch_size=4, learning_rate=1e-3, checkpoint_every=3)
    return HealJob(**(values | changes))


def kl_to(teacher, student, ids) -> float:
    with torch.no_grad():
        t = F.log_softmax(teacher(input_ids=ids).logits, -1)
        s = F.log_softmax(student(input_ids=ids).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def text_ids(loaded) -> torch.Tensor:
    return loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"][:, : 4 * SEQ].view(4, SEQ)


def test_healing_moves_the_student_towards_the_teacher_and_keeps_its_folder_kind(models, text, tmp_path):
    teacher = load_model(models[0])
    before = load_model(models[1])
    out = heal(job_for(models, text, tmp_path / "healed"))
    healed = load_model(out)
    ids = text_ids(teacher)
    assert kl_to(teacher.model, healed.model, ids) < 0.8 * kl_to(teacher.model, before.model, ids)
    assert healed.dims == before.dims  # the structure is the pruned one
    # the same remote-code folder: loads without slimlm through its own modeling file, same logits
    assert (out / REMOTE_CODE_FILE).is_file() and (out / SUBNET_FILE).is_file()
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, healed.model(input_ids=ids).logits)
    record = json.loads((out / HEAL_FILE).read_text())
    assert record["teacher"] == str(models[0]) and record["steps"] == 8


def test_bf16_healing_on_cpu_computes_in_bf16_and_keeps_float32_weights(models, text, tmp_path, monkeypatch):
    teacher, before = load_model(models[0]), load_model(models[1])
    seen = []  # the dtype of the teacher's logits: autocast reaches the teacher too
    forward = type(teacher.model).forward

    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        seen.append(out.logits.dtype)
        return out

    monkeypatch.setattr(type(teacher.model), "forward", recording)
    out = heal(job_for(models, text, tmp_path / "healed", mixed_precision="bf16"), teacher=teacher)
    monkeypatch.undo()
    assert seen and set(seen) == {torch.bfloat16}
    healed = load_model(out)
    assert {p.dtype for p in healed.model.parameters()} == {torch.float32}  # master weights stay float32
    assert json.loads((out / HEAL_FILE).read_text())["computed_in"] == "bf16"
    ids = text_ids(teacher)
    assert kl_to(teacher.model, healed.model, ids) < 0.8 * kl_to(teacher.model, before.model, ids)


@pytest.mark.parametrize(("avx512_bf16", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert native_precision("auto") == expected
    assert native_precision("fp16") == "fp16" and native_precision("no") == "no"  # a user's choice stands


def test_lora_healing_merges_into_plain_weights_that_changed(models, text, tmp_path):
    out = heal(job_for(models, text, tmp_path / "lora", lora_rank=4, learning_rate=1e-2))
    assert not list(out.glob("adapter_*"))  # merged: no peft files
    healed, before = load_model(out), load_model(models[1])
    changed = [
        name
        for (name, a), b in zip(healed.model.state_dict().items(), before.model.state_dict().values(), strict=True)
        if not torch.equal(a, b)
    ]
    assert changed and all(".layers." in name and "norm" not in name for name in changed)  # only the adapted linears
    teacher = load_model(models[0])
    ids = text_ids(teacher)
    assert kl_to(teacher.model, healed.model, ids) < kl_to(teacher.model, before.model, ids)


def test_a_killed_heal_resumes_to_the_uninterrupted_result(models, text, tmp_path, monkeypatch):
    whole = load_model(heal(job_for(models, text, tmp_path / "whole")))
    calls = []
    real = healing.sub_loss

    def dies_at_step_5(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # a kill after the checkpoint of step 3
        return real(*args)

    monkeypatch.setattr(healing, "sub_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        heal(job_for(models, text, tmp_path / "killed"))
    monkeypatch.setattr(healing, "sub_loss", real)
    with pytest.raises(SlimlmError, match="--resume"):
        heal(job_for(models, text, tmp_path / "killed"))
    with pytest.raises(SlimlmError, match=r"different settings.*temperature"):
        heal(job_for(models, text, tmp_path / "killed", resume=True, temperature=2.0))
    resumed = load_model(heal(job_for(models, text, tmp_path / "killed", resume=True)))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_teacher_with_another_vocabulary_is_refused_before_training(models, text, tmp_path):
    other = save_tiny(tiny_loaded(vocab_size=120), tmp_path / "other")
    with pytest.raises(SlimlmError, match="does not share the vocabulary"):
        heal(job_for(models, text, tmp_path / "out", teacher=str(other)))
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_a_folder_of_the_users_files_is_never_healed_into(models, text, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SlimlmError, match="holds no slimlm training run"):
        heal(job_for(models, text, out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_a_heal_killed_before_its_first_checkpoint_runs_again_in_its_folder(models, text, tmp_path):
    out = tmp_path / "out"
    (out / ".checkpoint.tmp").mkdir(parents=True)  # what a kill during the first checkpoint leaves
    assert (heal(job_for(models, text, out, steps=2)) / HEAL_FILE).is_file()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "--steps"),
        ({"distillation": 1.5}, "--distillation"),
        ({"lora_rank": -1}, "--lora-rank"),
        ({"mixed_precision": "bf32"}, "--mixed-precision"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(models, text, tmp_path, changes, message):
    with pytest.raises(SlimlmError, match=message):
        heal(job_for(models, text, tmp_path / "out", **changes))
    assert not (tmp_path / "out").exists()


def test_the_heal_command_reports_perplexity_before_and_after(models, text, tmp_path):
    teacher, student = models
    args = ["heal", student, "--teacher", teacher, "--out", tmp_path / "cli", "--data", text, "--eval", text]
    args += ["--seq-len", SEQ, "--steps", 8, "--batch-size", 4, "--learning-rate", 3e-3, "--eval-windows", 2]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["folder"] == str(tmp_path / "cli") and summary["steps"] == 8
    for key, folder in (("perplexity_before", student), ("perplexity_after", tmp_path / "cli")):
        loaded = load_model(folder)
        expected = perplexity(loaded.model, model_windows(loaded, str(text), SEQ, 2))
        assert summary[key] == pytest.approx(expected, rel=1e-5), key
    assert summary["perplexity_after"] != summary["perplexity_before"]
    again = invoke(*args)
    assert again.exit_code != 0 and "--resume" in one_error(again)


def test_heal_keeps_the_full_model_whole_when_nothing_was_pruned(models, text, tmp_path):
    """A dense student (nothing removed) heals into a stock folder: nothing remote-code is carried over."""
    out = heal(job_for(models, text, tmp_path / "dense", model=str(models[0])))
    assert not (out / REMOTE_CODE_FILE).exists()
    assert load_model(out).dims == load_model(models[0]).dims


def test_compress_with_heal_steps_measures_the_healed_model_beside_the_compressed_one(models, text, tmp_path):
    out = tmp_path / "run"
    args = ["compress", models[0], "--params", "0.6", "--out", out, "--calib", text, "--eval", text]
    args += ["--seq-len", 16, "--calib-windows", 8, "--fitness-windows", 2, "--eval-windows", 2, "--evaluations", 6]
    args += ["--refine-windows", 12]
    result = invoke(*args, "--heal-steps", 4)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "slimlm_report.json").read_text())
    healed = report["healed"]
    assert healed["folder"] == str(out / "healed") and healed["steps"] == 4
    assert healed["data"] == str(text)  # no chat template: the calibration text alone
    loaded = load_model(out / "healed")
    assert loaded.dims == load_model(out / "best").dims
    expected = perplexity(loaded.model, model_windows(loaded, str(text), 16, 2))
    assert healed["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert healed["perplexity"] != report["compressed"]["perplexity"]
    assert set(healed["accuracy"]) == set(report["accuracy"]) and healed["chat"]["prompts"] == report["chat"]["prompts"]
    assert "## Recovery" in (out / "report.md").read_text()
    assert "healed 4 steps" in result.stdout
    bad = invoke(*[a if a != out else tmp_path / "other" for a in args], "--heal-steps", -1)
    assert "--heal-steps" in one_error(bad) and not (tmp_path / "other").exists()
    bad = invoke(*[a if a != out else tmp_path / "other" for a in args], "--heal-steps", 4, "--heal-data", "chat:x")
    assert "chat:x" in one_error(bad) and not (tmp_path / "other").exists()  # before the search, not after it


def test_compress_heals_a_chat_model_on_its_own_chat_as_well_as_its_calibration():
    assert heal_data("austen:emma+pydoc:library", chat_template=True) == "chat+austen:emma+pydoc:library"
    assert heal_data("austen:emma+pydoc:library", chat_template=False) == "austen:emma+pydoc:library"
    assert heal_data("chat:500+austen:emma", chat_template=True) == "chat:500+austen:emma"  # chat already there


@pytest.mark.parametrize("template", [True, False])
def test_the_heal_command_heals_a_chat_model_on_its_own_chat_by_default(models, text, tmp_path, monkeypatch, template):
    jobs = []

    def record(job, student):  # the job the command builds; stops it there
        jobs.append(job)
        raise SlimlmError("recorded")

    monkeypatch.setattr("slimlm.heal.heal", record)
    monkeypatch.setattr("slimlm.chat.has_template", lambda tokenizer: template)
    teacher, student = models
    args = ["heal", student, "--teacher", teacher, "--out", tmp_path / "cli", "--eval", text, "--eval-windows", 1]
    assert "recorded" in one_error(invoke(*args, "--seq-len", SEQ))
    assert jobs[0].data == heal_data(DEFAULT_CALIBRATION, chat_template=template)
    assert jobs[0].data.startswith("chat+") == template


def test_healing_on_chat_uses_the_teachers_answers(models, tmp_path, monkeypatch):
    speakers = []

    def answers(model, tokenizer, questions):  # the `chat` source's token stream, recording who answered
        speakers.append((model, questions))
        return list(range(1, 60)) * 8

    monkeypatch.setattr("slimlm.data.conversations", answers)
    teacher = load_model(models[0])
    heal(job_for(models, "chat:300", tmp_path / "healed", steps=2), teacher=teacher)
    assert speakers == [(teacher.model, 300)]


def test_checkpoints_of_tied_weights_do_not_warn_at_every_save(text, tmp_path, caplog):
    """accelerate warns at each checkpoint that tied weights are stored once: noise in a user's log."""
    tied = save_tiny(tiny_loaded(tie_word_embeddings=True), tmp_path / "tied")
    job = HealJob(model=str(tied), teacher=str(tied), out=str(tmp_path / "out"), data=str(text), seq_len=SEQ)
    with caplog.at_level(logging.WARNING):
        heal(replace(job, steps=4, batch_size=4, checkpoint_every=2))
    assert (tmp_path / "out" / "checkpoint").is_dir()
    assert not [r for r in caplog.records if "shared tensor" in r.getMessage()]
