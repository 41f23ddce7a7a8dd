"""Super-network training on tiny models: what a step trains, that it learns, resume, LoRA merge."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import slimlm.train as training
from slimlm.apply import subnetwork_masked
from slimlm.errors import SlimlmError
from slimlm.importance import IMPORTANCE_FILE, load_importance
from slimlm.models import load_model
from slimlm.search import SearchJob, prepare
from slimlm.space import SearchSpace, keep_most_important
from slimlm.train import TrainJob, step_subnets, train

from .conftest import TEXT, invoke, one_error, save_tiny, tiny_loaded
from .test_space import fixed_importance

SEQ = 32


def job_for(text, out, **changes) -> TrainJob:
    values = dict(model="tiny", out=str(out), data=str(text), seq_len=SEQ, steps=6, batch_size=4)
    values |= dict(learning_rate=3e-3, checkpoint_every=2, random_subnets=1)
    return TrainJob(**(values | changes))


def loss_of(loaded, subnet, ids) -> float:
    with torch.no_grad(), subnetwork_masked(loaded, subnet) as model:
        return model(input_ids=ids, labels=ids, use_cache=False).loss.item()


def test_a_sandwich_step_trains_the_full_the_smallest_and_random_subnetworks():
    loaded = tiny_loaded()
    scores = fixed_importance(loaded.dims)
    job = TrainJob(model="tiny", out="unused", random_subnets=3)
    subnets = step_subnets(job, loaded, scores, step=5)
    smallest = keep_most_important(loaded.dims, scores, SearchSpace().smallest(loaded.dims))
    assert subnets[0] is None and subnets[1].to_compact() == smallest.to_compact() and len(subnets) == 5
    again = step_subnets(job, loaded, scores, step=5)
    assert [s.to_compact() for s in subnets[1:]] == [s.to_compact() for s in again[1:]]  # a step's draw is fixed
    other = step_subnets(job, loaded, scores, step=6)
    assert [s.to_compact() for s in subnets[2:]] != [s.to_compact() for s in other[2:]]
    for subnet in subnets[1:]:  # the most important units (highest index here) are kept
        for i, keep in subnet.layers.items():
            assert set(keep.neurons) == set(range(40 - len(keep.neurons), 40)), i
    alternate = dataclasses.replace(job, strategy="alternate")
    assert step_subnets(alternate, loaded, scores, 4) == [None] and step_subnets(alternate, loaded, scores, 5)[0]
    assert None not in step_subnets(dataclasses.replace(job, strategy="random"), loaded, scores, 0)


@pytest.mark.parametrize("distillation", [0.0, 0.3, 1.0])
def test_the_loss_mixes_the_labels_cross_entropy_and_the_kl_to_the_teacher(distillation):
    torch.manual_seed(0)
    logits, teacher, ids = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    job = TrainJob(model="tiny", out="unused", distillation=distillation, temperature=2.0)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    p_teacher = torch.softmax(teacher[:, :-1] / 2, -1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(logits[:, :-1] / 2, -1))).sum(-1).mean() * 2**2  # per token
    expected = (1 - distillation) * ce + distillation * kl
    assert training.sub_loss(logits, ids, teacher, job).item() == pytest.approx(expected.item(), rel=1e-5)
    assert training.sub_loss(logits, ids, None, job).item() == pytest.approx(ce.item(), rel=1e-5)


def test_training_lowers_the_loss_of_the_full_model_and_its_subnetworks(text, tmp_path):
    loaded = tiny_loaded()
    ids = loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"][:, : 4 * SEQ].view(4, SEQ)
    scores = fixed_importance(loaded.dims)
    smallest = keep_most_important(loaded.dims, scores, SearchSpace().smallest(loaded.dims))
    full = keep_most_important(loaded.dims, scores, dict(enumerate(loaded.dims.layers)))
    before = [loss_of(loaded, s, ids) for s in (full, smallest)]
    out = train(job_for(text, tmp_path / "run", steps=12), loaded)
    trained = load_model(out)
    saved = load_importance(out / IMPORTANCE_FILE)
    smallest = keep_most_important(trained.dims, saved, SearchSpace().smallest(trained.dims))
    after = [loss_of(trained, s, ids) for s in (full, smallest)]
    assert after[0] < before[0] and after[1] < before[1]


def test_a_killed_training_resumes_to_the_uninterrupted_result(text, tmp_path, monkeypatch):
    whole = load_model(train(job_for(text, tmp_path / "whole"), tiny_loaded()))
    steps = []
    real_step = training._train_step

    def dies_at_step_5(*args):
        steps.append(1)
        if len(steps) == 5:
            raise KeyboardInterrupt  # a kill after the checkpoint of step 4
        return real_step(*args)

    monkeypatch.setattr(training, "_train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(job_for(text, tmp_path / "killed"), tiny_loaded())
    monkeypatch.setattr(training, "_train_step", real_step)
    with pytest.raises(SlimlmError, match="--resume"):
        train(job_for(text, tmp_path / "killed"), tiny_loaded())
    with pytest.raises(SlimlmError, match=r"different settings.*learning_rate"):
        train(job_for(text, tmp_path / "killed", resume=True, learning_rate=1e-4), tiny_loaded())
    resumed = load_model(train(job_for(text, tmp_path / "killed", resume=True), tiny_loaded()))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_kill_between_the_checkpoint_renames_resumes_from_the_newer_checkpoint(text, tmp_path, monkeypatch):
    """The swap renames the old checkpoint away, then the new one in: a kill between the two must
    neither restart at step 0 nor delete a complete checkpoint."""
    whole = load_model(train(job_for(text, tmp_path / "whole"), tiny_loaded()))
    real_replace, renames = training.os.replace, []

    def dies_between_the_renames(source, target):
        renames.append(Path(source).name)
        if renames.count(training.CHECKPOINT) == 1:  # the second save: old moved away, new not yet in
            real_replace(source, target)
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(training.os, "replace", dies_between_the_renames)
    with pytest.raises(KeyboardInterrupt):
        train(job_for(text, tmp_path / "killed"), tiny_loaded())
    monkeypatch.setattr(training.os, "replace", real_replace)
    checkpoint = tmp_path / "killed" / training.CHECKPOINT
    assert not checkpoint.exists()  # the window the audit found
    steps = []
    real_step = training._train_step
    monkeypatch.setattr(training, "_train_step", lambda *a: steps.append(1) or real_step(*a))
    resumed = load_model(train(job_for(text, tmp_path / "killed", resume=True), tiny_loaded()))
    assert len(steps) == 6 - 4  # continued after the step-4 checkpoint, not from 0 and not from the older one
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_train_out_that_is_a_file_is_refused_before_any_work(text, tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(SlimlmError, match="exists and is not a folder"):
        train(job_for(text, path), tiny_loaded())


def test_lora_training_merges_into_weights_that_compute_the_trained_adapters(text, tmp_path):
    loaded = tiny_loaded()
    peft_model = training.add_lora(loaded, 4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # LoRA starts at zero; make it change the model
    ids = torch.arange(1, 25).view(2, 12)
    subnet = keep_most_important(loaded.dims, fixed_importance(loaded.dims), SearchSpace().smallest(loaded.dims))
    with torch.no_grad():
        adapted = loaded.model(input_ids=ids).logits
        with subnetwork_masked(loaded, subnet) as model:
            adapted_sub = model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    loaded.model = merged
    with torch.no_grad(), subnetwork_masked(loaded, subnet) as model:
        torch.testing.assert_close(model(input_ids=ids).logits, adapted_sub, rtol=1e-4, atol=1e-5)
    out = train(job_for(text, tmp_path / "lora", lora_rank=4, steps=2), tiny_loaded())
    trained = load_model(out)
    assert not any("lora" in name for name, _ in trained.model.named_parameters())
    frozen = tiny_loaded()  # LoRA trains adapters only: a merged weight moved, embeddings did not
    assert torch.equal(trained.model.get_input_embeddings().weight, frozen.model.get_input_embeddings().weight)
    assert not torch.equal(
        trained.adapter.decoder_layers(trained.model)[0].mlp.down_proj.weight,
        frozen.adapter.decoder_layers(frozen.model)[0].mlp.down_proj.weight,
    )


def test_a_search_on_a_trained_supernetwork_keeps_the_units_training_ranked(text, tmp_path):
    out = train(job_for(text, tmp_path / "super", steps=1), tiny_loaded())
    searcher = prepare(SearchJob(model=str(out), out=str(tmp_path / "search"), params_fraction=0.8, seq_len=SEQ))
    saved = load_importance(out / IMPORTANCE_FILE)
    for got, want in zip(searcher.context.importance.neurons, saved.neurons, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "greedy"}, "unknown training strategy 'greedy'"),
        ({"steps": 0}, "at least 1"),
        ({"strategy": "random", "random_subnets": 0}, "needs --random-subnets"),
        ({"distillation": 2.0}, r"--distillation must be in \[0, 1\]"),
        ({"batch_size": 1000}, "a batch needs 1000"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(text, tmp_path, changes, message):
    with pytest.raises(SlimlmError, match=message):
        train(job_for(text, tmp_path / "run", **changes), tiny_loaded())
    assert not (tmp_path / "run").exists()


def test_the_train_command_writes_a_searchable_supernetwork(text, tmp_path):
    folder = save_tiny(tiny_loaded(), tmp_path / "tiny")
    run = tmp_path / "super"
    options = ["--data", text, "--steps", 2, "--seq-len", SEQ, "--batch-size", 2, "--checkpoint-every", 1]
    result = invoke("train", folder, "--out", run, *options)
    assert result.exit_code == 0, result.output
    assert f"slimlm search {run}" in result.stdout
    assert (run / IMPORTANCE_FILE).is_file() and (run / "checkpoint" / "progress.json").is_file()
    assert load_model(run).dims == load_model(folder).dims
    assert "unknown training strategy 'greedy'" in one_error(
        invoke("train", folder, "--out", run, "--strategy", "greedy")
    )
    assert "--resume" in one_error(invoke("train", folder, "--out", run, *options))
