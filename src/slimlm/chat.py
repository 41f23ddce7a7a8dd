"""Chat fidelity: does the compressed model still answer as the dense one does?

Users deploy Instruct models as assistants, and perplexity on prose does not show whether a pruned
model still answers. slimlm's own prompt set (``prompts/chat.txt``, everyday instructions and
questions) goes through the model's chat template; the dense model's greedy answers are the
reference. A compressed model is scored teacher-forced on those answers (mean per-token KL
divergence from the dense model, and the share of positions where its top token is the dense
answer's), by whether its own greedy answer starts with the same tokens, and by a few answers
side by side. Models without a chat template are measured on plain continuations of the prompts.

The same template also makes calibration text that matches use (the ``chat`` data spec): the dense
model's own answers to a second, disjoint prompt set (``prompts/calibration.txt``), so no corpus is
needed and the fidelity prompts are never calibrated or healed on. ``chat:N`` asks more questions
than that set holds: the model writes the rest itself, sampled from its template where the user's
turn begins (Magpie, Xu et al. 2024), so healing sees thousands of conversations, not a few hundred
answers again and again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from slimlm.cache import cache_root, computed_once, fingerprint
from slimlm.errors import SlimlmError
from slimlm.evaluate import coarse_kl, token_scores
from slimlm.progress import progress_bar, track

ANSWER_TOKENS = 32  # greedy answer length of the reference (a first sentence or two)
FIRST_TOKENS = 10  # an answer "starts like the dense one" when these many tokens match
SAMPLES = 3  # answers shown side by side in reports
BATCH = 16  # prompts generated at once (left-padded)
TEACHER_BATCH = 8  # answers teacher-forced at once: a pass per batch, not per answer (a streamed model reads
# every layer per pass); their logits are made a part of the vocabulary at a time (evaluate.token_scores)
TEACHER_TOP_K = 1024  # the dense model's probabilities kept per answer token, the rest one bin: the KL of
# those coarsened distributions was within 0.3% of the exact KL (1.821 against 1.827 nats, SmolLM2 at 0.7
# of its parameters; 1.786 with the top 128), and the reference holds 27 MB instead of the dense model
CONVERSATION_TOKENS = 128  # answer length of the chat calibration text: whole answers, mostly
CONVERSATIONS_FORMAT = "slimlm.conversations/1"
QUESTION_TOKENS = 64  # a written question longer than this is dropped unfinished
QUESTION_BATCH = 32  # questions sampled at once (one shared prefix: no padding)
QUESTION_TRIES = 4  # sampled questions per one asked for, at most, before the model is said to run dry
QUESTION_SEED = 0  # the written questions are the same on every run (and so is their cache entry)


def _prompt_file(name: str) -> list[str]:
    text = resources.files("slimlm").joinpath(f"prompts/{name}").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def chat_prompts(limit: int | None = None) -> list[str]:
    """slimlm's chat-fidelity prompt set, in its fixed order (the first ``limit``)."""
    return _prompt_file("chat.txt")[:limit]


def calibration_prompts() -> list[str]:
    """slimlm's chat calibration prompts: none of them is a chat-fidelity prompt."""
    return _prompt_file("calibration.txt")


@dataclass(frozen=True)
class ChatReference:
    """The dense model's greedy answers (token ids of each templated prompt and of its answer) and its
    next-token distributions over them, teacher-forced: what a compressed model is scored against,
    without the dense model in memory."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    templated: bool  # False: the tokenizer has no chat template, plain continuations were used
    top_indices: torch.Tensor  # (answer tokens of all answers in order, k) the dense model's top-k token ids
    top_logprobs: torch.Tensor  # (answer tokens, k) their log-probabilities


def has_template(tokenizer) -> bool:
    """Whether ``tokenizer`` has a chat template (an Instruct model's)."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str) -> tuple[list[int], bool]:
    """``prompt`` as the model sees it in chat (its template, ready for the answer), or as plain text."""
    if has_template(tokenizer):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"]), True
    ids = tokenizer(prompt)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return list(ids), False


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], new_tokens: int, label: str | None) -> list[list[int]]:
    """Each prompt's greedy continuation (at most ``new_tokens``, ending at the end-of-turn token)."""
    stop = _stop_ids(model, tokenizer)
    pad = _pad_id(model, tokenizer)
    answers: list[list[int]] = []
    batches = [prompts[i : i + BATCH] for i in range(0, len(prompts), BATCH)]
    for batch in track(batches, label) if label else batches:
        ids, mask = _left_padded(batch, pad)
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=stop or None,
            pad_token_id=pad,
        )
        for row in out[:, ids.shape[1] :].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            answers.append(row[:end])
    return answers


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left to one width (every row ends at the last position), and their mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _pad_id(model, tokenizer) -> int:
    """The id left padding uses: the tokenizer's pad token, else an end-of-turn token (masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    stop = _stop_ids(model, tokenizer)
    return stop[0] if stop else 0


def _stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the generation config's end of turn, else the tokenizer's EOS."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    return ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def chat_reference(
    dense, tokenizer, prompts: list[str] | None = None, new_tokens: int = ANSWER_TOKENS, top_k: int = TEACHER_TOP_K
) -> ChatReference:
    """The dense model's greedy answers to ``prompts`` (default: slimlm's prompt set), and its top ``top_k``
    log-probabilities at every answer token."""
    prompts = chat_prompts() if prompts is None else prompts
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    ids = [e[0] for e in encoded]
    answers = greedy_answers(dense, tokenizer, ids, new_tokens, "chat: dense answers")
    pad, indices, logprobs = _pad_id(dense, tokenizer), [], []
    for batch in track(_teacher_batches(ids, answers), "chat: dense distributions"):
        rows, targets = _answer_states(dense, batch, pad)
        scores = token_scores(dense, rows, targets, best=top_k)
        indices.append(scores.best_ids.int().cpu())  # int32: half the memory; widened when gathered
        logprobs.append(scores.best.cpu())
    indices = torch.cat(indices) if indices else torch.zeros(0, 0, dtype=torch.int32)
    logprobs = torch.cat(logprobs) if logprobs else torch.zeros(0, 0)
    return ChatReference(prompts, ids, answers, bool(encoded and encoded[0][1]), indices, logprobs)


def _teacher_batches(prompts: list[list[int]], answers: list[list[int]]) -> list[list[tuple[list[int], list[int]]]]:
    """The (prompt, answer) pairs with an answer, in order, in batches of ``TEACHER_BATCH``."""
    answered = [(prompt, answer) for prompt, answer in zip(prompts, answers, strict=True) if answer]
    return [answered[i : i + TEACHER_BATCH] for i in range(0, len(answered), TEACHER_BATCH)]


@torch.no_grad()
def _answer_states(model, batch: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s final hidden states before every answer token of the (prompt, answer) pairs, teacher-forced
    in one pass (rows of answer tokens, pairs in order), and those answer tokens: what ``token_scores``
    turns into log-probabilities a part of the vocabulary at a time (Gemma 3's 262k tokens: 1 MB a row).
    Left padding ends every answer at the last position; positions count from each sequence's start."""
    ids, mask = _left_padded([p + a for p, a in batch], pad)
    hidden = model.base_model(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(model.device),
        use_cache=False,
    ).last_hidden_state
    end = hidden.shape[1] - 1  # the state before each answer token, and not the one past the last
    rows = torch.cat([hidden[i, end - len(a) : end] for i, (_, a) in enumerate(batch)])
    return rows, torch.tensor([t for _, a in batch for t in a], device=rows.device)


@torch.no_grad()
def chat_fidelity(model, tokenizer, reference: ChatReference, description: str = "compressed") -> dict:
    """How closely ``model`` answers as the dense model did on ``reference``: mean per-token KL (nats)
    from the dense model teacher-forced on its answers (over its top ``TEACHER_TOP_K`` tokens and one
    bin for the rest, ``slimlm.evaluate.coarse_kl``), the share of those positions where ``model``'s
    top token is the dense one, the share of prompts whose greedy answer starts with the dense
    answer's first ``FIRST_TOKENS`` tokens, and ``SAMPLES`` answers side by side."""
    pairs = list(zip(reference.prompt_ids, reference.answer_ids, strict=True))
    pad = _pad_id(model, tokenizer)
    kl_sum, agree, positions = 0.0, 0, 0
    early, answers = torch.zeros(FIRST_TOKENS), torch.zeros(FIRST_TOKENS)  # agreement by position in the answer
    for batch in track(_teacher_batches(reference.prompt_ids, reference.answer_ids), f"chat fidelity ({description})"):
        states, targets = _answer_states(model, batch, pad)
        rows = slice(positions, positions + len(targets))
        student = token_scores(model, states, targets, gather=reference.top_indices[rows].long(), greedy=True)
        kl_sum += float(coarse_kl(reference.top_logprobs[rows], student.gathered.cpu()).sum())
        hits = student.top.cpu()  # the student's greedy token is the dense model's answer token
        positions += len(targets)
        agree += int(hits.sum())
        for at, (_, answer) in zip(itertools.accumulate([len(a) for _, a in batch], initial=0), batch, strict=False):
            n = min(len(answer), FIRST_TOKENS)
            early[:n] += hits[at : at + n]
            answers[:n] += 1
    starts = greedy_answers(model, tokenizer, reference.prompt_ids, FIRST_TOKENS, None)
    matched = sum(s[:FIRST_TOKENS] == a[:FIRST_TOKENS] for s, a in zip(starts, reference.answer_ids, strict=True))
    shown = greedy_answers(model, tokenizer, reference.prompt_ids[:SAMPLES], ANSWER_TOKENS, None)
    return {
        "prompts": len(pairs),
        "templated": reference.templated,
        "kl_per_token": kl_sum / max(positions, 1),
        "dense_token_agreement": agree / max(positions, 1),
        "first_tokens_match": matched / max(len(pairs), 1),
        # where answers part: the dense token's share at each of the first positions (ten in a row need all)
        "position_agreement": [float(h / c) for h, c in zip(early, answers, strict=True) if c],
        "samples": [
            {
                "prompt": reference.prompts[i],
                "dense": tokenizer.decode(reference.answer_ids[i], skip_special_tokens=True).strip(),
                "compressed": tokenizer.decode(shown[i], skip_special_tokens=True).strip(),
            }
            for i in range(len(shown))
        ],
    }


def conversations(model, tokenizer, questions: int | None = None, new_tokens: int = CONVERSATION_TOKENS) -> list[int]:
    """``model``'s own chat as one token stream: each question through the chat template, then the
    model's greedy answer. The questions are slimlm's calibration prompts, or the first ``questions``
    of them and then questions the model writes itself (:func:`written_questions`). Cached on disk
    per weights, template and questions, since a few hundred answers take minutes on a CPU."""
    shipped = calibration_prompts()
    path = _conversations_path(model, tokenizer, shipped, new_tokens, questions)
    with computed_once(path):
        return _read_conversations(path) or _write_conversations(
            path, model, tokenizer, _questions(model, tokenizer, shipped, questions), new_tokens
        )


def _questions(model, tokenizer, shipped: list[str], count: int | None) -> list[str]:
    if count is None or count <= len(shipped):
        return shipped[:count]
    never = shipped + chat_prompts()  # the fidelity prompts are never healed on, even if the model writes one
    return shipped + written_questions(model, tokenizer, count - len(shipped), exclude=never)


@torch.no_grad()
def written_questions(
    model, tokenizer, count: int, exclude: Sequence[str] = (), seed: int = QUESTION_SEED
) -> list[str]:
    """``count`` different questions ``model`` writes itself: its chat template up to where the user's
    words begin, then sampled (temperature 1) to the end of the turn, as in Magpie. Questions in
    ``exclude`` (compared without case and spacing) and unfinished ones are dropped."""
    prefix = torch.tensor([_user_turn_prefix(tokenizer)] * QUESTION_BATCH, device=model.device)
    stop, pad = _stop_ids(model, tokenizer), _pad_id(model, tokenizer)
    seen, written = {_plain(q) for q in exclude}, []
    tries = -(-count * QUESTION_TRIES // QUESTION_BATCH)
    cuda = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), progress_bar() as bar:
        task = bar.add_task(f"chat: the model writes {count} questions", total=count)  # counts questions, not tries
        torch.manual_seed(seed)
        for _ in range(tries):
            out = model.generate(
                input_ids=prefix,
                attention_mask=torch.ones_like(prefix),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=QUESTION_TOKENS,
                eos_token_id=stop or None,
                pad_token_id=pad,
            )
            before = len(written)
            for row in out[:, prefix.shape[1] :].tolist():
                end = next((i for i, t in enumerate(row) if t in stop), None)
                question = tokenizer.decode(row[:end], skip_special_tokens=True).strip() if end else ""
                if question and _plain(question) not in seen:
                    seen.add(_plain(question))
                    written.append(question)
            bar.advance(task, min(len(written), count) - before)
            if len(written) >= count:
                return written[:count]
    raise SlimlmError(
        f"the model wrote {len(written)} different finished questions in {tries * QUESTION_BATCH} tries, "
        f"fewer than the {count} asked for; ask chat for fewer"
    )


def _plain(text: str) -> str:
    return " ".join(text.lower().split())


def _user_turn_prefix(tokenizer) -> list[int]:
    """The token ids of the chat template up to the first word of the user's turn."""
    if not has_template(tokenizer):
        raise SlimlmError("the model has no chat template to write its own questions in; use `chat` without a count")
    marker = "\u2063slimlm\u2063"  # invisible and never in a template
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]


def _read_conversations(path: Path) -> list[int] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["ids"]
    except (ValueError, KeyError):  # truncated or tampered: a cache miss, rewritten
        path.unlink(missing_ok=True)
        return None


def _write_conversations(path: Path, model, tokenizer, prompts: list[str], new_tokens: int) -> list[int]:
    asked = [prompt_ids(tokenizer, p)[0] for p in prompts]
    answers = greedy_answers(model, tokenizer, asked, new_tokens, "chat calibration: dense answers")
    ids = [t for prompt, answer in zip(asked, answers, strict=True) for t in prompt + answer]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": CONVERSATIONS_FORMAT, "ids": ids}))
    tmp.rename(path)  # atomic: a killed run leaves no half-written entry
    return ids


def _conversations_path(model, tokenizer, prompts: list[str], new_tokens: int, questions: int | None) -> Path:
    template = tokenizer.chat_template if has_template(tokenizer) else ""
    settings = [CONVERSATIONS_FORMAT, fingerprint(model), str(len(tokenizer)), str(new_tokens), str(template)]
    sampling = [f"questions={questions}", f"seed={QUESTION_SEED}", f"{QUESTION_TOKENS}x{QUESTION_BATCH}"]
    settings += [] if questions is None else sampling  # what draws the written questions
    key = "|".join([*settings, *prompts])
    return cache_root() / "conversations" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
