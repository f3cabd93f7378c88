"""Data pipeline: text loading and cleaning, BPE round trips, the token cache, batches."""

import os
import random
import shutil

import numpy as np
import pytest
import torch

from fastattn.train import data as D
from fastattn.train.data import EOS_TOKEN, Corpus, load_texts, play_to_text

WORDS = ("thou art the king and I am thy servant nay my lord good night sweet prince "
         "what say you to this").split()


def _doc(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        out.append(f"L{seed}-{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))))
    return "\n".join(out) + "\n"


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "texts"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text(_doc(1, 300))
    (root / "b" / "c.md").write_text(_doc(2, 200))
    (root / "b" / "d.txt").write_text(_doc(3, 97))
    (root / "empty.txt").write_text("  \n")
    (root / "notes.csv").write_text("ignored,file\n")
    return root


@pytest.fixture
def small(text_dir, tmp_path):
    return Corpus.build(text_dir, vocab_size=300, cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def shakespeare_texts():
    return load_texts(None)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    return Corpus.build(None, vocab_size=512, cache_dir=tmp_path_factory.mktemp("cache"))


# ---- texts -----------------------------------------------------------------------------------


def test_default_corpus_is_plain_dialogue(shakespeare_texts):
    texts = shakespeare_texts
    assert len(texts) == 38
    full = "\n".join(texts)
    assert "To be, or not to be: that is the question:" in full
    assert "HAMLET:\nTo be, or not to be" in full
    assert "\nROMEO:\n" in full and "Now is the winter of our discontent" in full
    for markup in ("**", "#", "_", "*", "\\", "[", "]", "  \n"):
        assert markup not in full, markup
    # stage directions are gone, speeches are "NAME:" then lines, one blank line apart
    assert "Enter Ghost" not in full and "\nExit\n" not in full
    hamlet = next(t for t in texts if "HAMLET:\nTo be, or not to be" in t)
    assert hamlet.startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me")


def test_play_to_text_rules():
    md = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A heath. Thunder and\n\nlightning.\n\n"
        "_Enter FIRST WITCH and\nSECOND WITCH_\n\n"
        "**First Witch**  \nWhen shall we three meet again  \nIn thunder? _\\[Aside]_\n\n"
        "_Thunder_\n\nOr in rain\\--or hail.\n"
        "**SECOND WITCH:**  \n*[Aloud.]*  \nWhen the hurlyburly's done.\n\n"
        "RICHARD\n\n**PLANTAGENET**  \n[Within]_  \nHo!\n"
    )
    assert play_to_text(md) == (
        "First Witch:\nWhen shall we three meet again\nIn thunder?\nOr in rain--or hail.\n\n"
        "SECOND WITCH:\nWhen the hurlyburly's done.\n\n"
        "RICHARD PLANTAGENET:\nHo!\n"
    )


def test_load_texts_folder_and_file(text_dir):
    texts = load_texts(text_dir)
    # .txt/.md only, recursive, sorted by relative path, empty files skipped, verbatim
    assert texts == [_doc(1, 300), _doc(2, 200), _doc(3, 97)]
    assert load_texts(str(text_dir / "b" / "c.md")) == [_doc(2, 200)]


def test_load_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(tmp_path / "missing")
    (tmp_path / "only.csv").write_text("x")
    with pytest.raises(ValueError, match="no .txt or .md files"):
        load_texts(tmp_path)
    (tmp_path / "blank.md").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_texts(tmp_path)
    fifo = tmp_path / "pipe"          # reading it would block; /dev/urandom would never end
    os.mkfifo(fifo)
    for special in (fifo, "/dev/urandom"):
        with pytest.raises(ValueError, match="neither a regular file nor a folder"):
            load_texts(special)
    with pytest.raises(ValueError, match="empty"):
        load_texts(tmp_path / "blank.md")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt.*not UTF-8.*0xe9 at offset 3"):
        load_texts(tmp_path)
    # an empty path (an unset variable in `--data "$DATA"`) is not the working folder
    for empty in ("", " "):
        with pytest.raises(ValueError, match="the data path is empty"):
            load_texts(empty)


def test_linked_folders_and_files_are_read(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("real text\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "b.txt").write_text("local\n")
    (data / "c.txt").symlink_to(real / "a.txt")
    (data / "linked").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(data, target_is_directory=True)   # a link back up: read once
    assert load_texts(data) == ["local\n", "real text\n", "real text\n"]   # b, c, linked/a


# ---- tokenizer ---------------------------------------------------------------------------------

UNICODE = [
    "", " ", "  leading and trailing  ", "tabs\tand\r\nCRLF\rCR\n\n\n", "naïve café — “quotes”",
    "日本語のテキスト", "emoji 🎭👑 and ZWJ 👩‍👩‍👧", "nul \x00 and \x7f bytes", "a" * 1000,
    f"two docs{EOS_TOKEN}glued", "combining e\u0301 vs \u00e9", "\ufeffBOM",
]


@pytest.mark.parametrize("text", UNICODE)
def test_round_trip_unicode(small, text):
    ids = small.encode(text)
    assert all(0 <= i < small.vocab_size for i in ids)
    assert small.decode(ids) == text
    assert small.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert small.decode(np.asarray(ids, dtype=np.uint16)) == text


def test_round_trip_default_corpus(shakespeare, shakespeare_texts):
    c = shakespeare
    assert c.vocab_size == 512 and c.train.dtype == np.uint16
    assert c.eos_id == c.tokenizer.token_to_id(EOS_TOKEN)
    for text in shakespeare_texts[::7]:
        assert c.decode(c.encode(text)) == text
    assert int(c.train.max()) < c.vocab_size and int(c.val.max()) < c.vocab_size
    # the stored tokens are the encoded documents, each followed by end-of-text
    docs = c.decode(c.train).split(EOS_TOKEN) + c.decode(c.val).split(EOS_TOKEN)
    assert "To be, or not to be" in "".join(docs)


def test_token_dtype():
    assert D._token_dtype(65535) == np.uint16
    assert D._token_dtype(65536) == np.uint32


# ---- splits and cache --------------------------------------------------------------------------


def test_val_split_is_the_tail_of_each_document(small, text_dir):
    docs = load_texts(text_dir)
    heads = small.decode(small.train).split(EOS_TOKEN)
    tails = small.decode(small.val).split(EOS_TOKEN)
    assert heads[-1] == "" and tails[-1] == ""  # one end-of-text after every document part
    assert len(heads) - 1 == len(tails) - 1 == len(docs)
    for doc, head, tail in zip(docs, heads, tails):
        assert head + tail == doc  # disjoint and complete
        assert tail and head
        assert tail.startswith("L") and head.endswith("\n")  # cut at a line start
        assert 0.05 <= len(tail) / len(doc) < 0.15
    assert small.train.dtype == np.uint16 and len(small.val) > 0


def test_a_long_last_line_does_not_move_the_split(tmp_path):
    """A title line, then one 100 KB line: the cut falls at a space near 95%, not at the end
    of the title (which put all but 9 characters in validation)."""
    rng = random.Random(0)
    doc = "My Title\n" + " ".join(rng.choice(WORDS) for _ in range(20000)) + "\n"
    cut = D._split_point(doc, 0.05)
    assert 0.025 <= (len(doc) - cut) / len(doc) <= 0.1 and doc[cut - 1] == " "
    (tmp_path / "one.txt").write_text(doc)
    c = Corpus.build(tmp_path / "one.txt", vocab_size=300, cache_dir=tmp_path / "cache")
    assert c.meta["val_chars"] == len(doc) - cut and len(c.train) > 10 * len(c.val)


def test_many_short_documents_are_held_out_whole(tmp_path):
    """2000 one-line files: validation is whole files (about 5% of the text), and no training
    document loses its last characters."""
    rng = random.Random(1)
    root = tmp_path / "docs"
    root.mkdir()
    docs = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    for i, d in enumerate(docs):
        (root / f"{i:04d}.txt").write_text(d)
    c = Corpus.build(root, vocab_size=300, cache_dir=tmp_path / "cache")
    train = c.decode(c.train).split(EOS_TOKEN)[:-1]
    val = c.decode(c.val).split(EOS_TOKEN)[:-1]
    assert train + val == docs                      # whole documents, the last ones held out
    assert 0.04 <= sum(map(len, val)) / sum(map(len, docs)) <= 0.06
    # a corpus of one short document still gets a tail; a lone short one among long ones is
    # training text; a few short ones of unequal size (none small enough to hold out within
    # twice 5%) lend a tail each instead of sending the last one whole to validation
    assert D._split_documents(["a b c d e f\n"] * 1, 0.05)[1] != []
    for few in ([_doc(8, 6), _doc(9, 60)],                 # ~250 and ~2500 characters
                [_doc(10, 60), _doc(11, 60), "Q: ab\nA: cd\n"]):  # ~2500, ~2500 and 12
        train, val = D._split_documents(few, 0.05)
        assert [a + b for a, b in zip(train, val)] == few
        assert 0.025 <= sum(map(len, val)) / sum(map(len, few)) <= 0.1
    long_doc = _doc(5, 400)
    train, val = D._split_documents([long_doc, "short one\n"], 0.05)
    assert train[1] == "short one\n" and len(val) == 1 and train[0] + val[0] == long_doc


def test_large_documents_are_encoded_in_blocks(tmp_path, monkeypatch):
    """A document longer than a block is trained on and encoded in pieces cut at line ends:
    the tokens still decode to the exact text, one end-of-text per document part."""
    monkeypatch.setattr(D, "_BLOCK_CHARS", 1000)
    doc = _doc(7, 2000)                             # ~80 blocks of at most 1000 characters
    blocks = list(D._blocks(doc))
    assert "".join(blocks) == doc and all(len(b) <= 1000 for b in blocks) and len(blocks) > 50
    assert all(b.endswith("\n") for b in blocks)
    no_newline = "word " * 1000
    assert "".join(D._blocks(no_newline)) == no_newline
    (tmp_path / "big.txt").write_text(doc)
    c = Corpus.build(tmp_path / "big.txt", vocab_size=400, cache_dir=tmp_path / "cache")
    head, tail = c.decode(c.train), c.decode(c.val)
    assert head.count(EOS_TOKEN) == tail.count(EOS_TOKEN) == 1
    assert head.replace(EOS_TOKEN, "") + tail.replace(EOS_TOKEN, "") == doc


def test_stale_build_folders_are_removed(text_dir, tmp_path):
    import os
    import time
    cache = tmp_path / "cache"
    cache.mkdir()
    old, fresh = cache / ".build-0123456789abcdef-x", cache / ".build-fedcba9876543210-y"
    for p in (old, fresh):
        p.mkdir()
        (p / "train.bin").write_bytes(b"\0" * 64)
    past = time.time() - 2 * D._STALE_BUILD_S
    os.utime(old, (past, past))
    Corpus.build(text_dir, vocab_size=300, cache_dir=cache)
    assert not old.exists() and fresh.exists()      # a fresh one may belong to a running build


def test_hidden_files_are_not_text(text_dir, tmp_path):
    (text_dir / ".ipynb_checkpoints").mkdir()
    (text_dir / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("copy\n")
    (text_dir / "._a.txt").write_bytes(b"\x00\x05\x16\x07\xff")     # macOS metadata, not UTF-8
    assert load_texts(text_dir) == [(text_dir / "a.txt").read_text(),
                                    (text_dir / "b" / "c.md").read_text(),
                                    (text_dir / "b" / "d.txt").read_text()]


def test_cache_is_reused(small, text_dir, tmp_path, monkeypatch):
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in small.path.iterdir()}
    assert set(files) == {"tokenizer.json", "train.bin", "val.bin", "meta.json"}

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the cache was valid")

    monkeypatch.setattr(Corpus, "_build_into", staticmethod(no_build))
    again = Corpus.build(str(text_dir), vocab_size=300, cache_dir=tmp_path / "cache")
    assert again.path == small.path
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in again.path.iterdir()} == files
    np.testing.assert_array_equal(again.train, small.train)
    # nothing but the one cache folder is left in the cache root
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [small.path.name]


def test_changed_data_is_a_new_cache(small, text_dir, tmp_path):
    (text_dir / "b" / "d.txt").write_text(_doc(4, 97))
    changed = Corpus.build(text_dir, vocab_size=300, cache_dir=tmp_path / "cache")
    assert changed.path != small.path
    assert changed.decode(np.asarray(changed.train).tolist()).count("L4-0 ") == 1
    assert "L4-0 " not in small.decode(np.asarray(small.train).tolist())


def test_the_cache_folder_has_the_umask_permissions(text_dir, tmp_path):
    old = os.umask(0o022)
    try:
        corpus = Corpus.build(text_dir, vocab_size=300, cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    assert corpus.path.stat().st_mode & 0o777 == 0o755    # not mkdtemp's 0700


def test_a_cache_moved_aside_by_a_concurrent_builder_is_built_again(small, text_dir, tmp_path,
                                                                   monkeypatch):
    """Between this build's publishing its cache and loading it, another builder (having found
    no valid cache at its own first look) moves it aside: this one goes round again instead of
    failing; the last round finds or builds a valid cache."""
    cache = tmp_path / "cache2"
    real_load = Corpus._load
    loads = []

    def load(path):
        loads.append(path)
        if len(loads) == 2:             # the first look after publishing
            shutil.rmtree(path)         # (the other builder's move aside)
            return None
        return real_load(path)

    monkeypatch.setattr(Corpus, "_load", staticmethod(load))
    corpus = Corpus.build(text_dir, vocab_size=300, cache_dir=cache)
    np.testing.assert_array_equal(corpus.train, small.train)
    assert len(loads) == 3 and sorted(p.name for p in cache.iterdir()) == [corpus.path.name]


def test_an_invalid_cache_that_cannot_be_moved_aside_is_reported_not_rebuilt(
        small, text_dir, tmp_path, monkeypatch):
    (small.path / "meta.json").write_text("{")
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "old":      # moving the broken cache aside
            raise PermissionError(13, "Permission denied")
        real_replace(src, dst)

    def no_build(*args, **kwargs):
        raise AssertionError("built although the broken cache stays in the way")

    monkeypatch.setattr(D.os, "replace", replace)
    monkeypatch.setattr(Corpus, "_build_into", staticmethod(no_build))
    with pytest.raises(RuntimeError, match="is invalid and cannot be replaced: .*Permission"):
        Corpus.build(text_dir, vocab_size=300, cache_dir=tmp_path / "cache")


def test_folder_order_does_not_depend_on_the_listing(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.txt").write_text("A\n")
    (data / "m.txt").write_text("M\n")
    (data / "alias").symlink_to(data / "sub", target_is_directory=True)
    real_walk = os.walk

    def walk(top, **kw):    # the listing in reverse order
        for folder, subfolders, names in real_walk(top, **kw):
            subfolders.reverse()
            yield folder, subfolders, names[::-1]

    first = load_texts(data)
    monkeypatch.setattr(D.os, "walk", walk)
    assert load_texts(data) == first == ["A\n", "M\n"]    # (alias/a.txt sorts before m.txt)


def test_cache_key_depends_on_settings(small, text_dir, tmp_path):
    cache = tmp_path / "cache"
    other_vocab = Corpus.build(text_dir, vocab_size=301, cache_dir=cache)
    other_frac = Corpus.build(text_dir, vocab_size=300, cache_dir=cache, val_fraction=0.1)
    assert len({small.path, other_vocab.path, other_frac.path}) == 3
    assert len(other_frac.val) > len(small.val)


@pytest.mark.parametrize("damage", ["truncate_bin", "bad_json", "no_meta", "bad_tokenizer",
                                    "empty"])
def test_corrupt_cache_is_rebuilt(small, text_dir, tmp_path, damage):
    train, val, path = np.array(small.train), np.array(small.val), small.path
    if damage == "truncate_bin":
        with open(path / "train.bin", "r+b") as f:
            f.truncate(11)
    elif damage == "bad_json":
        (path / "meta.json").write_text('{"format": 1, "key": ')
    elif damage == "no_meta":
        (path / "meta.json").unlink()
    elif damage == "bad_tokenizer":
        (path / "tokenizer.json").write_text("not json")
    else:
        for p in path.iterdir():
            p.unlink()
    assert Corpus._load(path) is None
    rebuilt = Corpus.build(text_dir, vocab_size=300, cache_dir=tmp_path / "cache")
    assert rebuilt.path == path
    np.testing.assert_array_equal(rebuilt.train, train)
    np.testing.assert_array_equal(rebuilt.val, val)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name]


def test_token_file_overwritten_in_place_is_reported_at_use(small):
    """Same size, ids past the vocabulary: not an index error deep in the model."""
    val = np.memmap(small.path / "val.bin", dtype=small.val.dtype, mode="r+")
    val[:] = 65535
    val.flush()
    corpus = Corpus._load(small.path)
    with pytest.raises(ValueError, match=r"val.bin holds token id 65535 >= vocab_size .*delete"):
        corpus.get_batch("val", 2, 8, step=0)


def test_killed_build_leaves_no_cache(text_dir, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "_write_tokens", killed)
    with pytest.raises(KeyboardInterrupt):
        Corpus.build(text_dir, vocab_size=300, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_build_validates_arguments(text_dir, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Corpus.build(text_dir, vocab_size=256, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        Corpus.build(text_dir, vocab_size=300, cache_dir=tmp_path, val_fraction=0.0)
    with pytest.raises(FileNotFoundError):
        Corpus.build(tmp_path / "nothing", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="cache_dir is empty"):
        Corpus.build(text_dir, vocab_size=300, cache_dir="")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTATTN_DATA_CACHE", str(tmp_path / "x"))
    assert D.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("FASTATTN_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert D.default_cache_dir() == tmp_path / "fastattn" / "data"


# ---- batches -----------------------------------------------------------------------------------


def _windows(data: np.ndarray, n: int) -> set:
    return {tuple(w) for w in np.lib.stride_tricks.sliding_window_view(np.asarray(data), n)}


@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_shapes_and_shift(small, split):
    x, y = small.get_batch(split, batch_size=6, seq_len=17, step=5, seed=3)
    assert x.shape == y.shape == (6, 17) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # every row is a contiguous window of the split's tokens
    data = small.train if split == "train" else small.val
    windows = _windows(data, 18)
    for xi, yi in zip(x.tolist(), y.tolist()):
        assert tuple(xi + yi[-1:]) in windows


def test_batch_is_deterministic_in_seed_step_split(small):
    def batch(**kw):
        args = dict(split="train", batch_size=8, seq_len=16, step=0, seed=0) | kw
        return torch.cat(small.get_batch(**args), dim=1)

    assert torch.equal(batch(step=4), batch(step=4))
    assert not torch.equal(batch(step=4), batch(step=5))
    assert not torch.equal(batch(seed=1), batch(seed=0))
    assert not torch.equal(batch(split="val"), batch(split="train"))
    # no hidden state: interleaving other calls changes nothing
    first = batch(step=7)
    batch(step=8), batch(step=9, seed=2)
    assert torch.equal(batch(step=7), first)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_global_batch(shakespeare, world_size):
    gx, gy = shakespeare.get_batch("train", batch_size=8, seq_len=33, step=11, seed=1)
    parts = [shakespeare.get_batch("train", 8, 33, step=11, seed=1, rank=r, world_size=world_size)
             for r in range(world_size)]
    for r, (x, y) in enumerate(parts):
        assert x.shape == (8 // world_size, 33)
        assert torch.equal(x, gx[r::world_size]) and torch.equal(y, gy[r::world_size])
    # the ranks' rows together are exactly the global batch
    rows = sorted(tuple(row) for x, _ in parts for row in x.tolist())
    assert rows == sorted(tuple(row) for row in gx.tolist())


def test_seq_len_filling_the_split(small):
    n = len(small.val)
    x, y = small.get_batch("val", batch_size=3, seq_len=n - 1, step=0)
    assert torch.equal(x[0], torch.from_numpy(np.asarray(small.val[:-1], dtype=np.int64)))
    assert torch.equal(y[2], torch.from_numpy(np.asarray(small.val[1:], dtype=np.int64)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="test"), "split"),
    (dict(seq_len=0), "seq_len"),
    (dict(seq_len=10**9), "does not fit"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=6, world_size=4), "divisible"),
    (dict(rank=2, world_size=2), "rank"),
    (dict(rank=-1), "rank"),
    (dict(world_size=0), "world_size"),
    (dict(step=-1), "step"),
    (dict(step=1.5), "step"),
    (dict(seed="0"), "seed"),
])
def test_batch_argument_errors(small, kwargs, match):
    args = dict(split="train", batch_size=4, seq_len=8, step=0) | kwargs
    with pytest.raises(ValueError, match=match):
        small.get_batch(**args)
