"""Zero-shot accuracy: slimlm's own offline cloze tasks, and lm-eval tasks on an already loaded model.

slimlm's tasks are built deterministically from any text :func:`slimlm.data.load_text` reads, because
the usual benchmarks (LAMBADA, HellaSwag, ...) cannot be downloaded without a hub:

- ``slimlm-lastword`` (LAMBADA-style): a passage cut right before a word (alphabetic, 3+ letters); correct
  when greedy decoding, teacher-forced over the word's tokens, reproduces the word exactly.
- ``slimlm-continuation``: a passage ending at a sentence end; choose the true first words of the next
  sentence among candidates that start other sentences of the same text, by log-likelihood (summed,
  and per character as lm-eval's ``acc_norm``).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from slimlm.data import leading_bos, load_text
from slimlm.errors import SlimlmError
from slimlm.evaluate import token_scores
from slimlm.progress import track

LASTWORD = "slimlm-lastword"
CONTINUATION = "slimlm-continuation"
TASKS = (LASTWORD, CONTINUATION)

# A target word follows a single space after a non-space, and ends at a space or punctuation, so it is a
# whole word of the text (not the head of "Darcy's" or "well-known").
_TARGET_WORD = re.compile(r"(?<=\S )[^\W\d_]{3,}(?=[\s.,;:!?\")\]]|$)")
# A sentence starts after a word ending in . ! or ? (maybe closed by a quote or bracket), one space, and
# a capital letter (maybe after an opening quote).
_SENTENCE_START = re.compile(r"(\S+) (?=[\"'(]?[A-Z])")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "st",
    "sr",
    "jr",
    "col",
    "capt",
    "gen",
    "esq",
    "e.g",
    "i.e",
    "etc",
    "cf",
    "vs",
}
_WORD = re.compile(r"\S+")
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_CHARS_PER_TOKEN = 6  # generous for English and code, so a first cut of the text always holds enough tokens


@dataclass(frozen=True)
class Example:
    """One item of a slimlm task: a context and candidate continuations, as text and as token ids.

    A choice follows its context after one space; ``choice_ids`` are its tokens in that position.
    ``position`` is the character offset in the text where the true continuation starts.
    """

    task: str
    context: str
    choices: tuple[str, ...]
    label: int
    position: int
    context_ids: tuple[int, ...]
    choice_ids: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class TaskResult:
    """Accuracy on a task, its standard error sqrt(p(1-p)/n), and the accuracy of guessing.

    ``accuracy_norm`` (multiple choice only) picks by log-likelihood per character, as lm-eval's acc_norm.
    """

    task: str
    accuracy: float
    stderr: float
    examples: int
    chance: float
    accuracy_norm: float | None = None
    stderr_norm: float | None = None


def build_task(
    name: str,
    text_spec: str,
    tokenizer,
    examples: int = 200,
    seed: int = 0,
    context_tokens: int = 128,
    choices: int = 4,
    span_words: int = 10,
) -> list[Example]:
    """Build ``examples`` items of task ``name`` (one of :data:`TASKS`) from the text ``text_spec`` names.

    Items come from positions spread evenly over the text (one drawn at random in each of ``examples``
    equal stretches), so the same ``seed`` gives the same items. Contexts hold at most ``context_tokens``
    tokens and start at a word. ``choices`` and ``span_words`` (candidates per item, words per candidate)
    apply to ``slimlm-continuation`` only.
    """
    if name not in TASKS:
        raise SlimlmError(f"unknown task `{name}`: expected one of {', '.join(TASKS)}")
    if examples < 1 or context_tokens < 1:
        raise SlimlmError(f"examples and context_tokens must be at least 1, got {examples} and {context_tokens}")
    if name == CONTINUATION and (choices < 2 or span_words < 1):
        raise SlimlmError(f"continuation needs at least 2 choices and 1 span word, got {choices} and {span_words}")
    text = load_text(text_spec)
    rng = random.Random(seed)
    min_start = context_tokens * 2  # about half the token budget of context, at ~4 characters a token
    if name == LASTWORD:
        targets = [(m.start(), m.group()) for m in _TARGET_WORD.finditer(text, min_start)]
        picked = _spread(rng, targets, examples, name, text_spec)
        return [_example(name, text, tokenizer, context_tokens, start, [word], 0) for start, word in picked]
    starts = _sentence_starts(text)
    eligible = [s for s in starts if s >= min_start and _span(text, s, span_words)]
    items = []
    for start in _spread(rng, eligible, examples, name, text_spec):
        true = _span(text, start, span_words)
        others = _distractors(rng, text, starts, start, true, choices - 1, span_words, context_tokens)
        label = rng.randrange(choices)
        items.append(
            _example(name, text, tokenizer, context_tokens, start, [*others[:label], true, *others[label:]], label)
        )
    return items


def _spread(rng: random.Random, candidates: list, n: int, name: str, spec: str) -> list:
    """One candidate drawn from each of ``n`` equal stretches of the (text-ordered) candidate list."""
    if len(candidates) < n:
        raise SlimlmError(
            f"text `{spec}` is too short for {n} {name} examples: it gives {len(candidates)} "
            "(use a longer text or fewer examples)"
        )
    bounds = [len(candidates) * i // n for i in range(n + 1)]
    return [candidates[rng.randrange(lo, hi)] for lo, hi in itertools.pairwise(bounds)]


def _sentence_starts(text: str) -> list[int]:
    starts = []
    for match in _SENTENCE_START.finditer(text):
        word = match.group(1)
        stem = word.lstrip("\"'(").rstrip("\"')]").rstrip(".!?").lower()
        if _SENTENCE_END.search(word) and len(stem) > 1 and stem not in _ABBREVIATIONS:
            starts.append(match.end())
    return starts


def _span(text: str, start: int, n: int) -> str:
    """The first ``n`` words from ``start`` joined by single spaces; empty if the paragraph ends before them."""
    words = list(itertools.islice(_WORD.finditer(text, start), n))
    if len(words) < n or _BLANK_LINE.search(text, start, words[-1].start()):
        return ""
    return " ".join(m.group() for m in words)


def _distractors(
    rng: random.Random, text: str, starts: list[int], true_start: int, true: str, k: int, n: int, context: int
) -> list[str]:
    """``k`` distinct ``n``-word sentence openings from elsewhere in the text (not near the true one)."""
    near = context * _CHARS_PER_TOKEN + len(true)  # keeps distractors out of the context and the true span
    found: list[str] = []
    for _ in range(50 * k):
        start = rng.choice(starts)
        span = _span(text, start, n)
        if span and abs(start - true_start) > near and span != true and span not in found:
            found.append(span)
            if len(found) == k:
                return found
    raise SlimlmError(f"the text has too few distinct sentences for {k + 1} choices (found {len(found)} distractors)")


def _example(task: str, text: str, tokenizer, max_tokens: int, start: int, choices: list[str], label: int) -> Example:
    context, context_ids = _context(text, start - 1, tokenizer, max_tokens)
    choice_ids = tuple(_continuation_ids(tokenizer, context, context_ids, choice) for choice in choices)
    bos = leading_bos(tokenizer)  # the model reads the context as it reads every text: after its BOS, if any
    context_ids = context_ids if bos is None else [bos, *context_ids]
    return Example(task, context, tuple(choices), label, start, tuple(context_ids), choice_ids)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _context(text: str, end: int, tokenizer, max_tokens: int) -> tuple[str, list[int]]:
    """The text before ``end``, starting at a word, cut to at most ``max_tokens`` tokens."""
    start = max(0, end - max_tokens * _CHARS_PER_TOKEN)
    piece = text[start:end]
    if start > 0:
        piece = piece.split(None, 1)[-1]  # drop the partial first word
    ids = _encode(tokenizer, piece)
    while len(ids) > max_tokens:
        # Drop whole words from the front; half the excess in words never overshoots by much.
        parts = piece.split(None, max(1, (len(ids) - max_tokens) // 2))
        if len(parts) == 1:  # one "word" longer than the budget (a long code line): keep its last tokens
            return piece, ids[-max_tokens:]
        piece = parts[-1]
        ids = _encode(tokenizer, piece)
    return piece, ids


def _continuation_ids(tokenizer, context: str, context_ids: list[int], choice: str) -> tuple[int, ...]:
    """Tokens of `` choice`` as they follow ``context`` (the tokens of the joined text past the context's)."""
    joined = _encode(tokenizer, f"{context} {choice}")
    if joined[: len(context_ids)] == context_ids:
        return tuple(joined[len(context_ids) :])
    return tuple(_encode(tokenizer, f" {choice}"))  # a token merged across the join: encode on its own


def evaluate_task(
    model, examples: Sequence[Example], batch_size: int = 8, description: str | None = None
) -> TaskResult:
    """Score ``model`` (any causal LM: ``model(input_ids=...).logits``) on examples of one slimlm task.

    lastword: correct when, teacher-forced over the target's tokens, each is strictly the most likely one
    (a tie for the top counts as a miss). continuation: the choice with the highest log-likelihood wins; a
    tie for the highest among m choices that includes the true one earns 1/m (the expected score of
    breaking ties at random), so a model that cannot tell choices apart scores chance exactly.
    ``batch_size`` counts examples (each with all its choices); ``description`` shows a progress bar.
    """
    if not examples:
        raise SlimlmError("no examples to evaluate")
    if batch_size < 1:
        raise SlimlmError(f"batch size must be at least 1, got {batch_size}")
    tasks = {example.task for example in examples}
    if len(tasks) > 1:
        raise SlimlmError(f"examples mix tasks ({', '.join(sorted(tasks))}): evaluate one task at a time")
    task = tasks.pop()
    scores = _score(model, examples, batch_size, description)
    if task == LASTWORD:
        return _result(task, [float(s[0][1]) for s in scores], chance=0.0)
    raw, norm = [], []
    for example, choice_scores in zip(examples, scores, strict=True):
        lls = [ll for ll, _ in choice_scores]
        raw.append(_credit(lls, example.label))
        norm.append(_credit([ll / max(1, len(c)) for ll, c in zip(lls, example.choices, strict=True)], example.label))
    chance = sum(1 / len(example.choices) for example in examples) / len(examples)
    result, normed = _result(task, raw, chance), _result(task, norm, chance)
    return replace(result, accuracy_norm=normed.accuracy, stderr_norm=normed.stderr)


def _credit(scores: list[float], label: int) -> float:
    best = max(scores)
    tied = [i for i, score in enumerate(scores) if score == best]
    return 1 / len(tied) if label in tied else 0.0


def _result(task: str, credits: list[float], chance: float) -> TaskResult:
    n = len(credits)
    p = sum(credits) / n
    return TaskResult(task, p, math.sqrt(p * (1 - p) / n), n, chance)


@torch.no_grad()
def _score(
    model, examples: Sequence[Example], batch_size: int, description: str | None
) -> list[list[tuple[float, bool]]]:
    """For each example and choice: log P(choice | context), and whether greedy decoding reproduces the choice."""
    # Batches of examples with equal context length and choice count, so contexts stack without padding.
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        groups[len(example.context_ids), len(example.choice_ids)].append(i)
    batches = [ids[j : j + batch_size] for ids in groups.values() for j in range(0, len(ids), batch_size)]
    out: list[list[tuple[float, bool]]] = [[] for _ in examples]
    for batch in track(batches, description, total=len(batches)) if description is not None else batches:
        choices = [ids for i in batch for ids in examples[i].choice_ids]
        contexts = torch.tensor([examples[i].context_ids for i in batch])
        states = _choice_states(model, contexts, choices)
        targets = torch.tensor([t for ids in choices for t in ids], device=states.device)
        scores = token_scores(model, states, targets, greedy=True)  # the vocabulary a part at a time
        logprobs, top = scores.logprob, scores.top
        at = 0
        for i in batch:
            for ids in examples[i].choice_ids:
                rows = slice(at, at + len(ids))
                out[i].append((logprobs[rows].sum().item(), bool(top[rows].all())))
                at += len(ids)
    return out


def _choice_states(model, contexts: torch.Tensor, choices: list[Sequence[int]]) -> torch.Tensor:
    """What gives the next-token distributions at each token of each choice after its context, one row per
    token, choices in order (``_states``: a transformers model's hidden states, any other model's logits).

    ``contexts`` [B, L] each have len(choices) / B choices. The contexts run once; their KV cache serves
    each choice in turn (the j-th choices of every context at once), cropped back after each, so it is
    held once, not once per choice (a 1.5 GB model's 32 rows of 128 tokens: 1.5 GB of cache). A model
    that returns no cache has every choice run with its context instead.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    repeats, width = len(choices) // len(contexts), contexts.shape[1]
    # Right padding needs no attention mask: causal attention never lets a pad change the positions before it.
    tails = torch.zeros(len(choices), max(map(len, choices)) - 1, dtype=torch.long)
    for row, ids in enumerate(choices):
        tails[row, : len(ids) - 1] = torch.tensor(ids[:-1])
    last, cache = _states(model, input_ids=contexts.to(device), use_cache=True)
    if cache is not None and hasattr(cache, "crop"):
        states = last.new_empty(len(choices), 1 + tails.shape[1], last.shape[-1])
        states[:, 0] = last[:, -1].repeat_interleave(repeats, dim=0)
        croppable = _croppable(cache, width + tails.shape[1])
        for j in range(repeats if tails.shape[1] else 0):
            rows = slice(j, None, repeats)  # the j-th choice of every context
            past = cache if croppable else copy.deepcopy(cache)
            states[rows, 1:] = _states(model, input_ids=tails[rows].to(device), past_key_values=past, use_cache=True)[0]
            if croppable:
                cache.crop(-tails.shape[1])  # back to the contexts alone
    else:
        full = torch.cat([contexts.repeat_interleave(repeats, dim=0), tails], dim=1).to(device)
        states = _states(model, input_ids=full, use_cache=False)[0][:, width - 1 :]
    return torch.cat([states[row, : len(ids)] for row, ids in enumerate(choices)])


def _states(model, **inputs) -> tuple[torch.Tensor, object]:
    """What ``model`` gives at every position of ``inputs``, and its KV cache (None where it has none): a
    transformers model's final hidden states (its decoder alone: a batch's logits over a 262k-token
    vocabulary, Gemma 3's, would be 1 MB a token), any other model's logits."""
    if isinstance(model, PreTrainedModel):
        out = model.base_model(**inputs)
        return out.last_hidden_state, out.past_key_values
    out = model(**inputs)
    return out.logits, getattr(out, "past_key_values", None)


def _croppable(cache, length: int) -> bool:
    """Whether ``cache`` can be cropped back after growing to ``length`` tokens: a sliding-window layer
    that reached its window has dropped the tokens a crop would need (it is copied instead)."""
    return all(layer.get_max_length() < 0 or length < layer.get_max_length() for layer in cache.layers)


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    builtin_tasks: bool = True,
    bootstrap_iters: int = 1000,
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on an already loaded causal LM; return ``{task: {metric: value}}``.

    The model is wrapped as lm-eval's ``HFLM`` (never reloaded, so slimlm's ``trust_remote_code`` models
    work too). ``include_path`` is a folder of your own task YAMLs; ``builtin_tasks=False`` skips indexing
    lm-eval's built-in tasks (about 10 s) when every task comes from there. ``limit`` caps examples per task.
    Metric names drop lm-eval's default ``,none`` filter suffix (``acc``, ``acc_stderr``); only numbers are
    kept. Built-in tasks download their data sets through ``datasets``, so they need a network.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise SlimlmError("lm-eval tasks need the lm-eval package: pip install 'slimlm[lmeval]'") from exc
    if include_path is not None and not os.path.isdir(include_path):
        raise SlimlmError(f"lm-eval include path {include_path} is not a folder")
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=builtin_tasks)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if not tasks or unknown:
        where = f" nor in {include_path}" if include_path else ""
        raise SlimlmError(f"unknown lm-eval task(s) {', '.join(unknown) or '(none given)'}: not built in{where}")
    # HFLM may give the tokenizer a pad token; a copy keeps the caller's tokenizer unchanged.
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )
    return {task: _numeric_metrics(metrics) for task, metrics in output["results"].items()}


def _numeric_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key.removesuffix(",none")] = float(value)
    return out
