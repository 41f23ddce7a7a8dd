"""Tests for slimlm.data: data specs, corpora fetched from Debian packages, token windows."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from slimlm import data
from slimlm.cache import cache_root
from slimlm.errors import SlimlmError

from .conftest import VOCAB, tiny_tokenizer
from .conftest import WORDS as TINY_WORDS

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: token i + 1 is WORDS[i], 0 is [UNK]; one token per word."""
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=8)


def test_file_spec(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello world\n", encoding="utf-8")
    assert data.load_text(str(path)) == "hello world\n"


def test_folder_spec_is_recursive_sorted_and_text_files_only(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("C", encoding="utf-8")
    (tmp_path / "notes.rst").write_text("ignored", encoding="utf-8")
    assert data.load_text(str(tmp_path)) == "A\n\nB\n\nC"


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SlimlmError, match="empty"):
        data.load_text(str(path))


def test_folder_without_txt_is_an_error(tmp_path):
    (tmp_path / "x.rst").write_text("text", encoding="utf-8")
    with pytest.raises(SlimlmError, match=r"no \.txt or \.md files"):
        data.load_text(str(tmp_path))


def test_non_txt_file_is_an_error(tmp_path):
    path = tmp_path / "x.rst"
    path.write_text("text", encoding="utf-8")
    with pytest.raises(SlimlmError, match=r"not a \.txt, \.md or \.jsonl file"):
        data.load_text(str(path))


@pytest.mark.parametrize("spec", ["nonsense", "wikitext", "", "hf:", "/no/such/file.txt"])
def test_unknown_spec_names_it_and_lists_forms(spec):
    with pytest.raises(SlimlmError) as info:
        data.load_text(spec)
    assert f"`{spec}`" in str(info.value)
    assert data.describe_specs() in str(info.value)


def test_unknown_austen_book_is_an_error():
    with pytest.raises(SlimlmError, match="unknown Austen book `ulysses`"):
        data.load_text("austen:ulysses")


def test_describe_specs_is_one_line_with_every_form():
    text = data.describe_specs()
    assert "\n" not in text
    for form in [".txt", "austen:BOOK", "pydoc:SECTION", "hf:NAME", *data.AUSTEN_BOOKS]:
        assert form in text


def test_default_calibration_mixes_prose_and_docs_apart_from_the_evaluation_text():
    parts = data.mixed_parts(data.DEFAULT_CALIBRATION)
    assert {p.split(":")[0] for p in parts} == {"austen", "pydoc"}
    assert data.DEFAULT_EVALUATION not in parts
    kind, book = data.DEFAULT_EVALUATION.split(":")
    assert kind == "austen" and book in data.AUSTEN_BOOKS


def test_mixed_spec_takes_windows_from_its_parts_in_turn(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(["cat"] * 40), encoding="utf-8")
    (tmp_path / "b.txt").write_text(" ".join(["dog"] * 12), encoding="utf-8")  # only 3 windows of 4
    spec = f"{tmp_path / 'a.txt'}+{tmp_path / 'b.txt'}"
    windows = data.text_windows(tokenizer, spec, 4)
    cat, dog = WORDS.index("cat") + 1, WORDS.index("dog") + 1
    assert [int(w[0]) for w in windows] == [cat, dog] * 3  # equal shares: as many of each as the shorter has
    assert [int(w[0]) for w in data.text_windows(tokenizer, spec, 4, max_windows=3)] == [cat, dog, cat]
    assert data.load_text(spec) == data.load_text(str(tmp_path / "a.txt")) + "\n\n" + data.load_text(
        str(tmp_path / "b.txt")
    )


@pytest.mark.parametrize("spec", ["austen:emma+", "+pydoc", "austen++pydoc"])
def test_mixed_spec_with_an_empty_part_is_an_error(spec):
    with pytest.raises(SlimlmError, match="empty part"):
        data.mixed_parts(spec)


def test_windows_are_consecutive_fixed_and_deterministic(tokenizer):
    ids = [(i * 7) % len(WORDS) for i in range(50)]  # 50 tokens, longer than model_max_length
    text = " ".join(WORDS[i] for i in ids)
    windows = data.token_windows(tokenizer, text, 8)
    assert windows.dtype == torch.long and windows.shape == (6, 8)  # 50 // 8, tail of 2 dropped
    assert windows.flatten().tolist() == [i + 1 for i in ids[:48]]
    assert torch.equal(windows, data.token_windows(tokenizer, text, 8))


def test_windows_start_with_bos_where_the_tokenizer_puts_one_before_every_text(tmp_path):
    bos_tokenizer, plain = tiny_tokenizer(bos=True), tiny_tokenizer()
    assert data.leading_bos(bos_tokenizer) == VOCAB and data.leading_bos(plain) is None
    text = " ".join(TINY_WORDS[:20])
    windows = data.token_windows(bos_tokenizer, text, 8)
    assert windows.shape == (2, 8)  # 20 words // 7 text tokens a window
    assert windows[:, 0].tolist() == [VOCAB, VOCAB]
    assert windows[:, 1:].flatten().tolist() == list(range(1, 15))  # consecutive text, nothing lost between
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert torch.equal(data.text_windows(bos_tokenizer, str(tmp_path / "a.txt"), 8), windows)
    assert data.text_windows(plain, str(tmp_path / "a.txt"), 8)[:, 0].tolist() == [1, 9]  # no BOS: plain text


def test_max_windows_keeps_the_first(tokenizer):
    text = " ".join(WORDS * 3)
    all_windows = data.token_windows(tokenizer, text, 4)
    assert torch.equal(data.token_windows(tokenizer, text, 4, max_windows=2), all_windows[:2])
    assert data.token_windows(tokenizer, text, 4, max_windows=100).shape == all_windows.shape


def test_long_texts_are_tokenized_in_pieces_as_far_as_the_windows_need(tokenizer, monkeypatch):
    """A whole corpus tokenized at once holds the tokenizer's records of every token (800 MB at peak
    for pydoc:library); pieces split before paragraph breaks give the same ids (the real corpora's
    were checked identical for SmolLM2 and Gemma 3)."""
    paragraphs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(i % 7 + 3)) for i in range(40)]
    text = "\n\n".join(paragraphs)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(data, "PIECE_CHARS", 30)
    calls = []
    real = tokenizer.__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, t, **kw: calls.append(t) or real(t, **kw))
    assert data.token_windows(tokenizer, text, 4).flatten().tolist() == whole[: len(whole) // 4 * 4]
    pieces = len(calls)
    assert pieces > 5 and "".join(calls) == text
    calls.clear()
    assert data.token_windows(tokenizer, text, 4, max_windows=2).flatten().tolist() == whole[:8]
    assert len(calls) < pieces / 3  # stopped once the windows had their tokens


def test_no_long_sequence_warning(tokenizer, caplog):
    data.token_windows(tokenizer, " ".join(WORDS * 10), 4)
    assert "longer than the specified maximum" not in caplog.text


def test_too_short_text_is_an_error(tokenizer):
    with pytest.raises(SlimlmError, match=r"`emma` has 3 tokens; one window needs 512"):
        data.token_windows(tokenizer, "the cat sat", 512, source="emma")


@pytest.mark.parametrize(("seq_len", "max_windows"), [(1, None), (0, None), (4, 0)])
def test_bad_sizes_are_errors(tokenizer, seq_len, max_windows):
    with pytest.raises(SlimlmError, match="at least"):
        data.token_windows(tokenizer, " ".join(WORDS), seq_len, max_windows)


def test_hf_without_datasets_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SlimlmError, match="`datasets` package"):
        data.load_text("hf:wikitext:wikitext-2-raw-v1")


def test_hf_load_failure_is_an_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(data, "_hub_reachable", lambda: True)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(SlimlmError, match=r"could not load dataset `hf:wikitext`.*no network"):
        data.load_text("hf:wikitext")


def test_hf_joins_text_column_of_test_split(monkeypatch):
    calls = []

    class FakeDataset(dict):
        column_names = ("text",)

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset(text=["first", "", "second"])

    monkeypatch.setattr(data, "_hub_reachable", lambda: True)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert data.load_text("hf:wikitext:wikitext-2-raw-v1") == "first\n\nsecond"
    data.load_text("hf:ptb:cfg:validation")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test"), ("ptb", "cfg", "validation")]


def test_hf_without_the_hub_reads_only_the_cache_at_once(monkeypatch):
    """No network: datasets in offline mode (it would retry for ~25 s), flags restored after."""
    from huggingface_hub import constants

    seen = []

    def load_dataset(name, config, split):
        seen.append((constants.HF_HUB_OFFLINE, fake.config.HF_HUB_OFFLINE))
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    fake = types.SimpleNamespace(load_dataset=load_dataset, config=types.SimpleNamespace(HF_HUB_OFFLINE=False))
    monkeypatch.setattr(data, "_hub_reachable", lambda: False)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(SlimlmError, match=r"`hf:wikitext` from the local cache: the Hugging Face Hub is not reachable"):
        data.load_text("hf:wikitext")
    assert seen == [(True, True)]
    assert constants.HF_HUB_OFFLINE is before and fake.config.HF_HUB_OFFLINE is False


def test_the_hub_is_unreachable_offline_or_without_an_answer(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1")  # nothing listens on this machine's 443
    assert not data._hub_reachable(timeout=1)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(data.socket, "create_connection", lambda *a, **k: pytest.fail("offline mode connected"))
    assert not data._hub_reachable()


def test_missing_apt_get_names_the_package(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("apt-get")

    if (data.Path("/") / data._AUSTEN_DATA / "Rdata.rdx").exists():
        pytest.skip("a system copy of janeaustenr is installed, so nothing is fetched")
    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(SlimlmError, match=r"r-cran-janeaustenr.*local \.txt file"):
        data.load_text("austen:emma")


def _fail_subprocess(*args, **kwargs):
    raise AssertionError("should have been served from the cache")


@pytest.mark.real
def test_real_austen_books_load_and_are_cached(monkeypatch):
    emma = data.load_text("austen:emma")
    pride = data.load_text("austen:prideprejudice")
    assert emma != pride
    assert len(emma) > 500_000 and len(pride) > 500_000
    assert emma.startswith("EMMA") and "Elizabeth" in pride
    assert (cache_root() / "corpora" / "austen" / "emma.txt").read_text(encoding="utf-8") == emma
    monkeypatch.setattr(subprocess, "run", _fail_subprocess)
    assert data.load_text("austen:emma") == emma
    everything = data.load_text("austen")
    assert everything.startswith(emma) and len(everything) > 3_500_000


@pytest.mark.real
def test_real_pydoc_tutorial_loads_and_is_cached(monkeypatch):
    tutorial = data.load_text("pydoc:tutorial")
    assert "Python" in tutorial and len(tutorial) > 100_000
    monkeypatch.setattr(subprocess, "run", _fail_subprocess)
    assert data.load_text("pydoc:tutorial") == tutorial
    with pytest.raises(SlimlmError, match="unknown pydoc section `nope`"):
        data.load_text("pydoc:nope")


def test_apt_get_update_is_announced_not_silent(monkeypatch, tmp_path, capsys):
    """A failed download is retried after ``apt-get update``, which changes the system: say so."""
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command[:2])
        return types.SimpleNamespace(returncode=1 if command[:2] == ["apt-get", "download"] else 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(SlimlmError, match=r"gave no \.deb file"):
        data._fetch_deb("some-corpus", tmp_path)
    assert ["apt-get", "update"] in commands
    said = capsys.readouterr()
    assert "running apt-get update" in said.out + said.err


def test_markdown_files_and_folders_of_them_are_text(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\nSome prose.")
    (tmp_path / "b.txt").write_text("More prose.")
    (tmp_path / "c.json").write_text("{}")
    assert data.load_text(str(tmp_path / "a.md")) == "# Title\n\nSome prose."
    assert data.load_text(str(tmp_path)) == "# Title\n\nSome prose.\n\nMore prose."


def test_json_lines_give_their_text_field_or_the_one_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one", "body": "uno"}\n\n{"text": "two", "body": "dos"}\n')
    assert data.load_text(str(path)) == "one\n\ntwo"
    assert data.load_text(f"{path}:body") == "uno\n\ndos"
    with pytest.raises(SlimlmError, match=r"line 1 has no text field 'title' \(fields: text, body\)"):
        data.load_text(f"{path}:title")
    path.write_text('{"text": "one"}\nnot json\n')
    with pytest.raises(SlimlmError, match="line 2 is not JSON"):
        data.load_text(str(path))
    with pytest.raises(SlimlmError, match="does not exist"):
        data.load_text(str(tmp_path / "none.jsonl"))
