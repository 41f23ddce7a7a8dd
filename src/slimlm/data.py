"""Texts for calibration and evaluation, and their cutting into fixed-length token windows.

Built-in corpora come from Debian packages (the only source reachable without a model hub):
Jane Austen's novels from ``r-cran-janeaustenr`` and the Python docs from ``python3.11-doc``.
The ``chat`` source is made by the model itself (its answers to slimlm's calibration prompts, see
:mod:`slimlm.chat`), so it needs a loaded model: :func:`model_windows`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import urllib.parse
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from slimlm.cache import cache_root
from slimlm.chat import conversations
from slimlm.errors import SlimlmError
from slimlm.jobs import AUSTEN_BOOKS, MIX, chat_questions, describe_specs, is_chat  # the torch-free specs' home
from slimlm.jobs import DEFAULT_CALIBRATION as DEFAULT_CALIBRATION
from slimlm.jobs import DEFAULT_EVALUATION as DEFAULT_EVALUATION
from slimlm.progress import console, track

_AUSTEN_PACKAGE = "r-cran-janeaustenr"
_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
_PYDOC_PACKAGE = "python3.11-doc"
_PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"


def load_text(spec: str) -> str:
    """Return the text named by ``spec`` (see :func:`describe_specs`); never empty. Mixed specs are joined whole."""
    if MIX in spec:
        return "\n\n".join(load_text(part) for part in mixed_parts(spec))
    kind, _, arg = spec.partition(":")
    if is_chat(spec):
        raise SlimlmError(f"`{spec}` is made by the model from its own answers: use it as calibration data")
    if kind == "austen":
        books = [arg] if arg else list(AUSTEN_BOOKS)
        text = "\n\n".join(_austen_book(book) for book in books)
    elif kind == "pydoc":
        text = _pydoc_text(arg)
    elif kind == "hf" and arg:
        text = _hf_text(arg)
    elif (jsonl := _jsonl_spec(spec)) is not None:
        text = _jsonl_text(*jsonl)
    elif spec and Path(spec).exists():
        text = _local_text(Path(spec))
    else:
        raise SlimlmError(f"unknown data spec `{spec}` (nor a file or folder): expected {describe_specs()}")
    if not text.strip():
        raise SlimlmError(f"data spec `{spec}` gives an empty text")
    return text


def token_windows(
    tokenizer, text: str, seq_len: int, max_windows: int | None = None, *, source: str = "text"
) -> torch.Tensor:
    """Cut ``text`` into consecutive, non-overlapping windows of ``seq_len`` tokens: LongTensor [n, seq_len].

    Each window starts with the BOS token where the tokenizer puts one before every text (see
    :func:`leading_bos`), then the text's next ``seq_len - 1`` tokens; no other special tokens are added
    and the incomplete tail is dropped; ``max_windows`` keeps the first ones.
    """
    bos = leading_bos(tokenizer)
    return _cut(_token_ids(tokenizer, text, _needed(seq_len, max_windows, bos)), seq_len, max_windows, source, bos)


def leading_bos(tokenizer) -> int | None:
    """The BOS id every window starts with: the tokenizer's, where it puts one before every text it
    encodes (Gemma, trained so: its perplexity on Austen is 26 with it and 108 without), else None
    (SmolLM2's tokenizer adds none, and its windows are plain text)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


PIECE_CHARS = 100_000  # text tokenized per call: a whole corpus at once holds the tokenizer's per-token
# records (offsets, words, masks) for every token: 800 MB at peak for pydoc:library's 6.3M characters


def _token_ids(tokenizer, text: str, needed: int | None = None) -> list[int]:
    """``text``'s token ids, tokenized piece by piece (split before paragraph breaks, where byte-level
    pre-tokenizers split anyway) and only as far as the first ``needed`` tokens (None: all)."""
    ids: list[int] = []
    for piece in _pieces(text):
        # verbose=False: the "longer than the maximum sequence length" warning is moot, we cut windows ourselves.
        ids += tokenizer(piece, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        if needed is not None and len(ids) >= needed:
            break
    return ids


def _pieces(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.find("\n\n", start + PIECE_CHARS)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end


def _needed(seq_len: int, max_windows: int | None, bos: int | None) -> int | None:
    """Text tokens that ``max_windows`` windows take (None: every window the text gives)."""
    return None if max_windows is None else max_windows * (seq_len - (bos is not None))


def _cut(ids: list[int], seq_len: int, max_windows: int | None, source: str, bos: int | None = None) -> torch.Tensor:
    if seq_len < 2:
        raise SlimlmError(f"seq_len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise SlimlmError(f"max_windows must be at least 1, got {max_windows}")
    width = seq_len - (bos is not None)  # the text's tokens in a window
    n = len(ids) // width
    if n == 0:
        hint = "use a longer text or a smaller --seq-len"
        raise SlimlmError(f"`{source}` has {len(ids)} tokens; one window needs {width} ({hint})")
    if max_windows is not None:
        n = min(n, max_windows)
    windows = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    if bos is None:
        return windows
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SlimlmError(f"{path} is not UTF-8 text: {exc}") from exc


TEXT_SUFFIXES = (".txt", ".md")


def _local_text(path: Path) -> str:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise SlimlmError(f"folder {path} has no .txt or .md files")
        return "\n\n".join(_read(p) for p in files)
    if path.suffix not in TEXT_SUFFIXES:
        raise SlimlmError(f"{path} is not a .txt, .md or .jsonl file: expected {describe_specs()}")
    return _read(path)


def _jsonl_spec(spec: str) -> tuple[Path, str] | None:
    """``data.jsonl`` (its ``text`` field) or ``data.jsonl:FIELD`` as (path, field); None for other specs."""
    if spec.endswith(".jsonl"):
        return Path(spec), "text"
    path, _, field = spec.rpartition(":")
    return (Path(path), field) if path.endswith(".jsonl") and field else None


def _jsonl_text(path: Path, field: str) -> str:
    """The ``field`` of every record of a JSON-lines file, one document each."""
    if not path.is_file():
        raise SlimlmError(f"JSON-lines file {path} does not exist")
    documents = []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SlimlmError(f"{path} line {number} is not JSON: {error.msg}") from None
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            keys = ", ".join(record) if isinstance(record, dict) else "none: not an object"
            raise SlimlmError(f"{path} line {number} has no text field '{field}' (fields: {keys}); use {path}:FIELD")
        documents.append(value)
    return "\n\n".join(documents)


def _fetch_deb(package: str, dest: Path) -> None:
    """Download the Debian ``package`` with apt-get and unpack it into ``dest``."""
    hint = f"could not fetch the Debian package {package}; pass a local .txt file instead"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            download = ["apt-get", "download", package]
            console.print(f"fetching the text corpus {package} with apt-get download (once; cached in {cache_root()})")
            if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
                # A fresh machine has no package lists yet: update once (said, not silent), then retry.
                console.print(
                    "apt-get download failed: running apt-get update (refreshing package lists), then retrying"
                )
                subprocess.run(["apt-get", "update"], capture_output=True)
                subprocess.run(download, cwd=tmp, capture_output=True, check=True)
            debs = list(Path(tmp).glob("*.deb"))
            if not debs:
                raise SlimlmError(f"{hint} (apt-get download gave no .deb file)")
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dest)], capture_output=True, check=True)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        raise SlimlmError(f"{hint} ({detail[-1] if detail else exc})") from exc
    except OSError as exc:  # apt-get or dpkg-deb missing
        raise SlimlmError(f"{hint} ({exc})") from exc


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a killed run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _austen_book(book: str) -> str:
    if book not in AUSTEN_BOOKS:
        raise SlimlmError(f"unknown Austen book `{book}`: expected one of {', '.join(AUSTEN_BOOKS)}")
    cached = cache_root() / "corpora" / "austen" / f"{book}.txt"
    if not cached.exists():
        system = Path("/") / _AUSTEN_DATA
        if (system / "Rdata.rdx").exists():
            _cache_austen(system)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                _fetch_deb(_AUSTEN_PACKAGE, Path(tmp))
                _cache_austen(Path(tmp) / _AUSTEN_DATA)
    return cached.read_text(encoding="utf-8")


def _cache_austen(data_dir: Path) -> None:
    """Parse all six books from the R lazy-load database (Rdata.rdx index, Rdata.rdb blobs) into the cache."""
    import rdata

    with warnings.catch_warnings():  # rdata warns that .rdx is "assumed RDS", which is right
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(data_dir / "Rdata.rdx"))["variables"]
        blob = (data_dir / "Rdata.rdb").read_bytes()
        for book in track(AUSTEN_BOOKS, "Unpacking Austen novels"):
            offset, length = (int(v) for v in index[book])
            raw = blob[offset : offset + length]
            (size,) = struct.unpack(">I", raw[:4])  # each blob: big-endian length, then zlib data
            data = zlib.decompress(raw[4:])
            if len(data) != size:
                raise SlimlmError(f"corrupt {_AUSTEN_PACKAGE} data for {book}")
            lines = rdata.conversion.convert(rdata.parser.parse_data(data))
            text = "\n".join("" if line is None else str(line) for line in lines)
            _write_atomic(cache_root() / "corpora" / "austen" / f"{book}.txt", text)


def _pydoc_sources() -> Path:
    """The folder of Python 3.11 doc sources: the system one, else unpacked once into the cache."""
    system = Path("/") / _PYDOC_SOURCES
    if system.is_dir():
        return system
    cached = cache_root() / "corpora" / "pydoc"
    if not cached.is_dir():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".pydoc-"))
        try:
            _fetch_deb(_PYDOC_PACKAGE, tmp)
            # Keep only the sources (~12 MB of the 71 MB package); rename makes the cache appear whole.
            os.replace(tmp / _PYDOC_SOURCES, cached)
        except OSError as exc:
            if not cached.is_dir():  # else another process won the race, which is fine
                raise SlimlmError(f"{_PYDOC_PACKAGE} has no {_PYDOC_SOURCES} ({exc})") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cached


def _pydoc_text(section: str) -> str:
    root = _pydoc_sources()
    sections = sorted(p.name for p in root.iterdir() if p.is_dir())
    if section and section not in sections:
        raise SlimlmError(f"unknown pydoc section `{section}`: expected one of {', '.join(sections)}")
    files = sorted((root / section).rglob("*.rst.txt"))
    return "\n\n".join(_read(p) for p in files)


def _hf_text(arg: str) -> str:
    name, config, split = ([*arg.split(":"), "", ""])[:3]
    if arg.count(":") > 2 or not name:
        raise SlimlmError(f"bad hf spec `hf:{arg}`: expected hf:NAME[:CONFIG[:SPLIT]]")
    try:
        import datasets
    except ImportError as exc:
        raise SlimlmError("hf: specs need the `datasets` package (pip install 'slimlm[datasets]')") from exc
    online = _hub_reachable()
    try:
        with contextlib.nullcontext() if online else _hub_offline(datasets):
            ds = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as exc:  # no network, unknown name, bad config: all mean "cannot use this spec"
        where = "" if online else " from the local cache: the Hugging Face Hub is not reachable (no network?)"
        raise SlimlmError(f"could not load dataset `hf:{arg}`{where}: {exc}") from exc
    if "text" not in ds.column_names:
        raise SlimlmError(f"dataset `hf:{arg}` has no `text` column (columns: {', '.join(ds.column_names)})")
    return "\n".join(ds["text"])


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a connection at all (not in offline mode): without it,
    datasets retries for about 25 s before failing, where offline mode reads its cache at once."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection((urllib.parse.urlparse(constants.ENDPOINT).hostname, 443), timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline(datasets) -> Iterator[None]:
    """datasets and huggingface_hub in offline mode (cache only) inside the block: what HF_HUB_OFFLINE=1
    says, but both read that variable when imported, so their flags are set instead."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def check_spec(spec: str) -> None:
    """Refuse a data spec that would fail later, before any long work: every text part is read (and
    cached), every ``chat`` part's question count parsed (its answers need a model)."""
    for part in mixed_parts(spec):
        chat_questions(part) if is_chat(part) else load_text(part)


def mixed_parts(spec: str) -> list[str]:
    """The specs a mixed spec joins (a plain spec is its own single part)."""
    parts = spec.split(MIX)
    if not all(parts):
        raise SlimlmError(f"data spec `{spec}` has an empty part: expected {describe_specs()}")
    return parts


def text_windows(
    tokenizer,
    spec: str,
    seq_len: int,
    max_windows: int | None = None,
    chat: Callable[[int | None], list[int]] | None = None,
) -> torch.Tensor:
    """Token windows of ``spec``; a mixed spec takes windows from its parts in turn (A1, B1, A2, B2, ...),
    so any prefix of them (a search's fitness windows) covers every part alike. ``chat`` gives the
    token stream of the ``chat`` source from its number of questions (without it, that source is refused)."""
    parts = mixed_parts(spec)
    each = max_windows if len(parts) == 1 or max_windows is None else -(-max_windows // len(parts))
    bos = leading_bos(tokenizer)
    needed = _needed(seq_len, each, bos)
    windows = [_cut(_part_ids(tokenizer, p, chat, needed), seq_len, each, p, bos) for p in parts]
    if len(parts) == 1:
        return windows[0]
    rounds = min(len(w) for w in windows)  # equal shares, so no part dominates
    mixed = torch.stack([w[:rounds] for w in windows], dim=1).reshape(-1, seq_len)
    return mixed[:max_windows]


def _part_ids(tokenizer, part: str, chat: Callable[[int | None], list[int]] | None, needed: int | None) -> list[int]:
    if not is_chat(part):
        return _token_ids(tokenizer, load_text(part), needed)
    questions = chat_questions(part)  # a bad count is refused before any model speaks
    if chat is None:
        raise SlimlmError(f"`{part}` is made by the model from its own answers: it needs a loaded model")
    return chat(questions)


def model_windows(loaded, spec: str, seq_len: int, max_windows: int | None = None, answerer=None) -> torch.Tensor:
    """Token windows of ``spec`` for a loaded model, refusing windows longer than its context.

    The ``chat`` source is the answers of ``answerer`` (a loaded model; default ``loaded``): a pruned
    model heals on its dense teacher's answers, not on its own."""
    limit = loaded.dims.max_positions
    if seq_len > limit:
        raise SlimlmError(f"--seq-len {seq_len} is longer than the model's context of {limit} tokens")
    speaker = answerer or loaded
    return text_windows(
        loaded.tokenizer, spec, seq_len, max_windows, lambda n: conversations(speaker.model, speaker.tokenizer, n)
    )
