"""Streaming a corpus (data/corpus.py: Parquet/Arrow files, globs, `save_to_disk` folders) into padded training batches, and queries into prompt-masked query batches.

Batches follow `models/lm.py`: input_ids / attention_mask / labels (HF unshifted layout, -100 = no loss) [B, T],
plus `doc_id` [B] (each sequence's document key, `Document.key`) for training batches and `query_index` [B] (the
query's position in its list) for query batches. Padding is on the right, with the tokenizer's pad id,
attention_mask 0 and label -100.

A document is tokenised, given a trailing eos (`data.add_eos`), and either cut into consecutive sequences of at most
`max_length` tokens or truncated to its first `max_length` tokens (`data.long_documents`, docs/design.md,
"Documents"); a sequence never mixes two documents, so a document's gradient is the sum of its sequences'.
"""

from __future__ import annotations

import inspect
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distributed_astra.data.corpus import (
    READ_BATCH_ROWS,
    Corpus,
    CorpusShard,
    CorpusStats,
    Document,
    is_id_type,
    open_corpus,
)
from distributed_astra.errors import DastraError
from distributed_astra.models.lm import IGNORE_INDEX

CorpusSource = Path | str | Corpus  # a file, glob or folder (see data/corpus.py), or an open Corpus

Sequence = tuple[list[int], int]  # (token ids, document key or query index)


@dataclass(frozen=True)
class SequenceFormat:
    """How a document becomes token sequences (`data.max_length`, `data.long_documents`, `data.add_eos`).

    split + eos (the default) keeps every token of every document; truncate without eos gives exactly the ids of
    `tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False)`, the convention of
    kronfluence's and bergson's examples.
    """

    max_length: int
    long_documents: Literal["split", "truncate"] = "split"
    add_eos: bool = True

    @classmethod
    def of(cls, value: SequenceFormat | int) -> SequenceFormat:
        """A format, or a bare max_length with the default splitting and eos."""
        return value if isinstance(value, SequenceFormat) else cls(int(value))

    @classmethod
    def from_data(cls, data) -> SequenceFormat:
        """The format of a `DataConfig` section."""
        return cls(data.max_length, data.long_documents, data.add_eos)


# --------------------------------------------------------------------------------------------------------------------
# corpus


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DastraError("the tokenizer has neither a pad token nor an eos token; give it an eos token")
    return int(pad)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DastraError(
            "the tokenizer has no eos token; documents are ended with eos, so give it one or set data.add_eos: false"
        )
    return int(tokenizer.eos_token_id)


def _document_pieces(
    documents: Iterable[Document], tokenizer, fmt: SequenceFormat | int, read_batch_rows: int = READ_BATCH_ROWS
) -> Iterator[tuple[list[int], Document]]:
    """(token ids, document) for every sequence, tokenising `read_batch_rows` documents at a time."""
    fmt = SequenceFormat.of(fmt)
    max_length = fmt.max_length
    if max_length < 2:
        raise DastraError(f"data.max_length must be at least 2 (got {max_length})")
    ending = [_eos_id(tokenizer)] if fmt.add_eos else []
    stop = max_length if fmt.long_documents == "truncate" else None
    documents = iter(documents)
    while chunk := list(itertools.islice(documents, read_batch_rows)):
        encoded = tokenizer([doc.text for doc in chunk], add_special_tokens=False)["input_ids"]
        for doc, tokens in zip(chunk, encoded):
            tokens = (list(tokens) + ending)[:stop]
            for start in range(0, len(tokens), max_length):
                piece = tokens[start : start + max_length]
                # A lone trailing token predicts nothing (the loss is shifted): fold it out rather than emit it.
                if len(piece) < 2 and start > 0:
                    break
                yield piece, doc


def iter_document_sequences(
    corpus_path: CorpusSource,
    tokenizer,
    fmt: SequenceFormat | int,
    *,
    text_column: str = "text",
    id_column: str | None = "doc_id",
    read_batch_rows: int = READ_BATCH_ROWS,
    shard: CorpusShard | None = None,
    stats: CorpusStats | None = None,
) -> Iterator[Sequence]:
    """(token ids, doc_id) for every sequence of the corpus (or of one shard), in row order, streamed.

    `corpus_path` is anything `data.corpus.open_corpus` reads (a file, glob or folder) or an open `Corpus`.
    Rows skipped as empty or not UTF-8 are counted in `stats`.
    """
    corpus = open_corpus(corpus_path, text_column, id_column)
    documents = corpus.iter_documents(shard, stats, batch_rows=read_batch_rows)
    for piece, doc in _document_pieces(documents, tokenizer, fmt, read_batch_rows):
        yield piece, doc.key


def iter_document_batches(
    documents: Iterable[Document], tokenizer, fmt: SequenceFormat | int, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches (as `iter_training_batches`) of the given documents (e.g. `Corpus.iter_documents(shard)`),
    that also carry `row` [B], each sequence's global corpus row."""
    if batch_size <= 0:
        raise DastraError(f"batch size must be positive (got {batch_size})")
    pad = _pad_id(tokenizer)
    pieces = _document_pieces(documents, tokenizer, fmt)
    while chunk := list(itertools.islice(pieces, batch_size)):
        batch = collate_sequences([(tokens, doc.key) for tokens, doc in chunk], pad)
        batch["row"] = torch.tensor([doc.row for _, doc in chunk], dtype=torch.long)
        yield batch


def collate_sequences(sequences: list[Sequence], pad_id: int, id_key: str = "doc_id") -> dict[str, torch.Tensor]:
    """Right-pad sequences to the longest; labels are the token ids on real tokens and -100 on padding."""
    width = max(len(tokens) for tokens, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (tokens, _) in enumerate(sequences):
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    ids = torch.tensor([i for _, i in sequences], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, id_key: ids}


def iter_training_batches(
    corpus_path: CorpusSource,
    tokenizer,
    fmt: SequenceFormat | int,
    batch_size: int,
    max_sequences: int | None = None,
    *,
    text_column: str = "text",
    id_column: str | None = "doc_id",
    shard: CorpusShard | None = None,
    stats: CorpusStats | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of `batch_size` sequences in corpus order (the last one may be smaller).

    `max_sequences` stops after that many sequences (None: the whole corpus); `shard` restricts the pass to one
    shard of `Corpus.shard_plan`; `stats` counts the rows read and skipped.
    """
    if batch_size <= 0:
        raise DastraError(f"batch size must be positive (got {batch_size})")
    pad = _pad_id(tokenizer)
    pending: list[Sequence] = []
    emitted = 0
    for sequence in iter_document_sequences(
        corpus_path, tokenizer, fmt, text_column=text_column, id_column=id_column, shard=shard, stats=stats
    ):
        if max_sequences is not None and emitted + len(pending) >= max_sequences:
            break
        pending.append(sequence)
        if len(pending) == batch_size:
            yield collate_sequences(pending, pad)
            emitted += len(pending)
            pending = []
    if pending:
        yield collate_sequences(pending, pad)


def count_sequences(
    corpus_path: CorpusSource,
    tokenizer,
    fmt: SequenceFormat | int,
    *,
    text_column: str = "text",
    id_column: str | None = "doc_id",
) -> int:
    """How many sequences `iter_training_batches` yields over the whole corpus (one streaming pass)."""
    return sum(
        1
        for _ in iter_document_sequences(
            corpus_path, tokenizer, fmt, text_column=text_column, id_column=id_column
        )
    )


def shuffled_epochs(
    corpus_path: CorpusSource,
    tokenizer,
    fmt: SequenceFormat | int,
    batch_size: int,
    seed: int,
    *,
    text_column: str = "text",
    id_column: str | None = "doc_id",
    bucket_batches: int = 16,
) -> Callable[[int], list[dict[str, torch.Tensor]]]:
    """For training the demo model: `epoch -> batches`, the corpus's sequences reshuffled each epoch with `seed`.

    Each window of `bucket_batches * batch_size` shuffled sequences is sorted by length before it is cut into
    batches (less padding), and the batches are then shuffled. Holds the tokenised corpus in memory (fine for the
    demo corpus; attribution stages stream instead).
    """
    pad = _pad_id(tokenizer)
    sequences = list(
        iter_document_sequences(corpus_path, tokenizer, fmt, text_column=text_column, id_column=id_column)
    )
    window = max(1, bucket_batches) * batch_size

    def epoch_batches(epoch: int) -> list[dict[str, torch.Tensor]]:
        rng = random.Random(f"{seed}-{epoch}")
        order = list(range(len(sequences)))
        rng.shuffle(order)
        groups: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(sequences[i][0]))
            groups.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
        rng.shuffle(groups)
        return [collate_sequences([sequences[i] for i in group], pad) for group in groups]

    return epoch_batches


# --------------------------------------------------------------------------------------------------------------------
# queries


QueryId = int | str  # as the queries file gives it


@dataclass(frozen=True)
class Query:
    query_id: QueryId
    prompt: str
    completion: str
    fact_doc_id: int | str | None = None


def _id_column(table: pa.Table, column: str, queries_path: Path, nullable: bool) -> list:
    """The values of an id column (integers or strings), refusing other types and (unless nullable) nulls."""
    values = table.column(column)
    if not is_id_type(values.type):
        raise DastraError(
            f"queries {queries_path}: column '{column}' must hold integers or strings, not {values.type}; "
            "rewrite it as one of the two"
        )
    if not nullable and values.null_count:
        raise DastraError(
            f"queries {queries_path}: column '{column}' has {values.null_count} null value(s); give every query an id"
        )
    return values.to_pylist()


def load_queries(queries_path: Path) -> list[Query]:
    """Queries from a Parquet file with columns query_id, prompt, completion and, optionally, fact_doc_id.

    Ids (query_id, fact_doc_id) are integers or strings and are kept as given in every output table.
    """
    queries_path = Path(queries_path)
    if not queries_path.is_file():
        raise DastraError(f"queries file '{queries_path}' not found; point data.queries at a Parquet file")
    try:
        table = pq.read_table(queries_path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DastraError(f"queries file '{queries_path}' is not a readable Parquet file ({exc})") from exc
    for column in ("query_id", "prompt", "completion"):
        if column not in table.column_names:
            raise DastraError(
                f"queries {queries_path} has no column '{column}'; it needs query_id, prompt and completion "
                f"(its columns are {table.column_names})"
            )
    if table.num_rows == 0:
        raise DastraError(f"queries {queries_path} is empty")
    ids = _id_column(table, "query_id", queries_path, nullable=False)
    prompts = table.column("prompt").to_pylist()
    completions = table.column("completion").to_pylist()
    has_targets = "fact_doc_id" in table.column_names
    targets = _id_column(table, "fact_doc_id", queries_path, nullable=True) if has_targets else [None] * len(ids)
    duplicates = sorted((i for i, n in Counter(ids).items() if n > 1), key=str)
    if duplicates:
        shown = ", ".join(repr(i) for i in duplicates[:5])
        raise DastraError(f"queries {queries_path}: query_id values must be unique; repeated: {shown}")
    return [Query(i, p or "", c or "", t) for i, p, c, t in zip(ids, prompts, completions, targets)]


def encode_query(query: Query, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids), tokenised separately so the boundary between them is exact."""
    prompt = tokenizer(query.prompt, add_special_tokens=False)["input_ids"]
    completion = tokenizer(query.completion, add_special_tokens=False)["input_ids"]
    if not completion:
        raise DastraError(
            f"query {query.query_id}: the completion has no tokens; give each query a non-empty completion"
        )
    if not prompt:
        raise DastraError(
            f"query {query.query_id}: the prompt has no tokens; the first token is never predicted, "
            "so give each query a non-empty prompt"
        )
    return list(prompt), list(completion)


def collate_queries(queries: list[Query], tokenizer, first_index: int = 0) -> dict[str, torch.Tensor]:
    """One padded batch: labels are -100 on prompt tokens and padding, the token ids on completion tokens;
    `query_index` [B] numbers the queries from `first_index`."""
    pad = _pad_id(tokenizer)
    encoded = [encode_query(q, tokenizer) for q in queries]
    sequences = [(p + c, first_index + i) for i, (p, c) in enumerate(encoded)]
    batch = collate_sequences(sequences, pad, id_key="query_index")
    for row, (prompt, _) in enumerate(encoded):
        batch["labels"][row, : len(prompt)] = IGNORE_INDEX
    return batch


def iter_query_batches(queries: Iterable[Query], tokenizer, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Query batches of `batch_size` in the given order (the last one may be smaller); `query_index` is each
    query's position in `queries`."""
    if batch_size <= 0:
        raise DastraError(f"batch size must be positive (got {batch_size})")
    pending: list[Query] = []
    done = 0
    for query in queries:
        pending.append(query)
        if len(pending) == batch_size:
            yield collate_queries(pending, tokenizer, done)
            done += len(pending)
            pending = []
    if pending:
        yield collate_queries(pending, tokenizer, done)


def epoch_source(batches) -> Callable[[int], Iterable[dict[str, torch.Tensor]]]:
    """Normalise a training-batch source to `epoch -> batches`: a list, a callable of the epoch, or of nothing."""
    if callable(batches):
        try:
            takes_epoch = len(inspect.signature(batches).parameters) >= 1
        except (TypeError, ValueError):
            takes_epoch = True
        return batches if takes_epoch else (lambda epoch: batches())
    fixed = list(batches)
    if not fixed:
        raise DastraError("no training batches: the corpus gave no sequences")
    return lambda epoch: fixed
