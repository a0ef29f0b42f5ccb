"""Demo corpus, tokenizer, and the training/query batch layout (models/lm.py, docs/design.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from distributed_astra.data import demo_corpus
from distributed_astra.data.demo_corpus import build_demo_corpus, planted_facts
from distributed_astra.data.sequences import (
    Query,
    SequenceFormat,
    count_sequences,
    iter_document_sequences,
    iter_query_batches,
    iter_training_batches,
    load_queries,
    shuffled_epochs,
)
from distributed_astra.data.tokenizer import EOS_TOKEN, train_bpe_tokenizer
from distributed_astra.errors import DastraError
from distributed_astra.models.lm import IGNORE_INDEX

NUM_STDLIB, NUM_FACTS = 60, 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    corpus, queries = build_demo_corpus(out, NUM_STDLIB, NUM_FACTS, seed=3)
    return out, corpus, queries


@pytest.fixture(scope="module")
def tokenizer(demo, tmp_path_factory):
    _, corpus, _ = demo
    texts = pq.read_table(corpus).column("text").to_pylist()
    return train_bpe_tokenizer(texts, 600, tmp_path_factory.mktemp("tok") / "tokenizer")


def _write_corpus(path: Path, texts: list[str], ids: list[int] | None = None, **names: str) -> Path:
    ids = list(range(len(texts))) if ids is None else ids
    table = pa.table(
        {names.get("id", "doc_id"): pa.array(ids, pa.int64()), names.get("text", "text"): pa.array(texts, pa.string())}
    )
    pq.write_table(table, path)
    return path


# ----------------------------------------------------------------------------------------------------------- corpus


def test_demo_corpus_columns_and_determinism(demo, tmp_path):
    out, corpus_path, queries_path = demo
    corpus, queries = pq.read_table(corpus_path), pq.read_table(queries_path)
    assert corpus.schema.field("doc_id").type == pa.int64()
    assert corpus.schema.field("text").type == pa.string()
    assert corpus.schema.field("source").type == pa.string()
    assert queries.schema.names == ["query_id", "prompt", "completion", "fact_doc_id"]
    assert queries.schema.field("fact_doc_id").type == pa.int64()
    assert corpus.column("doc_id").to_pylist() == list(range(NUM_STDLIB + NUM_FACTS))
    sources = corpus.column("source").to_pylist()
    assert sources.count("fact") == NUM_FACTS and sources.count("stdlib") == NUM_STDLIB
    assert queries.column("query_id").to_pylist() == list(range(2 * NUM_FACTS))
    assert not list(out.glob("*.tmp"))

    again = build_demo_corpus(tmp_path / "again", NUM_STDLIB, NUM_FACTS, seed=3)
    assert pq.read_table(again[0]).equals(corpus)
    assert pq.read_table(again[1]).equals(queries)
    other = build_demo_corpus(tmp_path / "other", NUM_STDLIB, NUM_FACTS, seed=4)
    assert not pq.read_table(other[0]).equals(corpus)


def test_stdlib_documents_are_distinct_real_text(demo):
    rows = pq.read_table(demo[1]).to_pylist()
    stdlib = [r["text"] for r in rows if r["source"] == "stdlib"]
    assert len(set(stdlib)) == len(stdlib)
    assert all(demo_corpus._MIN_CHARS <= len(t) <= demo_corpus._MAX_CHARS for t in stdlib)


def test_each_fact_is_in_exactly_one_document_and_its_queries_point_there(demo):
    rows = pq.read_table(demo[1]).to_pylist()
    queries = load_queries(demo[2])
    fact_docs = {r["doc_id"] for r in rows if r["source"] == "fact"}
    assert {q.fact_doc_id for q in queries} == fact_docs
    for q in queries:
        value = q.completion.strip()
        assert q.completion == " " + value and value
        holders = [r["doc_id"] for r in rows if re.search(rf"\b{re.escape(value)}\b", r["text"])]
        assert holders == [q.fact_doc_id]
        assert q.prompt and not q.prompt.endswith(" ")
    for doc_id in fact_docs:
        assert sum(q.fact_doc_id == doc_id for q in queries) == 2
        prompts = {q.prompt for q in queries if q.fact_doc_id == doc_id}
        assert len(prompts) == 2  # two different wordings


def test_fact_names_are_distinct_and_seeded():
    facts = planted_facts(40, seed=0)
    names = [f.entity for f in facts] + [f.value for f in facts]
    assert len(set(names)) == len(names)
    assert len({f.relation for f in facts}) >= 5
    assert planted_facts(40, seed=0) == facts
    assert planted_facts(40, seed=1) != facts


def test_demo_corpus_rejects_zero_sizes(tmp_path):
    with pytest.raises(DastraError, match="num_facts"):
        build_demo_corpus(tmp_path, 10, 0, seed=0)


# -------------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_reload(demo, tokenizer, tmp_path_factory):
    texts = pq.read_table(demo[1]).column("text").to_pylist()[:20]
    texts += ["naïve café ✓ — 日本", "  two  spaces\n\ttab"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == EOS_TOKEN
    assert len(tokenizer) == 600

    out = tmp_path_factory.mktemp("reload") / "tok"
    train_bpe_tokenizer(texts, 400, out)
    train_bpe_tokenizer(texts, 420, out)  # overwriting an existing folder is atomic too
    assert not [p for p in out.parent.iterdir() if p.name != "tok"]
    reloaded = AutoTokenizer.from_pretrained(out)
    assert len(reloaded) == 420
    assert reloaded.eos_token_id == reloaded.pad_token_id
    assert reloaded.decode(reloaded(texts[0], add_special_tokens=False)["input_ids"]) == texts[0]


def test_tokenizer_rejects_a_tiny_vocab(tmp_path):
    with pytest.raises(DastraError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], 100, tmp_path / "tok")


# ------------------------------------------------------------------------------------------------ training batches


def test_sequences_never_mix_documents_and_padding_is_masked(tokenizer, tmp_path):
    texts = ["short one", "a much longer document " * 6, "x", "", "mid sized text here, ok?"]
    path = _write_corpus(tmp_path / "c.parquet", texts, ids=[10, 11, 12, 13, 14])
    max_length, eos, pad = 8, tokenizer.eos_token_id, tokenizer.pad_token_id
    batches = list(iter_training_batches(path, tokenizer, max_length, batch_size=3))
    pieces: dict[int, list[int]] = {}
    total = 0
    for batch in batches:
        ids, mask, labels, doc = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["doc_id"]
        assert ids.dtype == mask.dtype == labels.dtype == doc.dtype == torch.long
        assert ids.shape == mask.shape == labels.shape and ids.shape[0] == doc.shape[0] <= 3
        assert ids.shape[1] <= max_length
        assert ids.shape[1] == int(mask.sum(1).max())  # padded to the batch's longest
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
            assert (ids[row, n:] == pad).all()
            assert (labels[row, n:] == IGNORE_INDEX).all()
            assert torch.equal(labels[row, :n], ids[row, :n])
            pieces.setdefault(int(doc[row]), []).extend(ids[row, :n].tolist())
            total += 1
    assert list(pieces) == [10, 11, 12, 14]  # corpus order; the empty document 13 is skipped (data/corpus.py)
    for doc_id, text in zip([10, 11, 12, 14], [t for t in texts if t]):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        if len(expected) % max_length == 1 and len(expected) > 1:
            expected = expected[:-1]  # a lone trailing token predicts nothing and is dropped
        assert pieces[doc_id] == expected
    assert len(tokenizer(texts[1], add_special_tokens=False)["input_ids"]) > max_length  # really split
    assert count_sequences(path, tokenizer, max_length) == total
    limited = list(iter_training_batches(path, tokenizer, max_length, batch_size=2, max_sequences=3))
    assert sum(b["input_ids"].shape[0] for b in limited) == 3


def test_training_batches_are_deterministic_and_streamed(tokenizer, tmp_path):
    texts = [f"document number {i} " * (i % 7 + 1) for i in range(50)]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"doc_id": list(range(50)), "text": texts}), path, row_group_size=8)
    first = list(iter_training_batches(path, tokenizer, 16, batch_size=4))
    second = list(iter_training_batches(path, tokenizer, 16, batch_size=4))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second) for k in a)
    epochs = shuffled_epochs(path, tokenizer, 16, 4, seed=0)
    e0, e1 = epochs(0), epochs(1)
    assert sorted(torch.cat([b["doc_id"] for b in e0]).tolist()) == sorted(
        torch.cat([b["doc_id"] for b in first]).tolist()
    )
    assert torch.cat([b["doc_id"] for b in e0]).tolist() != torch.cat([b["doc_id"] for b in e1]).tolist()
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(e0, epochs(0)))


def test_custom_column_names(tokenizer, tmp_path):
    path = _write_corpus(tmp_path / "c.parquet", ["alpha beta", "gamma"], ids=[7, 9], text="body", id="key")
    batch = next(iter_training_batches(path, tokenizer, 16, 8, text_column="body", id_column="key"))
    assert batch["doc_id"].tolist() == [7, 9]


def test_corpus_errors_name_the_problem(tokenizer, tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DastraError, match="not found"):
        next(iter_training_batches(missing, tokenizer, 16, 4))
    path = _write_corpus(tmp_path / "c.parquet", ["a b c"])
    with pytest.raises(DastraError, match=r"no column 'body'.*") as info:
        next(iter_training_batches(path, tokenizer, 16, 4, text_column="body"))
    assert str(path) in str(info.value)
    with pytest.raises(DastraError, match="no column 'key'"):
        count_sequences(path, tokenizer, 16, id_column="key")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"doc_id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), empty)
    with pytest.raises(DastraError, match=re.escape(f"corpus {empty} is empty")):
        next(iter_training_batches(empty, tokenizer, 16, 4))


# --------------------------------------------------------------------------------------------------------- queries


def test_query_labels_mask_the_prompt_exactly(tokenizer):
    queries = [
        Query(5, "The capital of Veloria is", " Marnett", 3),
        Query(8, "x", " y and a longer completion", None),
        Query(9, "Here is a fairly long prompt with several words", " ok", None),
    ]
    batches = list(iter_query_batches(queries, tokenizer, batch_size=2))
    assert [b["query_index"].tolist() for b in batches] == [[0, 1], [2]]  # positions in the list given
    rows = [(b, r) for b in batches for r in range(b["input_ids"].shape[0])]
    for query, (batch, row) in zip(queries, rows):
        prompt = tokenizer(query.prompt, add_special_tokens=False)["input_ids"]
        completion = tokenizer(query.completion, add_special_tokens=False)["input_ids"]
        n = len(prompt) + len(completion)
        assert batch["input_ids"][row, :n].tolist() == prompt + completion
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        labels = batch["labels"][row].tolist()
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) : n] == completion
        assert all(x == IGNORE_INDEX for x in labels[n:])
        assert tokenizer.decode(batch["input_ids"][row, len(prompt) : n]) == query.completion


def test_query_errors(tokenizer):
    with pytest.raises(DastraError, match=re.escape("query 4: the completion has no tokens; give each query a")):
        list(iter_query_batches([Query(4, "a prompt", "")], tokenizer, 2))
    with pytest.raises(DastraError, match="query 6: the prompt has no tokens"):
        list(iter_query_batches([Query(6, "", " x")], tokenizer, 2))


def test_load_queries(demo, tmp_path):
    queries = load_queries(demo[2])
    assert len(queries) == 2 * NUM_FACTS and all(isinstance(q.fact_doc_id, int) for q in queries)
    plain = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query_id": [1, 2], "prompt": ["a", "b"], "completion": [" c", " d"]}), plain)
    assert load_queries(plain) == [Query(1, "a", " c", None), Query(2, "b", " d", None)]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"query_id": [1], "prompt": ["a"]}), bad)
    with pytest.raises(DastraError, match="no column 'completion'"):
        load_queries(bad)
    with pytest.raises(DastraError, match="not found"):
        load_queries(tmp_path / "missing.parquet")


def test_query_ids_are_integers_or_strings_kept_as_given(tmp_path):
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({
        "query_id": ["fact_00", "fact_01"], "prompt": ["a", "b"], "completion": [" c", " d"],
        "fact_doc_id": ["wiki/3", None],
    }), path)
    assert load_queries(path) == [Query("fact_00", "a", " c", "wiki/3"), Query("fact_01", "b", " d", None)]
    cases = {
        "nulls": ({"query_id": ["a", None]}, r"column 'query_id' has 1 null value\(s\); give every query an id"),
        "floats": ({"query_id": [1.0, 2.5]}, r"column 'query_id' must hold integers or strings, not double"),
        "binary": ({"query_id": [b"a", b"b"]}, r"column 'query_id' must hold integers or strings, not binary"),
        "duplicates": ({"query_id": ["x", "y", "x", "y"]}, r"query_id values must be unique; repeated: 'x', 'y'"),
        "bad targets": ({"query_id": [1, 2], "fact_doc_id": [0.5, 1.5]}, r"'fact_doc_id' must hold integers or strings"),
    }
    for name, (columns, message) in cases.items():
        rows = len(columns["query_id"])
        bad = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({**columns, "prompt": ["p"] * rows, "completion": [" c"] * rows}), bad)
        with pytest.raises(DastraError, match=message):
            load_queries(bad)


@pytest.mark.parametrize("max_length", [5, 16])
def test_truncate_without_eos_is_the_hf_tokenizers_truncation(tokenizer, tmp_path, max_length):
    """data.long_documents=truncate + data.add_eos=false: exactly `tokenizer(text, truncation=True,
    max_length=T, add_special_tokens=False)`; the defaults keep every token and end each document with eos."""
    texts = ["def f(x):\n    return x + 1  # a longer document than the context " * 3, "short", "two words"]
    path = _write_corpus(tmp_path / "c.parquet", texts)
    hf = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
    fmt = SequenceFormat(max_length, long_documents="truncate", add_eos=False)
    truncated = [ids for ids, _ in iter_document_sequences(path, tokenizer, fmt)]
    assert truncated == [list(ids) for ids in hf]
    assert len(hf[0]) == max_length  # the long document really was cut
    with_eos = [ids for ids, _ in iter_document_sequences(path, tokenizer, SequenceFormat(max_length, "truncate"))]
    full = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert with_eos == [(list(ids) + [tokenizer.eos_token_id])[:max_length] for ids in full]
    split = list(iter_document_sequences(path, tokenizer, SequenceFormat(max_length, "split", False)))
    for key, ids in enumerate(full):
        joined = [t for piece, k in split if k == key for t in piece]
        # every token, but a lone last one, which predicts nothing once the loss is shifted, is folded out
        assert joined == list(ids)[: len(joined)] and len(ids) - len(joined) in ((0, 1) if len(ids) > max_length else (0,))
    assert all(len(ids) <= max_length for ids, _ in split) and len(split) > len(texts)
