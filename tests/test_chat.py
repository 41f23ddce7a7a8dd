"""Chat fidelity: the dense model's greedy answers as the reference, the compressed model scored on them."""

from __future__ import annotations

import pytest

from slimlm.chat import FIRST_TOKENS, SAMPLES, chat_fidelity, chat_prompts, chat_reference, prompt_ids

from .conftest import tiny_loaded


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
    result = chat_fidelity(dense.model, dense.model, dense.tokenizer, reference)
    assert result["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert result["dense_token_agreement"] == 1.0 and result["first_tokens_match"] == 1.0
    assert len(result["samples"]) == SAMPLES
    assert all(s["dense"].split()[:FIRST_TOKENS] == s["compressed"].split()[:FIRST_TOKENS] for s in result["samples"])


def test_another_model_diverges_from_the_dense_answers(dense, reference):
    other = tiny_loaded("llama", seed=1)
    result = chat_fidelity(other.model, dense.model, dense.tokenizer, reference)
    assert result["kl_per_token"] > 0.01
    assert result["dense_token_agreement"] < 1.0 and result["first_tokens_match"] < 1.0


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
