"""Chat fidelity: the dense model's greedy answers as the reference, the compressed model scored on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm import evaluate as evaluate_module
from slimlm.cache import cache_root
from slimlm.chat import (
    FIRST_TOKENS,
    SAMPLES,
    calibration_prompts,
    chat_fidelity,
    chat_prompts,
    chat_reference,
    conversations,
    greedy_answers,
    prompt_ids,
    written_questions,
)
from slimlm.data import load_text, model_windows, text_windows
from slimlm.errors import SlimlmError

from .conftest import FAMILIES, tiny_loaded


@pytest.fixture(scope="module")
def dense():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def reference(dense):
    # words the tiny tokenizer knows (slimlm's English prompts are all [UNK] to it)
    prompts = [" ".join(f"w{(7 * i + 3 * j) % 90 + 1}" for j in range(4 + i % 5)) for i in range(24)]
    return chat_reference(dense.model, dense.tokenizer, prompts, new_tokens=12)


def test_the_prompt_set_is_slimlms_own_hundred_varied_prompts():
    prompts = chat_prompts()
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert all(p and not p.startswith("#") for p in prompts)
    assert chat_prompts(5) == prompts[:5]


def test_the_dense_model_matches_itself_exactly(dense, reference):
    assert sum(len(a) for a in reference.answer_ids) > 0 and not reference.templated
    result = chat_fidelity(dense.model, dense.tokenizer, reference)
    assert result["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert result["dense_token_agreement"] == 1.0 and result["first_tokens_match"] == 1.0
    assert result["position_agreement"] == [1.0] * min(FIRST_TOKENS, max(len(a) for a in reference.answer_ids))
    assert len(result["samples"]) == SAMPLES
    assert all(s["dense"].split()[:FIRST_TOKENS] == s["compressed"].split()[:FIRST_TOKENS] for s in result["samples"])


def test_another_model_diverges_from_the_dense_answers(dense, reference):
    other = tiny_loaded("llama", seed=1)
    result = chat_fidelity(other.model, dense.tokenizer, reference)
    assert result["kl_per_token"] > 0.01
    assert result["dense_token_agreement"] < 1.0 and result["first_tokens_match"] < 1.0


def test_a_reference_of_fewer_dense_tokens_bounds_the_kl_from_below(dense, reference):
    # the reference keeps the dense model's top-k per answer token, not the dense model itself
    assert reference.top_indices.shape == (sum(len(a) for a in reference.answer_ids), dense.model.config.vocab_size)
    other = tiny_loaded("llama", seed=1)
    prompts, few = reference.prompts, chat_reference(dense.model, dense.tokenizer, reference.prompts, 12, top_k=8)
    assert few.top_indices.shape[1] == 8 and few.answer_ids == reference.answer_ids and len(prompts) == 24
    coarse = chat_fidelity(other.model, dense.tokenizer, few)["kl_per_token"]
    exact = chat_fidelity(other.model, dense.tokenizer, reference)["kl_per_token"]
    assert 0 < coarse < exact


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_teacher_forcing_scores_like_one_answer_at_a_time(family):
    """Answers are teacher-forced several at once, left-padded, logits kept for the answers only: the
    same KL and agreement as each prompt and answer run alone, in every family (positions, sliding
    windows and learned position embeddings alike)."""
    dense, other = tiny_loaded(family), tiny_loaded(family, seed=1)
    prompts = [" ".join(f"w{(5 * i + 2 * j) % 90 + 1}" for j in range(2 + 3 * i % 11)) for i in range(11)]
    reference = chat_reference(dense.model, dense.tokenizer, prompts, new_tokens=9)
    kl, agree, positions = 0.0, 0, 0
    early, answers = [0] * FIRST_TOKENS, [0] * FIRST_TOKENS
    for prompt, answer in zip(reference.prompt_ids, reference.answer_ids, strict=True):
        ids, start = torch.tensor([prompt + answer]), len(prompt) - 1
        with torch.no_grad():
            teacher = F.log_softmax(dense.model(input_ids=ids).logits[0, start:-1], -1)
            student = F.log_softmax(other.model(input_ids=ids).logits[0, start:-1], -1)
        kl += float((teacher.exp() * (teacher - student)).sum())
        agree += int((student.argmax(-1) == torch.tensor(answer)).sum())
        positions += len(answer)
        for i, hit in enumerate((student.argmax(-1) == torch.tensor(answer)).tolist()[:FIRST_TOKENS]):
            early[i], answers[i] = early[i] + hit, answers[i] + 1
    result = chat_fidelity(other.model, dense.tokenizer, reference)
    lengths = {len(p) + len(a) for p, a in zip(reference.prompt_ids, reference.answer_ids, strict=True)}
    assert positions > 11 and len(lengths) > 3  # padding really varies
    assert result["kl_per_token"] == pytest.approx(kl / positions, rel=1e-4)
    assert result["dense_token_agreement"] == agree / positions
    assert result["position_agreement"] == pytest.approx([h / c for h, c in zip(early, answers, strict=True) if c])


def test_prompts_go_through_the_chat_template_when_there_is_one(dense):
    tokenizer = dense.tokenizer
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} w7{% endif %}"
    )
    try:
        ids, templated = prompt_ids(tokenizer, "w1 w2")
    finally:
        tokenizer.chat_template = None
    assert templated and ids == tokenizer("w1 w2 w7")["input_ids"]
    plain, templated = prompt_ids(tokenizer, "w1 w2")
    assert not templated and plain == tokenizer("w1 w2")["input_ids"]


def test_plain_prompts_start_with_bos_where_the_tokenizer_has_one(dense):
    tokenizer = dense.tokenizer
    tokenizer.bos_token = "w3"
    try:
        ids, _ = prompt_ids(tokenizer, "w1 w2")
    finally:
        tokenizer.bos_token = None
    assert ids[0] == tokenizer.convert_tokens_to_ids("w3") and ids[1:] == tokenizer("w1 w2")["input_ids"]


# --- the `chat` calibration source: the dense model's own answers to a disjoint prompt set ---


def _few_prompts(monkeypatch, n: int = 20) -> list[str]:
    """Keep the generation short: the first ``n`` calibration prompts (all [UNK] to the tiny tokenizer
    but the second word, so prompts differ)."""
    prompts = [f"w{i % 90 + 1} {p}" for i, p in enumerate(calibration_prompts()[:n])]
    monkeypatch.setattr("slimlm.chat.calibration_prompts", lambda: prompts)
    return prompts


def test_calibration_prompts_are_many_and_never_judge_fidelity():
    calibration = calibration_prompts()
    assert len(calibration) >= 200 and len(set(calibration)) == len(calibration)
    assert not {p.lower() for p in calibration} & {p.lower() for p in chat_prompts()}


def test_conversations_are_each_prompt_then_the_models_greedy_answer(dense, monkeypatch):
    prompts = _few_prompts(monkeypatch)
    ids = conversations(dense.model, dense.tokenizer, new_tokens=6)
    asked = [prompt_ids(dense.tokenizer, p)[0] for p in prompts]
    answers = greedy_answers(dense.model, dense.tokenizer, asked, 6, None)
    assert ids == [t for q, a in zip(asked, answers, strict=True) for t in q + a]
    assert sum(map(len, answers)) > 0


def test_conversations_are_cached_per_weights(dense, monkeypatch):
    _few_prompts(monkeypatch)
    first = conversations(dense.model, dense.tokenizer, new_tokens=6)
    monkeypatch.setattr("slimlm.chat.greedy_answers", lambda *a, **k: pytest.fail("answered again"))
    assert conversations(dense.model, dense.tokenizer, new_tokens=6) == first
    with pytest.raises(pytest.fail.Exception, match="answered again"):  # other weights: another entry
        conversations(tiny_loaded("llama", seed=1).model, dense.tokenizer, new_tokens=6)


def test_a_truncated_cache_entry_is_a_miss(dense, monkeypatch, tmp_path):
    _few_prompts(monkeypatch)
    first = conversations(dense.model, dense.tokenizer, new_tokens=6)
    for entry in (cache_root() / "conversations").glob("*.json"):
        entry.write_text(entry.read_text()[:20])
    assert conversations(dense.model, dense.tokenizer, new_tokens=6) == first


def test_chat_windows_cut_the_answerers_conversations(dense, monkeypatch, tmp_path):
    _few_prompts(monkeypatch)
    windows = model_windows(dense, "chat", 16)
    stream = conversations(dense.model, dense.tokenizer)
    assert windows.shape[1] == 16 and windows.flatten().tolist() == stream[: windows.numel()]
    other = tiny_loaded("llama", seed=1)  # a pruned student heals on its teacher's answers
    assert torch.equal(model_windows(other, "chat", 16, answerer=dense), windows)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 90 + 1}" for i in range(400)))
    mixed = model_windows(dense, f"chat+{text}", 16, 6)
    assert torch.equal(mixed[0::2], windows[:3]) and torch.equal(mixed[1::2], model_windows(dense, str(text), 16, 3))


def test_chat_is_refused_where_no_model_speaks(dense):
    with pytest.raises(SlimlmError, match="own answers"):
        load_text("chat")
    with pytest.raises(SlimlmError, match="needs a loaded model"):
        text_windows(dense.tokenizer, "chat+austen", 16)


# --- chat:N: questions the model writes itself, beyond the calibration prompts ---

TEMPLATE = "{% for m in messages %}w5 {{ m['content'] }} w6{% endfor %}{% if add_generation_prompt %} w7{% endif %}"


@pytest.fixture
def templated(dense):
    dense.tokenizer.chat_template = TEMPLATE
    yield dense
    dense.tokenizer.chat_template = None


def test_written_questions_are_sampled_where_the_users_turn_begins(templated, monkeypatch):
    prefixes = []
    generate = templated.model.generate
    monkeypatch.setattr(templated.model, "generate", lambda **k: prefixes.append(k["input_ids"]) or generate(**k))
    questions = written_questions(templated.model, templated.tokenizer, 12)
    assert prefixes[0][0].tolist() == templated.tokenizer("w5", add_special_tokens=False)["input_ids"]
    assert len(questions) == 12 == len({q.lower() for q in questions}) and all(questions)
    assert written_questions(templated.model, templated.tokenizer, 12) == questions  # seeded: same every run
    assert written_questions(templated.model, templated.tokenizer, 12, seed=1) != questions


def test_excluded_questions_are_never_written(templated):
    first = written_questions(templated.model, templated.tokenizer, 12)
    again = written_questions(templated.model, templated.tokenizer, 12, exclude=[first[0].upper(), f" {first[5]} "])
    assert first[0] not in again and first[5] not in again and again[:4] == first[1:5]


def test_a_model_that_runs_dry_is_told_so(templated, monkeypatch):
    monkeypatch.setattr("slimlm.chat.QUESTION_TOKENS", 1)  # hardly a question ends within one token
    with pytest.raises(SlimlmError, match=r"in 128 tries, fewer than the 32 asked for"):
        written_questions(templated.model, templated.tokenizer, 32)


def test_a_model_without_a_chat_template_cannot_write_questions(dense):
    with pytest.raises(SlimlmError, match="no chat template"):
        written_questions(dense.model, dense.tokenizer, 4)


def test_chat_n_is_the_calibration_prompts_then_written_questions(templated, monkeypatch):
    prompts = _few_prompts(monkeypatch, 5)
    written = written_questions(templated.model, templated.tokenizer, 3, exclude=prompts + chat_prompts())
    for count, asked in ((3, prompts[:3]), (8, prompts + written)):
        ids = conversations(templated.model, templated.tokenizer, count, new_tokens=4)
        start = [prompt_ids(templated.tokenizer, q)[0] for q in asked]
        answers = greedy_answers(templated.model, templated.tokenizer, start, 4, None)
        assert ids == [t for q, a in zip(start, answers, strict=True) for t in q + a]
    windows = model_windows(templated, "chat:8", 4)
    assert windows.flatten().tolist() == conversations(templated.model, templated.tokenizer, 8)[: windows.numel()]


@pytest.mark.parametrize("spec", ["chat:0", "chat:x", "chat:-3", "chat:2.5"])
def test_a_bad_number_of_chat_questions_is_refused(dense, spec):
    with pytest.raises(SlimlmError, match="positive whole number"):
        model_windows(dense, spec, 16)
    with pytest.raises(SlimlmError, match="own answers"):
        load_text("chat:100")


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_logits_are_made_a_part_of_the_vocabulary_at_a_time(family, monkeypatch):
    """A large vocabulary (Gemma 3's 262k) makes the answers' logits a part of the vocabulary at a time, not
    more memory: the same reference and the same scores, in every family (Gemma's soft cap included)."""
    dense, other = tiny_loaded(family), tiny_loaded(family, seed=1)
    prompts = [" ".join(f"w{(3 * i + j) % 90 + 1}" for j in range(3 + i % 5)) for i in range(10)]
    whole_reference = chat_reference(dense.model, dense.tokenizer, prompts, new_tokens=6)
    whole = chat_fidelity(other.model, dense.tokenizer, whole_reference)
    vocab = dense.model.config.vocab_size
    monkeypatch.setattr(evaluate_module, "PART_BYTES", vocab * 4)  # one answer token's logits: many parts a batch
    calls, head = [], evaluate_module.head_logits
    monkeypatch.setattr(evaluate_module, "head_logits", lambda *a, **k: calls.append(a[-1]) or head(*a, **k))
    reference = chat_reference(dense.model, dense.tokenizer, prompts, new_tokens=6)
    assert len(calls) > 2 and all(tokens.stop - tokens.start < vocab for tokens in calls)  # 2 batches, in parts
    assert torch.equal(reference.top_indices, whole_reference.top_indices)
    torch.testing.assert_close(reference.top_logprobs, whole_reference.top_logprobs)
    bounded = chat_fidelity(other.model, dense.tokenizer, reference)
    # normalisers summed part by part in float32: KL of 0.019 moved by 1e-6
    assert bounded["kl_per_token"] == pytest.approx(whole["kl_per_token"], rel=1e-4)
    assert bounded["dense_token_agreement"] == whole["dense_token_agreement"]
    assert bounded["position_agreement"] == whole["position_agreement"]
