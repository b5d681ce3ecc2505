import numpy as np
import pytest
import torch

from ftransformer import data

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 3
UNICODE_TEXT = "naïve café — 東京 🙂\ttabs\r\nand\x00nul"


# ---------------------------------------------------------------- char tokenizer


def test_char_tokenizer_round_trip_and_sorted_vocab():
    tok = data.CharTokenizer.from_text(UNICODE_TEXT + TEXT)
    assert tok.chars == sorted(set(UNICODE_TEXT + TEXT))
    assert tok.vocab_size == len(set(UNICODE_TEXT + TEXT))
    for s in (TEXT, UNICODE_TEXT, ""):
        ids = tok.encode(s)
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == s
    arr = tok.encode_array(TEXT)
    assert arr.dtype == np.uint16
    assert tok.decode(torch.tensor(arr.astype(np.int64))) == TEXT
    # ids follow the sorted characters
    assert tok.encode(tok.chars[0] + tok.chars[-1]) == [0, tok.vocab_size - 1]


def test_char_tokenizer_unknown_character_and_bad_id():
    tok = data.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"character 'z' \(U\+007A\) at position 2 is not in the tokenizer's vocabulary of 3"):
        tok.encode("abz")
    with pytest.raises(ValueError, match=r"token id 3 is outside \[0, vocab_size=3\)"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="empty"):
        data.CharTokenizer.from_text("")


def test_char_tokenizer_save_load(tmp_path):
    tok = data.CharTokenizer.from_text(UNICODE_TEXT)
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    loaded = data.load_tokenizer(tmp_path)
    assert isinstance(loaded, data.CharTokenizer) and loaded == tok
    assert loaded.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    assert loaded.fingerprint() == tok.fingerprint()


# ---------------------------------------------------------------- BPE tokenizer


@pytest.fixture(scope="module")
def bpe():
    corpus = "".join(f"def function_{i}(x, y):\n    return x * {i} + y\n\n" for i in range(60))
    return data.BPETokenizer.train(corpus, vocab_size=300)


def test_bpe_trains_locally_and_round_trips(bpe):
    assert 256 < bpe.vocab_size <= 300
    code = "def function_7(x, y):\n    return x * 7 + y\n"
    ids = bpe.encode(code)
    assert len(ids) < len(code.encode())  # merges were learned
    assert bpe.decode(ids) == code
    # byte-level: text with characters never seen in training still round-trips exactly
    assert bpe.decode(bpe.encode(UNICODE_TEXT)) == UNICODE_TEXT
    assert bpe.encode_array(code).tolist() == ids


def test_bpe_is_deterministic_and_saves(bpe, tmp_path):
    corpus = "".join(f"def function_{i}(x, y):\n    return x * {i} + y\n\n" for i in range(60))
    again = data.BPETokenizer.train(corpus, vocab_size=300)
    assert again == bpe
    bpe.save(tmp_path)
    loaded = data.load_tokenizer(tmp_path)
    assert isinstance(loaded, data.BPETokenizer)
    assert loaded.encode(TEXT) == bpe.encode(TEXT)
    # the file is the tokenizers library's own format
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(TEXT).ids == bpe.encode(TEXT)


def test_bpe_bad_arguments(bpe):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        data.BPETokenizer.train(TEXT, vocab_size=100)
    with pytest.raises(ValueError, match="outside"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(ValueError, match="tokenizer must be one of 'char', 'bpe', got 'word'"):
        data.build_tokenizer("word", TEXT)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        data.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "words"}')
    with pytest.raises(ValueError, match="neither a char tokenizer nor a BPE tokenizer"):
        data.load_tokenizer(tmp_path)


# ---------------------------------------------------------------- corpora and their errors


def test_read_text_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match=r"data file '.*missing\.txt' does not exist"):
        data.read_text_file(missing)
    with pytest.raises(ValueError, match="is a directory"):
        data.read_text_file(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data file '.*empty\.txt' is empty"):
        data.read_text_file(empty)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"data file '.*latin1\.txt' is not UTF-8 text \(byte 0xe9 at offset 3"):
        data.read_text_file(latin)
    good = tmp_path / "good.txt"
    good.write_text(UNICODE_TEXT, encoding="utf-8", newline="")
    assert data.read_text_file(good) == UNICODE_TEXT


def test_too_short_file_is_named(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    need = data.min_tokens(8, 0.1)
    with pytest.raises(ValueError, match=rf"data file '.*short\.txt' is too short: 11 tokens, .* seq_len=8 needs at least {need}"):
        data.load_dataset(short, seq_len=8)


def test_min_tokens_is_the_smallest_that_works():
    for seq_len, frac in ((8, 0.1), (64, 0.1), (5, 0.5), (3, 0.25)):
        n = data.min_tokens(seq_len, frac)
        for m, ok in ((n, True), (n - 1, False)):
            train, val = data.split_ids(np.arange(m), frac)
            assert (len(train) > seq_len and len(val) > seq_len) == ok


def test_builtin_corpus_is_the_stdlib_and_deterministic():
    files = data.stdlib_files()
    assert files and all(f.suffix == ".py" for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts[-3:-1])
    a = data.builtin_corpus(max_chars=50_000)
    b = data.builtin_corpus(max_chars=50_000)
    assert a == b and 0 < len(a) <= 50_000
    assert a.startswith(files[0].read_text(encoding="utf-8"))
    name, text = data.load_corpus(None)
    assert name == data.BUILTIN_CORPUS and len(text) > 1_000_000


# ---------------------------------------------------------------- cache, split, batches


def test_tokenize_cached_writes_once_and_reuses(tmp_path, monkeypatch):
    tok = data.CharTokenizer.from_text(TEXT)
    ids = data.tokenize_cached(TEXT, tok, tmp_path)
    files = list(tmp_path.glob("tokens-*.npy"))
    assert len(files) == 1 and isinstance(ids, np.memmap)
    assert tok.decode(ids) == TEXT

    def refuse(text):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tok, "encode_array", refuse)
    again = data.tokenize_cached(TEXT, tok, tmp_path)
    assert np.array_equal(again, ids)
    monkeypatch.undo()
    # another text (or tokenizer) gets its own file
    data.tokenize_cached(TEXT[:-5], tok, tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2
    # a damaged cache file is rebuilt
    files[0].write_bytes(b"garbage")
    assert np.array_equal(data.tokenize_cached(TEXT, tok, tmp_path), tok.encode_array(TEXT))
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_split_is_contiguous():
    ids = np.arange(1000)
    train, val = data.split_ids(ids)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), ids)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        data.split_ids(ids, 1.0)


def test_batches_are_deterministic_by_seed_and_step():
    ids = np.random.default_rng(0).integers(0, 50, 777).astype(np.uint16)
    x, y = data.sample_batch(ids, 5, 9, seed=3, step=11)
    assert x.shape == (5, 9) and y.shape == (5, 9) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    x2, y2 = data.sample_batch(ids, 5, 9, seed=3, step=11)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, data.sample_batch(ids, 5, 9, seed=3, step=12)[0])
    assert not torch.equal(x, data.sample_batch(ids, 5, 9, seed=4, step=11)[0])
    assert not torch.equal(x, data.sample_batch(ids, 5, 9, seed=3, step=11, stream=1)[0])
    # every row is a window of the data
    for row_x, row_y in zip(x, y):
        window = torch.cat([row_x, row_y[-1:]]).numpy()
        starts = [i for i in range(len(ids) - 9) if np.array_equal(ids[i : i + 10], window)]
        assert starts
    # a tensor of ids gives the same batch
    xt, _ = data.sample_batch(torch.from_numpy(ids.astype(np.int64)), 5, 9, seed=3, step=11)
    assert torch.equal(xt, x)
    fixed = data.fixed_batches(ids, 3, 5, 9, seed=3)
    assert len(fixed) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(fixed, data.fixed_batches(ids, 3, 5, 9, seed=3)))


def _scored(windows):
    """(position of the target in the split, target id) for every scored target, in order."""
    out = []
    for tokens, targets in windows:
        for t_row, y_row in zip(tokens, targets):
            # the row's tokens are ids[start : start + seq], so the target at column j is ids[start + j + 1]
            start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
                ALL_IDS, len(t_row)) == t_row.numpy(), axis=1))[0])
            out += [(start + j + 1, int(y)) for j, y in enumerate(y_row) if y != -100]
    return out


ALL_IDS = np.random.default_rng(1).permutation(1000)[:103].astype(np.uint16)  # distinct ids: windows are unique


@pytest.mark.parametrize("seq_len, batch_size", [(10, 3), (17, 4), (102, 2), (150, 2), (1, 50)])
def test_split_windows_score_every_target_once(seq_len, batch_size):
    w = data.SplitWindows(ALL_IDS, seq_len, batch_size)
    scored = _scored(w)
    assert scored == [(i, int(ALL_IDS[i])) for i in range(1, len(ALL_IDS))]  # each target once, in order
    assert w.n_targets == len(ALL_IDS) - 1
    batches = list(w)
    assert len(batches) == len(w) == -(-w.n_windows // batch_size)
    assert all(t.shape == y.shape == (min(batch_size, w.n_windows - i * batch_size), min(seq_len, 102))
               for i, (t, y) in enumerate(batches))
    assert all(t.dtype == torch.int64 for t, _ in batches)
    # non-overlapping: every full window starts at a multiple of seq_len
    assert batches[0][0][0, 0] == ALL_IDS[0]


def test_split_windows_tail_and_drop_last():
    ids = np.arange(20)  # 19 targets: 3 windows of 6, and 1 left over
    w = data.SplitWindows(ids, 6, 2)
    (t0, y0), (t1, y1) = w
    assert t0.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    # the tail is the split's last 6 tokens, with the 5 targets already scored masked
    assert t1.tolist() == [[12, 13, 14, 15, 16, 17], [13, 14, 15, 16, 17, 18]]
    assert y1.tolist() == [[13, 14, 15, 16, 17, 18], [-100] * 5 + [19]]
    dropped = data.SplitWindows(ids, 6, 2, drop_last=True)
    assert dropped.n_targets == 18 and len(dropped) == 2 and dropped[1][0].shape == (1, 6)
    assert data.SplitWindows(np.arange(13), 6, 5).n_windows == 2  # 12 targets fill two windows exactly
    assert w[-1][0].tolist() == t1.tolist()
    # a tensor of ids gives the same windows
    assert torch.equal(data.SplitWindows(torch.arange(20), 6, 2)[1][1], y1)


def test_split_windows_errors():
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        data.SplitWindows(np.arange(10), 0, 2)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        data.SplitWindows(np.arange(1), 4, 2)
    with pytest.raises(IndexError, match="out of range for 2 batches"):
        data.SplitWindows(np.arange(20), 6, 2)[2]


def test_sample_batch_errors():
    ids = np.arange(10)
    with pytest.raises(ValueError, match=r"need at least seq_len \+ 1 = 11 tokens"):
        data.sample_batch(ids, 2, 10, seed=0, step=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        data.sample_batch(ids, 0, 4, seed=0, step=0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        data.sample_batch(ids, 2, 4, seed=-1, step=0)


def test_load_dataset_end_to_end(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 4, encoding="utf-8")
    ds = data.load_dataset(path, tokenizer="char", seq_len=7, val_fraction=0.2, cache_dir=tmp_path / "cache")
    assert ds.name == str(path) and ds.n_chars == len(TEXT * 4)
    assert len(ds.train) + len(ds.val) == len(TEXT * 4)
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == TEXT * 4
    # a saved tokenizer is reused as is; one that cannot encode the corpus is a clear error
    other = tmp_path / "other.txt"
    other.write_text("xyz" * 100, encoding="utf-8")
    with pytest.raises(ValueError, match="cannot be tokenized with the checkpoint's tokenizer: character 'x'"):
        data.load_dataset(other, tokenizer=ds.tokenizer, seq_len=7)
