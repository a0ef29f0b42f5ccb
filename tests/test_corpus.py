"""Streamed corpora (data/corpus.py): Parquet, Arrow (file and stream), globs, `datasets.save_to_disk` folders,
shard plans, doc_id -> text lookups, and the bad inputs (missing text column, empty and non-UTF-8 rows)."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_astra.data.corpus import CorpusStats, ShardPlan, open_corpus
from distributed_astra.data.sequences import iter_training_batches
from distributed_astra.data.tokenizer import train_bpe_tokenizer
from distributed_astra.errors import DastraError

TEXTS = [f"document {i}: " + "word " * (i % 5 + 1) for i in range(37)]


def _table(texts: list[str], first_id: int = 100) -> pa.Table:
    return pa.table({"doc_id": pa.array(range(first_id, first_id + len(texts)), pa.int64()), "text": texts})


def _docs(corpus, shard=None, stats=None) -> list[tuple[int, int, str]]:
    return [(d.doc_id, d.row, d.text) for d in corpus.iter_documents(shard, stats, batch_rows=4)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS * 3, 300, tmp_path_factory.mktemp("tok") / "tok")


def test_every_format_yields_the_same_documents(tmp_path):
    table = _table(TEXTS)
    expected = [(100 + i, i, t) for i, t in enumerate(TEXTS)]
    pq.write_table(table, tmp_path / "one.parquet", row_group_size=5)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=6)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=7)
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, start in enumerate(range(0, len(TEXTS), 10)):  # a glob over 4 files, ordered by name
        pq.write_table(table.slice(start, 10), parts / f"part-{i:02d}.parquet")
    datasets.Dataset.from_dict(table.to_pydict()).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(table.to_pydict()), "test": datasets.Dataset.from_dict({"doc_id": [1], "text": ["x"]})}
    ).save_to_disk(str(tmp_path / "hfdict"))
    sources = [tmp_path / "one.parquet", tmp_path / "file.arrow", tmp_path / "stream.arrow",
               str(parts / "part-*.parquet"), parts, tmp_path / "hf", tmp_path / "hfdict"]
    formats = []
    for source in sources:
        corpus = open_corpus(source)
        assert corpus.num_rows == len(TEXTS), source
        assert _docs(corpus) == expected, source
        formats.append({f.format for f in corpus.files})
    assert formats[:3] == [{"parquet"}, {"arrow_file"}, {"arrow_stream"}]
    assert formats[5] == {"arrow_stream"}  # what datasets writes
    with pytest.raises(DastraError, match=re.escape("data.split: 'validation' is not a split")):
        open_corpus(tmp_path / "hfdict", split="validation")
    assert _docs(open_corpus(tmp_path / "hfdict", split="test")) == [(1, 0, "x")]


def test_shard_plan_is_stable_and_covers_every_row_once(tmp_path):
    table = _table(TEXTS)
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(table.slice(0, 20), parts / "a.parquet", row_group_size=3)
    pq.write_table(table.slice(20), parts / "b.parquet", row_group_size=4)
    corpus = open_corpus(str(parts / "*.parquet"))
    plan = corpus.shard_plan(6)
    assert [(s.shard_id, Path(s.path).name, s.row_start, s.row_stop) for s in plan.shards] == [
        (0, "a.parquet", 0, 6), (1, "a.parquet", 6, 12), (2, "a.parquet", 12, 18), (3, "a.parquet", 18, 20),
        (4, "b.parquet", 0, 6), (5, "b.parquet", 6, 12), (6, "b.parquet", 12, 17),
    ]
    again = open_corpus(str(parts / "*.parquet")).shard_plan(6)
    assert again == plan and ShardPlan.from_json(plan.to_json()) == plan
    assert corpus.shard_plan(7).fingerprint != plan.fingerprint
    rows = [doc for shard in plan.shards for doc in _docs(corpus, shard)]
    assert rows == _docs(corpus)  # shards in order = the whole corpus, each row once
    pq.write_table(table.slice(20, 5), parts / "b.parquet")  # the corpus changed: another fingerprint
    assert open_corpus(str(parts / "*.parquet")).shard_plan(6).fingerprint != plan.fingerprint


def test_text_lookup_by_id_and_by_row(tmp_path):
    pq.write_table(_table(TEXTS), tmp_path / "c.parquet", row_group_size=4)
    corpus = open_corpus(tmp_path / "c.parquet")
    assert corpus.texts([130, 100, 999, 117]) == {100: TEXTS[0], 117: TEXTS[17], 130: TEXTS[30]}
    positional = open_corpus(tmp_path / "c.parquet", id_column=None)
    assert positional.texts([36, 2]) == {2: TEXTS[2], 36: TEXTS[36]}
    found = positional.documents_at([35, 0, 5])
    assert {r: (d.doc_id, d.text) for r, d in found.items()} == {0: (0, TEXTS[0]), 5: (5, TEXTS[5]), 35: (35, TEXTS[35])}


def test_missing_text_column_lists_the_columns(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"doc_id": [1, 2], "body": ["a", "b"], "lang": ["en", "fr"]}), path)
    with pytest.raises(DastraError) as info:
        open_corpus(path, text_column="text")
    assert str(info.value) == (
        f"corpus {path} has no column 'text' (data.text_column); its columns are ['doc_id', 'body', 'lang']"
    )
    pq.write_table(pa.table({"doc_id": [1.5], "text": ["a"]}), tmp_path / "float_ids.parquet")
    with pytest.raises(DastraError, match=r"column 'doc_id' \(data.id_column\) must hold integers or strings"):
        open_corpus(tmp_path / "float_ids.parquet")
    assert _docs(open_corpus(tmp_path / "float_ids.parquet", id_column=None)) == [(0, 0, "a")]
    pq.write_table(pa.table({"doc_id": [1], "lang": [3]}), tmp_path / "numbers.parquet")
    with pytest.raises(DastraError, match=r"column 'lang' \(data.text_column\) must hold text"):
        open_corpus(tmp_path / "numbers.parquet", text_column="lang")
    with pytest.raises(DastraError, match="matches no file"):
        open_corpus(str(tmp_path / "nothing-*.parquet"))
    (tmp_path / "c.csv").write_text("text\na\n")
    with pytest.raises(DastraError, match="unsupported suffix '.csv'"):
        open_corpus(tmp_path / "c.csv")


def test_empty_and_non_utf8_rows_are_skipped_and_counted(tmp_path, tokenizer):
    raw = [b"first good text", b"\xff\xfe not utf-8", b"", None, b"   \n\t", b"caf\xc3\xa9 is fine", b"\xc3\x28"]
    text = pa.array(raw, pa.binary()).view(pa.string())  # a string column holding invalid UTF-8, as files can
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"doc_id": pa.array(range(7), pa.int64()), "text": text}), path)
    with pytest.raises(UnicodeDecodeError):  # what a naive reader does
        pq.read_table(path).column("text").to_pylist()
    stats = CorpusStats()
    assert _docs(open_corpus(path), stats=stats) == [(0, 0, "first good text"), (5, 5, "café is fine")]
    assert (stats.rows, stats.documents, stats.skipped_empty, stats.skipped_non_utf8) == (7, 2, 3, 2)
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"doc_id": pa.array(range(7), pa.int64()), "text": pa.array(raw, pa.binary())}), binary)
    stats = CorpusStats()
    batches = list(iter_training_batches(binary, tokenizer, 16, 4, stats=stats))
    assert sorted({i for b in batches for i in b["doc_id"].tolist()}) == [0, 5]
    assert (stats.skipped_empty, stats.skipped_non_utf8) == (3, 2)


def test_streaming_reads_one_record_batch_at_a_time(tmp_path):
    """The reader never materialises the file: documents arrive before the rest of the file is read."""
    path = tmp_path / "c.parquet"
    pq.write_table(_table(TEXTS * 30), path, row_group_size=64)
    corpus = open_corpus(path)
    stats = CorpusStats()
    documents = corpus.iter_documents(stats=stats, batch_rows=16)
    first = next(documents)
    assert first.doc_id == 100 and stats.rows == 0  # the first record batch is still being yielded
    for _ in range(16):
        next(documents)
    assert stats.rows == 16  # exactly one record batch of 16 rows read so far, out of 1110


def test_string_doc_ids_are_kept_and_keyed_by_row(tmp_path):
    """A string id column: documents keep their ids; tensors key them by global row, and `doc_ids` maps back."""
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"doc_id": ["wiki/x", "wiki/y"], "text": ["one", " "]}), first)
    pq.write_table(pa.table({"doc_id": ["wiki/z"], "text": ["three"]}), second)
    corpus = open_corpus(str(tmp_path / "*.parquet"))
    docs = list(corpus.iter_documents())
    assert [(d.doc_id, d.row, d.key) for d in docs] == [("wiki/x", 0, 0), ("wiki/z", 2, 2)]
    assert corpus.doc_ids([2, 0]) == {0: "wiki/x", 2: "wiki/z"}
    assert corpus.texts([2]) == {2: "three"}
    pq.write_table(pa.table({"doc_id": [7], "text": ["four"]}), tmp_path / "c.parquet")
    with pytest.raises(DastraError, match="integers in some files and strings in others"):
        open_corpus(str(tmp_path / "*.parquet"))
    pq.write_table(pa.table({"doc_id": ["u", None], "text": ["a", "b"]}), tmp_path / "nulls.parquet")
    with pytest.raises(DastraError, match=r"null doc id; give every row an id"):
        list(open_corpus(tmp_path / "nulls.parquet").iter_documents())
