"""Zero-shot tasks: slimlm's own cloze tasks built from local text, and lm-eval on an already loaded model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import re
import sys
from collections import Counter
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from slimlm import evaluate, tasks
from slimlm.apply import subnetwork_applied
from slimlm.errors import SlimlmError
from slimlm.extract import extract
from slimlm.pipeline import accuracy, cloze_tasks
from slimlm.subnet import LayerKeep, SubNetwork
from slimlm.tasks import CONTINUATION, LASTWORD, build_task, evaluate_task, lm_eval_tasks

from .conftest import FAMILIES, VOCAB, tiny_loaded

# Three-letter words, each also capitalised, so sentences look like prose to the sentence splitter.
LOWER = ["".join(w) for w in product("bdfgk", "aeiou", "lmnpr")][:47]
WORDS = LOWER + [w.capitalize() for w in LOWER]
SPAN = 5  # continuation span: shorter than any sentence, so no choice holds a full stop
ORDER = 8  # the oracle knows the next token after every 8 tokens of the text


def prose(sentences: int = 400, seed: int = 0) -> str:
    """Sentences of 8-12 random words: capitalised first word, full stop, single spaces."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = rng.choices(LOWER, k=rng.randint(8, 12))
        out.append(" ".join([words[0].capitalize(), *words[1:]]) + ".")
    return " ".join(out)


TEXT = prose()


def tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per word and per full stop; 0 is [UNK]. 96 tokens, the tiny model's vocabulary; with
    ``bos``, [BOS] (id 96) before every text, as Gemma's tokenizer does."""
    vocab = {"[UNK]": 0, ".": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab | ({"[BOS]": VOCAB} if bos else {}), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", VOCAB)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]", bos_token="[BOS]")


TOKENIZER = tokenizer()


class Oracle(torch.nn.Module):
    """All probability on the token that follows the last ORDER tokens in the text; uniform where unknown."""

    def __init__(self, text: str):
        super().__init__()
        ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
        self.next: dict[tuple[int, ...], int] = {}
        for i in range(len(ids) - ORDER):
            key = tuple(ids[i : i + ORDER])
            assert self.next.setdefault(key, ids[i + ORDER]) == ids[i + ORDER], "the text must be unambiguous"

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(ORDER - 1, len(row)):
                token = self.next.get(tuple(row[t - ORDER + 1 : t + 1]))
                if token is not None:
                    logits[b, t, token] = 50.0
        return SimpleNamespace(logits=logits)


class Uniform(torch.nn.Module):
    """The same logits for every token: a model that knows nothing."""

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


class NoCache(torch.nn.Module):
    """Wraps a model and hides its KV cache, so choices are scored as whole sequences."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=self.model(input_ids=input_ids, use_cache=False).logits)


@pytest.fixture(scope="module")
def prose_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prose") / "prose.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def build(name: str, spec: str, **kwargs) -> list[tasks.Example]:
    defaults = dict(examples=20, seed=0, context_tokens=24, choices=4, span_words=SPAN)
    return build_task(name, spec, TOKENIZER, **(defaults | kwargs))


def test_contexts_start_with_bos_where_the_tokenizer_puts_one_before_every_text(prose_file):
    defaults = dict(examples=10, seed=0, context_tokens=24, choices=4, span_words=SPAN)
    for name in (LASTWORD, CONTINUATION):
        plain, with_bos = (build_task(name, prose_file, tokenizer(bos), **defaults) for bos in (False, True))
        for a, b in zip(plain, with_bos, strict=True):
            assert b.context_ids == (VOCAB, *a.context_ids)  # the same text after the BOS
            assert b.choice_ids == a.choice_ids and b.label == a.label


def encode(text: str) -> tuple[int, ...]:
    return tuple(TOKENIZER(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("name", [LASTWORD, CONTINUATION])
def test_examples_are_deterministic_for_a_seed_and_differ_across_seeds(prose_file, name):
    first, again, other = build(name, prose_file), build(name, prose_file), build(name, prose_file, seed=1)
    assert first == again
    assert [e.position for e in first] != [e.position for e in other]


@pytest.mark.parametrize("name", [LASTWORD, CONTINUATION])
def test_examples_are_spread_over_the_text(prose_file, name):
    positions = [e.position for e in build(name, prose_file)]
    stretch = len(TEXT) / len(positions)
    assert positions == sorted(positions)
    assert positions[0] < 2 * stretch and positions[-1] > len(TEXT) - 2 * stretch


def test_lastword_target_is_the_texts_next_word(prose_file):
    for ex in build(LASTWORD, prose_file):
        (word,) = ex.choices
        assert ex.label == 0 and ex.task == LASTWORD
        assert TEXT[ex.position - 1] == " " and TEXT[: ex.position - 1].endswith(ex.context)
        assert TEXT[ex.position :].startswith(word) and not TEXT[ex.position + len(word)].isalpha()
        assert word.isalpha() and len(word) >= 3
        assert ex.context_ids == encode(ex.context) and 0 < len(ex.context_ids) <= 24
        assert ex.choice_ids == (encode(word),)


def test_lastword_targets_are_whole_words(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("The cat's well-known hat, an ox x1y _em_ done. " * 40, encoding="utf-8")
    targets = {ex.choices[0] for ex in build(LASTWORD, str(path), context_tokens=8)}
    assert targets <= {"The", "hat", "done"}  # not cat (cat's), well/known (hyphen), an/ox (short), x1y, em


def test_context_is_cut_at_words_unless_one_word_exceeds_the_budget():
    assert tasks._context("bal bel bil bol", 15, TOKENIZER, 2) == ("bil bol", list(encode("bil bol")))
    # "bel.bil.bol.bul" is one word of 7 tokens: its last 3 tokens are kept
    assert tasks._context("bal bel.bil.bol.bul", 19, TOKENIZER, 3) == ("bel.bil.bol.bul", list(encode("bol.bul")))


def test_continuation_true_choice_is_the_next_span(prose_file):
    examples = build(CONTINUATION, prose_file)
    for ex in examples:
        true = ex.choices[ex.label]
        assert TEXT[: ex.position - 1].endswith(ex.context) and ex.context.endswith(".")
        assert true.split() == TEXT[ex.position :].split()[:SPAN] and true[0].isupper()
        assert len(set(ex.choices)) == 4
        for choice in ex.choices:  # distractors open other sentences of the same text
            assert len(choice.split()) == SPAN and f". {choice} " in TEXT
        assert ex.choice_ids == tuple(encode(choice) for choice in ex.choices)
    assert len({ex.label for ex in examples}) == 4  # the true choice is not always in the same place


def test_oracle_scores_one_and_uniform_scores_chance(prose_file):
    oracle, uniform = Oracle(TEXT), Uniform()
    lastword, continuation = build(LASTWORD, prose_file), build(CONTINUATION, prose_file)
    assert evaluate_task(oracle, lastword).accuracy == 1.0
    best = evaluate_task(oracle, continuation)
    assert (best.accuracy, best.accuracy_norm, best.stderr) == (1.0, 1.0, 0.0)
    assert evaluate_task(uniform, lastword).accuracy == 0.0  # a tie for the top token is a miss
    # Every choice has 5 tokens and 19 characters, so all tie; a tie among 4 earns 1/4.
    guess = evaluate_task(uniform, continuation)
    assert guess.accuracy == guess.accuracy_norm == guess.chance == 0.25
    assert guess.stderr == pytest.approx((0.25 * 0.75 / 20) ** 0.5)


def test_oracle_misses_when_the_label_is_wrong(prose_file):
    """The scores come from the choices' likelihoods: move each label and the oracle is always wrong."""
    moved = [dataclasses.replace(ex, label=(ex.label + 1) % len(ex.choices)) for ex in build(CONTINUATION, prose_file)]
    result = evaluate_task(Oracle(TEXT), moved)
    assert result.accuracy == result.accuracy_norm == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_kv_cache_scores_like_whole_sequences(prose_file, family):
    """Choices share their context's cache (cropped back after each, or copied where a sliding window
    passed): the same scores as every choice run whole with its context."""
    model = tiny_loaded(family).model
    for name in (LASTWORD, CONTINUATION):
        examples = build(name, prose_file, examples=12)
        cached = tasks._score(model, examples, batch_size=5, description=None)
        whole = tasks._score(NoCache(model), examples, batch_size=1, description=None)
        for a, b in zip(cached, whole, strict=True):
            assert [greedy for _, greedy in a] == [greedy for _, greedy in b]
            assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], abs=1e-4)
        result = evaluate_task(model, examples, batch_size=3, description="scoring")
        assert 0.0 <= result.accuracy <= 1.0 and result.examples == 12


def test_sub_network_in_place_scores_like_its_extracted_remote_code_model(prose_file, tmp_path):
    """In-place sub-networks drop layers (the cache is re-indexed); the extracted folder needs remote code."""
    loaded = tiny_loaded()
    subnet = SubNetwork(
        {
            0: LayerKeep(range(6), range(2), range(40)),
            1: LayerKeep([0, 1, 2], [0], range(20)),
            3: LayerKeep([3, 4], [1], range(5)),
        }
    )
    info = extract(loaded, subnet, tmp_path / "small")
    assert info.needs_remote_code
    small = AutoModelForCausalLM.from_pretrained(info.folder, trust_remote_code=True, dtype=torch.float32).eval()
    examples = build(CONTINUATION, prose_file, examples=8)
    with subnetwork_applied(loaded, subnet) as model:
        in_place = tasks._score(model, examples, batch_size=4, description=None)
    reloaded = tasks._score(small, examples, batch_size=4, description=None)
    for a, b in zip(in_place, reloaded, strict=True):
        assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], abs=1e-4)


def test_unknown_task_is_refused(prose_file):
    with pytest.raises(SlimlmError, match=r"unknown task `lambada`.*slimlm-lastword, slimlm-continuation"):
        build_task("lambada", prose_file, TOKENIZER)


@pytest.mark.parametrize("name", [LASTWORD, CONTINUATION])
def test_too_short_text_says_how_many_examples_it_gives(tmp_path, name):
    path = tmp_path / "short.txt"
    path.write_text(prose(sentences=12), encoding="utf-8")
    with pytest.raises(SlimlmError, match=r"too short for 500 .* it gives \d+ \("):
        build(name, str(path), examples=500)


def test_bad_requests_are_refused(prose_file):
    with pytest.raises(SlimlmError, match="at least 2 choices"):
        build(CONTINUATION, prose_file, choices=1)
    with pytest.raises(SlimlmError, match="examples mix tasks"):
        evaluate_task(Uniform(), build(LASTWORD, prose_file)[:2] + build(CONTINUATION, prose_file)[:2])
    with pytest.raises(SlimlmError, match="no examples"):
        evaluate_task(Uniform(), [])


# --- lm-eval -------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """No hub: the flags as environment variables, and in the modules that read them once at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def write_mc_task(folder: Path, docs: list[dict]) -> None:
    """A multiple-choice lm-eval task ``slimlm_test_mc`` over a local jsonl file, cached inside ``folder``."""
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    config = {
        "task": "slimlm_test_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf-cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    (folder / "slimlm_test_mc.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML


def direct_loglikelihoods(model, context: str, choices: list[str]) -> list[float]:
    """log P(choice | context) straight from the model, choices after one space as lm-eval joins them."""
    out = []
    for choice in choices:
        ctx, cont = encode(context), encode(" " + choice)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
        out.append(sum(logits[len(ctx) - 1 + i, token].item() for i, token in enumerate(cont)))
    return out


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the lmeval extra")
def test_lm_eval_local_task_matches_direct_scoring(tmp_path, offline):
    model = tiny_loaded().model
    rng = random.Random(0)
    docs, hits, hits_norm = [], 0, 0
    for i in range(16):
        context = " ".join(rng.choices(LOWER, k=6))
        choices = [" ".join(rng.choices(LOWER, k=rng.randint(1, 3))) for _ in range(4)]
        lls = direct_loglikelihoods(model, context, choices)
        best = max(range(4), key=lls.__getitem__)
        label = best if i % 2 == 0 else (best + 1) % 4  # right on even docs, wrong on odd: acc is exactly 1/2
        norm_best = max(range(4), key=lambda c: lls[c] / len(choices[c]))
        hits, hits_norm = hits + (label == best), hits_norm + (label == norm_best)
        docs.append({"context": context, "choices": choices, "label": label})
    write_mc_task(tmp_path, docs)
    metrics = lm_eval_tasks(model, TOKENIZER, ["slimlm_test_mc"], include_path=tmp_path, builtin_tasks=False)
    result = metrics["slimlm_test_mc"]
    assert result["acc"] == hits / 16 == 0.5
    assert 0.0 <= result["acc_norm"] <= 1.0 and result["acc_norm"] == hits_norm / 16
    assert result["acc_stderr"] > 0
    assert TOKENIZER.pad_token is None  # the caller's tokenizer is left as it was


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the lmeval extra")
def test_lm_eval_refuses_unknown_tasks_and_missing_folders(tmp_path, offline):
    model = tiny_loaded().model
    write_mc_task(tmp_path, [{"context": "bal", "choices": ["bal", "bel"], "label": 0}])
    with pytest.raises(SlimlmError, match=r"unknown lm-eval task.*nope"):
        lm_eval_tasks(model, TOKENIZER, ["nope"], include_path=tmp_path, builtin_tasks=False)
    with pytest.raises(SlimlmError, match="not a folder"):
        lm_eval_tasks(model, TOKENIZER, ["slimlm_test_mc"], include_path=tmp_path / "missing")


def test_lm_eval_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(SlimlmError, match=re.escape("pip install 'slimlm[lmeval]'")):
        lm_eval_tasks(Uniform(), TOKENIZER, ["anything"])


# --- the real model --------------------------------------------------------------------------------------------


@pytest.mark.real
def test_smollm2_predicts_last_words_well_above_a_unigram_guesser():
    """A guesser that always says the book's most common target word ("the", 4.6% of targets) passes (11 of
    100 right) with probability 0.6%; SmolLM2 scores 21% here (17.5% on 200), failing with probability ~3%."""
    from slimlm.data import load_text
    from slimlm.models import load_model

    spec, n = "austen:prideprejudice", 100
    words = tasks._TARGET_WORD.findall(load_text(spec))
    unigram = max(Counter(words).values()) / len(words)
    loaded = load_model("smollm2-135m")
    result = evaluate_task(loaded.model, build_task(LASTWORD, spec, loaded.tokenizer, examples=n, seed=0))
    assert result.accuracy > unigram + 3 * (unigram * (1 - unigram) / n) ** 0.5


def test_compress_measures_both_cloze_tasks_or_says_why_not(prose_file, tmp_path):
    built = cloze_tasks(TOKENIZER, prose_file)
    assert set(built) == set(tasks.TASKS) and all(len(examples) == 100 for examples in built.values())
    model = tiny_loaded("llama").model
    result = accuracy({"dense": model, "compressed": model}, built)
    for task in tasks.TASKS:
        assert result[task]["dense"] == result[task]["compressed"]
        assert result[task]["dense"]["examples"] == 100 and 0 <= result[task]["dense"]["accuracy"] <= 1
    short = tmp_path / "short.txt"
    short.write_text(prose(5))
    reasons = accuracy({"dense": model}, cloze_tasks(TOKENIZER, str(short)))
    assert all("too short" in r["not_measured"] for r in reasons.values())


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
def test_choices_are_scored_a_part_of_the_vocabulary_at_a_time(prose_file, family, monkeypatch):
    """A batch's choices are scored over a part of the vocabulary at a time, all their tokens at once (the
    head's weights read once a batch, never a token's whole logits): each choice's log-likelihood and
    greedy match as its own full distributions give them (Gemma's soft cap included)."""
    model = tiny_loaded(family).model
    if family == "gemma3_text":
        monkeypatch.setattr(model.config, "final_logit_softcapping", 0.25)  # binds on tiny random weights
    examples = build(CONTINUATION, prose_file, examples=6) + build(LASTWORD, prose_file, examples=6)
    parts, head = [], evaluate.head_logits
    monkeypatch.setattr(evaluate, "PART_BYTES", 4 * 700)  # a few tokens of the vocabulary per part
    counted = lambda m, h, tokens: parts.append((len(h), tokens)) or head(m, h, tokens)  # noqa: E731
    monkeypatch.setattr(evaluate, "head_logits", counted)
    for task in (examples[:6], examples[6:]):
        scored = tasks._score(model, task, batch_size=3, description=None)
        for example, choices in zip(task, scored, strict=True):
            for ids, (likelihood, greedy) in zip(example.choice_ids, choices, strict=True):
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([example.context_ids + ids[:-1]])).logits[0]
                logprobs, target = logits[len(example.context_ids) - 1 :].log_softmax(-1), torch.tensor(ids)
                top = logprobs.topk(2, dim=-1)
                expected = bool(((top.indices[:, 0] == target) & (top.values[:, 0] > top.values[:, 1])).all())
                assert likelihood == pytest.approx(float(logprobs.gather(-1, target[:, None]).sum()), abs=1e-4)
                assert greedy == expected
    assert len({tokens.start for _, tokens in parts}) > 3  # the vocabulary really came in parts
    assert all(rows * (tokens.stop - tokens.start) * 4 <= max(4 * 700, rows * 4) for rows, tokens in parts)
