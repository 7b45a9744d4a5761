"""Fine-tuning data: sources, response-only masking, packing, splits, resumable batch order."""

import json

import pytest
import torch

from otaro.arch.tiny import SAMPLE_TEXT, tiny_tokenizer
from otaro.errors import OtaroError
from otaro.training.data import (
    IGNORE_INDEX,
    BatchOrder,
    Example,
    build_splits,
    load_examples,
    pack,
    pair,
    plain,
    split_indices,
)

SENTENCES = [s.strip() + "." for s in SAMPLE_TEXT.split(".") if s.strip()]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def save_dataset(path, columns, split=None):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict(columns)
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(path))
    return str(path)


def corpus_text(n):
    return "\n\n".join(f"Paragraph {i}. " + " ".join(SENTENCES[: 1 + i % 4]) for i in range(n)) + "\n"


# ---------------------------------------------------------------------------- sources


def test_txt_is_split_into_paragraphs_with_line_sources(tmp_path):
    path = write(tmp_path / "a.txt", "\ufeffFirst para,\nsecond line.\n\n\n  \nSecond para.\n")
    got = load_examples([path])
    assert [e.text for e in got] == ["First para,\nsecond line.", "Second para."]
    assert [e.source for e in got] == [f"{path}:1", f"{path}:6"]
    assert not any(e.is_pair for e in got)


def test_txt_without_blank_lines_is_one_paragraph_per_line(tmp_path):
    path = write(tmp_path / "brown.txt", "one paragraph.\ntwo paragraph.\nthree.\n")
    assert [e.text for e in load_examples([path])] == ["one paragraph.", "two paragraph.", "three."]


def test_jsonl_text_prompt_response_and_completion(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [
        {"text": "plain"},
        {"prompt": "Q?", "response": "A."},
        {"prompt": "Q2?", "completion": "A2.", "id": 7},
        {"text": "   "},  # empty: skipped
    ])
    write(tmp_path / "d.jsonl", (tmp_path / "d.jsonl").read_text() + "\n")  # trailing blank line
    got = load_examples([path])
    assert got == [plain("plain", f"{path}:1"), pair("Q?", "A.", f"{path}:2"), pair("Q2?", "A2.", f"{path}:3")]


def test_folder_is_recursive_sorted_and_reads_only_text_and_jsonl(tmp_path):
    write(tmp_path / "b" / "z.txt", "from z")
    write(tmp_path / "a.txt", "from a")
    jsonl(tmp_path / "b" / "m.jsonl", [{"text": "from m"}])
    write(tmp_path / "notes.md", "ignored")
    write(tmp_path / ".hidden" / "x.txt", "ignored")
    write(tmp_path / "b" / "empty.txt", "")  # empty file inside a folder: skipped
    assert [e.text for e in load_examples([str(tmp_path)])] == ["from a", "from m", "from z"]


def test_saved_dataset_text_column(tmp_path):
    path = save_dataset(tmp_path / "ds", {"text": ["first", "", None, "second"]})
    got = load_examples([path])
    assert got == [plain("first", f"{path}[0]"), plain("second", f"{path}[3]")]


def test_saved_dataset_dict_uses_train_split_with_pairs(tmp_path):
    path = save_dataset(tmp_path / "dd", {"prompt": ["p1", "p2"], "completion": ["r1", "r2"]}, split="train")
    assert [(e.prompt, e.response) for e in load_examples([path])] == [("p1", "r1"), ("p2", "r2")]


def test_corpus_is_one_example_per_paragraph(monkeypatch):
    from otaro.assets import corpora

    monkeypatch.setattr(corpora, "load_corpus", lambda name: {"tiny": "Para one.\n\nPara two.\n"}[name])
    got = load_examples(["corpus:tiny"])
    assert [(e.text, e.source) for e in got] == [("Para one.", "corpus:tiny:1"), ("Para two.", "corpus:tiny:3")]


def test_several_paths_keep_their_order(tmp_path):
    a = write(tmp_path / "a.txt", "A")
    b = jsonl(tmp_path / "b.jsonl", [{"text": "B"}])
    assert [e.text for e in load_examples([b, a])] == ["B", "A"]


def test_example_is_text_or_pair():
    with pytest.raises(ValueError):
        Example("text", "prompt", None, "x")
    with pytest.raises(ValueError):
        Example(None, "prompt", None, "x")


# ---------------------------------------------------------------------------- packing


def test_response_only_masking_exact_positions(tok):
    eos = tok.eos_token_id
    p, r = ids(tok, "The quick brown fox"), ids(tok, " jumps over the lazy dog.")
    t = ids(tok, "The river ran.")
    seq_len = len(p) + len(r) + 1 + len(t) + 1
    blocks = pack(tok, [pair("The quick brown fox", " jumps over the lazy dog.", "x"), plain("The river ran.", "y")],
                  seq_len, eos)
    assert blocks.input_ids.tolist() == [p + r + [eos] + t + [eos]]
    assert blocks.labels.tolist() == [[IGNORE_INDEX] * len(p) + r + [eos] + t + [eos]]
    assert blocks.input_ids.dtype == blocks.labels.dtype == torch.long
    assert blocks.masked_fraction == pytest.approx(len(p) / seq_len)


def test_packing_block_count_eos_placement_and_dropped_tail(tok):
    eos = tok.eos_token_id
    examples = [plain(s, str(i)) for i, s in enumerate(SENTENCES)]
    stream = [t for s in SENTENCES for t in ids(tok, s) + [eos]]
    seq_len = 16
    blocks = pack(tok, examples, seq_len, eos)
    n = len(stream) // seq_len
    assert blocks.input_ids.shape == (n, seq_len) and n >= 3
    assert blocks.input_ids.flatten().tolist() == stream[: n * seq_len]
    assert torch.equal(blocks.labels, blocks.input_ids)  # no prompts: labels are the inputs
    ends = [sum(len(ids(tok, s)) + 1 for s in SENTENCES[: i + 1]) - 1 for i in range(len(SENTENCES))]
    flat = blocks.input_ids.flatten()
    assert [i for i in range(len(flat)) if flat[i] == eos] == [e for e in ends if e < n * seq_len]


def test_pack_too_little_text_gives_no_block(tok):
    blocks = pack(tok, [plain("fox", "x")], 64, tok.eos_token_id)
    assert blocks.input_ids.shape == blocks.labels.shape == (0, 64)


# ---------------------------------------------------------------------------- splits


def test_split_indices_deterministic_disjoint_and_both_sides_nonempty():
    train, held = split_indices(100, 0.05, seed=3)
    assert (train, held) == split_indices(100, 0.05, seed=3)
    assert len(held) == 5 and not set(train) & set(held) and sorted(train + held) == list(range(100))
    assert held != split_indices(100, 0.05, seed=4)[1]
    assert [len(s) for s in split_indices(2, 0.01, seed=0)] == [1, 1]
    assert [len(s) for s in split_indices(7, 0.0, seed=0)] == [7, 0]


def test_build_splits_deterministic_and_heldout_disjoint(tok, tmp_path):
    n = 40
    path = write(tmp_path / "c.txt", corpus_text(n))
    a = build_splits(tok, [path], seq_len=8, heldout_fraction=0.1, seed=1)
    b = build_splits(tok, [path], seq_len=8, heldout_fraction=0.1, seed=1)
    assert torch.equal(a.train.input_ids, b.train.input_ids) and torch.equal(a.heldout.input_ids, b.heldout.input_ids)
    assert a.stats == b.stats
    assert a.stats["train"]["examples"] == 36 and a.stats["heldout"]["examples"] == 4
    assert a.stats["train"]["blocks"] == len(a.train) > 0 and len(a.heldout) > 0
    assert a.stats["train"]["masked_fraction"] == 0.0
    # example-level disjointness: each held-out paragraph's marker never appears in train text
    train_text = tok.decode(a.train.input_ids.flatten().tolist())
    held_text = tok.decode(a.heldout.input_ids.flatten().tolist())
    held_ids = set(split_indices(n, 0.1, seed=1)[1])
    for i in range(n):
        marker = f"Paragraph {i}."
        assert (marker in held_text, marker in train_text) == ((True, False) if i in held_ids else (False, True))
    json.dumps(a.stats)  # JSON-able


def test_build_splits_zero_fraction_gives_empty_heldout(tok, tmp_path):
    path = write(tmp_path / "c.txt", corpus_text(5))
    s = build_splits(tok, [path], seq_len=8, heldout_fraction=0)
    assert s.heldout.input_ids.shape == (0, 8) and len(s.train) > 0
    assert s.stats["heldout"] == {"examples": 0, "tokens": 0, "blocks": 0, "dropped_tokens": 0, "masked_fraction": 0.0}


def test_build_splits_reports_masked_fraction(tok, tmp_path):
    rows = [{"prompt": f"Question {i}: what ran past the mill?", "response": " The river."} for i in range(20)]
    s = build_splits(tok, [jsonl(tmp_path / "qa.jsonl", rows)], seq_len=8, heldout_fraction=0.1)
    assert 0.3 < s.stats["train"]["masked_fraction"] < 0.95
    assert (s.train.labels == IGNORE_INDEX).any() and (s.train.labels != IGNORE_INDEX).any()


# ---------------------------------------------------------------------------- batch order


def test_each_epoch_is_a_permutation_and_batches_wrap():
    n, B = 10, 3
    order = BatchOrder(n, B, seed=5)
    stream = [i for _ in range(10) for i in order.next_global_batch()]  # 30 = 3 epochs
    for e in range(3):
        epoch = stream[e * n : (e + 1) * n]
        assert sorted(epoch) == list(range(n))
        assert epoch == torch.randperm(n, generator=torch.Generator().manual_seed(5 + e)).tolist()
    assert order.state_dict() == {"epoch": 3, "position": 0, "seed": 5, "n": n, "batch_size": B}


def test_batch_larger_than_data_spans_epochs():
    batch = BatchOrder(4, 6, seed=0).next_global_batch()
    assert len(batch) == 6 and sorted(batch[:4]) == [0, 1, 2, 3]


def test_resume_mid_epoch_reproduces_the_uninterrupted_run():
    full = BatchOrder(13, 4, seed=2)
    expected = [full.next_global_batch() for _ in range(12)]
    first = BatchOrder(13, 4, seed=2)
    got = [first.next_global_batch() for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["position"] != 0  # mid-epoch
    resumed = BatchOrder(13, 4, seed=2)
    resumed.load_state_dict(state)
    got += [resumed.next_global_batch() for _ in range(7)]
    assert got == expected


def test_shards_union_is_the_global_batch():
    order = BatchOrder(50, 12, seed=0, world=4)
    for _ in range(6):
        batch = order.next_global_batch()
        shards = [BatchOrder.shard(batch, r, 4) for r in range(4)]
        assert all(len(s) == 3 for s in shards)
        assert sorted(i for s in shards for i in s) == sorted(batch)


# ---------------------------------------------------------------------------- errors


def raises(match, fn, *args, **kwargs):
    with pytest.raises(OtaroError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_source_errors(tmp_path):
    raises(r"nope\.txt: no such file or folder", load_examples, [str(tmp_path / "nope.txt")])
    raises(r"did you mean corpus:brown-train\?", load_examples, ["brown-train"])
    raises(r"e\.txt is empty", load_examples, [write(tmp_path / "e.txt", "\n \n")])
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(r"empty holds no \.txt or \.jsonl files", load_examples, [str(empty)])
    write(tmp_path / "blank" / "x.txt", "")
    raises(r"blank is empty", load_examples, [str(tmp_path / "blank")])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe")
    raises(r"bad\.txt is not UTF-8 text \(bad byte at offset 3\)", load_examples, [str(bad)])
    raises(r"data\.csv: unknown file type '\.csv'", load_examples, [write(tmp_path / "data.csv", "a,b")])
    raises(r"no training data given", load_examples, [])


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    write(path, '{"text": "ok"}\n{"text": "unterminated\n')
    raises(r"d\.jsonl:2: not valid JSON", load_examples, [str(path)])
    write(path, '{"text": "ok"}\n\n{"title": "x"}\n')
    raises(r'd\.jsonl:3: no usable fields \(need "text".*found \'title\'\)', load_examples, [str(path)])
    write(path, '["text"]\n')
    raises(r"d\.jsonl:1: expected a JSON object, got list", load_examples, [str(path)])
    write(path, '{"text": 3}\n')
    raises(r'd\.jsonl:1: "text" must be a string, not int', load_examples, [str(path)])
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xc3"}\n')
    raises(r"d\.jsonl:2: not UTF-8 text", load_examples, [str(path)])
    write(path, '{"text": ""}\n')
    raises(r"d\.jsonl is empty", load_examples, [str(path)])


def test_saved_dataset_errors(tmp_path):
    raises(r"ds is empty", load_examples, [save_dataset(tmp_path / "ds", {"text": []})])
    raises(r"dd0 is empty", load_examples, [save_dataset(tmp_path / "dd0", {"text": []}, split="train")])
    raises(r"blank is empty", load_examples, [save_dataset(tmp_path / "blank", {"text": ["", None]})])
    raises(r'cols: no usable columns .*found title', load_examples, [save_dataset(tmp_path / "cols", {"title": ["x"]})])
    raises(r'dd has no "train" split \(splits: test\)', load_examples,
           [save_dataset(tmp_path / "dd", {"text": ["x"]}, split="test")])


def test_build_splits_argument_errors_come_before_reading(tok, tmp_path):
    missing = str(tmp_path / "missing.txt")
    raises(r"sequence length 4096 is larger than the model allows \(2048\)",
           build_splits, tok, [missing], 4096, max_positions=2048)
    raises(r"held-out fraction must be between 0 and 0\.5 \(got 0\.6\)", build_splits, tok, [missing], 8, 0.6)
    raises(r"held-out fraction must be between 0 and 0\.5", build_splits, tok, [missing], 8, -0.1)
    raises(r"sequence length must be at least 2", build_splits, tok, [missing], 1)


def test_data_too_small_errors(tok, tmp_path):
    path = write(tmp_path / "c.txt", corpus_text(4))
    tokens = sum(len(ids(tok, p)) + 1 for p in corpus_text(4).strip().split("\n\n"))
    msg = raises(r"data too small: \d+ tokens for blocks of 100000; lower --seq-len or add data",
                 build_splits, tok, [path], 100000, 0)
    assert msg.startswith(f"data too small: {tokens} tokens")
    short = write(tmp_path / "short.txt", "Hi.\n\n" + "\n\n".join([SAMPLE_TEXT] * 3))
    seed = next(s for s in range(100) if split_indices(4, 0.25, s)[1] == [0])  # hold out "Hi."
    raises(r"data too small: 4 held-out tokens for blocks of 40; lower --seq-len or add data",
           build_splits, tok, [short], 40, 0.25, seed)
    one = write(tmp_path / "one.txt", "A single paragraph of text.")
    raises(r"data too small: 1 example cannot be split", build_splits, tok, [one], 2, 0.05)


def test_batch_order_errors():
    raises(r"global batch size 6 is not divisible by 4 processes", BatchOrder, 10, 6, world=4)
    raises(r"global batch size 6 is not divisible by 4 processes", BatchOrder.shard, list(range(6)), 0, 4)
    raises(r"process rank 2 is outside 0\.\.1", BatchOrder.shard, [0, 1], 2, 2)
    raises(r"no training blocks", BatchOrder, 0, 4)
    state = BatchOrder(10, 2, seed=1).state_dict()
    msg = raises(r"resume data does not match: n is 12 now but 10 in the checkpoint",
                 BatchOrder(12, 2, seed=1).load_state_dict, state)
    assert "batch_size" not in msg and "seed" not in msg
    raises(r"resume data does not match: .*batch_size is 4 now but 2.*seed is 0 now but 1",
           BatchOrder(10, 4, seed=0).load_state_dict, state)
    raises(r"malformed", BatchOrder(10, 2, seed=1).load_state_dict, {"epoch": 0})
    raises(r"malformed", BatchOrder(10, 2, seed=1).load_state_dict, dict(state, position=10))
