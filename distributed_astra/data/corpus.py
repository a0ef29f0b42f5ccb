"""Streamed text corpora: Parquet or Arrow files, globs of them, and Hugging Face `save_to_disk` folders.

    corpus = open_corpus("data/train-*.parquet", text_column="text", id_column=None)
    plan = corpus.shard_plan(rows_per_shard=10_000)           # stable shard ids: file + row range
    for doc in corpus.iter_documents(plan.shards[3]):          # Document(doc_id, row, text), one record batch at a time
        ...
    corpus.texts([12, 40])                                     # document key -> text, for reports
    corpus.doc_ids([12, 40])                                   # document key -> doc_id as the corpus gives it

Nothing here holds the corpus in memory: files are read one record batch (`READ_BATCH_ROWS` rows) at a time, Arrow
files through a memory map. The files of a corpus are ordered (a glob is sorted by path, a `save_to_disk` folder
keeps the order of its `state.json`), and every row has a global index `row` in that order. The document id is the
`id_column` value as given (an integer or a string) when one is configured, and `row` otherwise (stable as long as
the files do not change). Tensors carry a document's integer `key`: its id when ids are integers, its row otherwise;
`Corpus.doc_ids` maps keys back to ids for every table a user reads (topk.parquet, search/topk.parquet, the report).

Rows whose text is null, empty or only whitespace, and rows whose bytes are not valid UTF-8, are skipped and counted
in `CorpusStats`; they never stop a pass.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_astra.errors import DastraError

READ_BATCH_ROWS = 1024
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")

FileFormat = Literal["parquet", "arrow_file", "arrow_stream"]


@dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus: its rows are global rows `row_offset .. row_offset + num_rows - 1`."""

    path: str
    format: FileFormat
    num_rows: int
    row_offset: int


@dataclass(frozen=True)
class CorpusShard:
    """Rows [row_start, row_stop) of one file: the unit of work of scoring and of the gradient store.

    `shard_id` is the shard's position in its plan; the plan (and so every id) is a pure function of the corpus
    files, their row counts and `rows_per_shard`.
    """

    shard_id: int
    path: str
    format: FileFormat
    row_start: int
    row_stop: int
    row_offset: int  # global row index of row_start

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass(frozen=True)
class ShardPlan:
    """The corpus cut into shards that never cross a file; `fingerprint` changes when the corpus or the cut does."""

    shards: tuple[CorpusShard, ...]
    rows_per_shard: int
    fingerprint: str

    def to_json(self) -> dict[str, object]:
        return {
            "rows_per_shard": self.rows_per_shard,
            "fingerprint": self.fingerprint,
            "shards": [asdict(shard) for shard in self.shards],
        }

    @classmethod
    def from_json(cls, data: dict) -> ShardPlan:
        shards = tuple(CorpusShard(**shard) for shard in data["shards"])
        return cls(shards, int(data["rows_per_shard"]), str(data["fingerprint"]))


@dataclass
class CorpusStats:
    """What one pass saw: rows read, documents yielded, and rows skipped (empty text, bytes that are not UTF-8)."""

    rows: int = 0
    documents: int = 0
    skipped_empty: int = 0
    skipped_non_utf8: int = 0

    @property
    def skipped(self) -> int:
        return self.skipped_empty + self.skipped_non_utf8


@dataclass(frozen=True)
class Document:
    doc_id: int | str  # as the corpus gives it (data.id_column), or the row when there is no id column
    row: int  # global row index in the corpus
    text: str

    @property
    def key(self) -> int:
        """The integer that stands for the document in tensors: its id when ids are integers, else its row."""
        return self.doc_id if isinstance(self.doc_id, int) else self.row


def is_id_type(arrow_type: pa.DataType) -> bool:
    """Ids (data.id_column, query_id, fact_doc_id) are integers or strings."""
    return pa.types.is_integer(arrow_type) or pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


# --------------------------------------------------------------------------------------------------------------------
# finding the files


def _arrow_format(path: Path) -> FileFormat:
    """Arrow IPC comes as the random-access file format or the stream format (what `datasets` writes)."""
    with pa.memory_map(str(path)) as source:
        try:
            pa.ipc.open_file(source)
            return "arrow_file"
        except pa.ArrowInvalid:
            pass
    with pa.memory_map(str(path)) as source:
        try:
            pa.ipc.open_stream(source)
            return "arrow_stream"
        except pa.ArrowInvalid as exc:
            raise DastraError(f"corpus file '{path}' is neither Parquet nor Arrow IPC ({exc})") from exc


def _file_format(path: Path) -> FileFormat:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in ARROW_SUFFIXES:
        return _arrow_format(path)
    raise DastraError(
        f"corpus file '{path}': unsupported suffix '{suffix}'; use Parquet (.parquet) or Arrow (.arrow) files"
    )


def _dataset_folder_files(folder: Path, split: str) -> list[Path]:
    """The Arrow files of a `Dataset.save_to_disk` folder (or of one split of a `DatasetDict` folder)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DastraError(f"data.split: '{split}' is not a split of the dataset at '{folder}'; it has {splits}")
        folder = folder / split
    state = json.loads((folder / "state.json").read_text())
    return [folder / entry["filename"] for entry in state.get("_data_files", [])]


def corpus_files(source: str | Path, split: str = "train") -> list[Path]:
    """The ordered files behind `data.corpus`: a file, a glob, a `save_to_disk` folder, or a folder of files."""
    text = str(source)
    path = Path(text)
    if any(ch in text for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        if not files:
            raise DastraError(f"data.corpus: the pattern '{text}' matches no file")
        return files
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _dataset_folder_files(path, split)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in PARQUET_SUFFIXES + ARROW_SUFFIXES)
        if not files:
            raise DastraError(f"data.corpus: the folder '{path}' holds no .parquet or .arrow file")
        return files
    if not path.is_file():
        raise DastraError(f"corpus file '{path}' not found; point data.corpus at a Parquet/Arrow file, glob or folder")
    return [path]


def _schema_and_rows(path: Path, fmt: FileFormat) -> tuple[pa.Schema, int]:
    try:
        if fmt == "parquet":
            parquet = pq.ParquetFile(path)
            return parquet.schema_arrow, parquet.metadata.num_rows
        with pa.memory_map(str(path)) as source:
            if fmt == "arrow_file":
                reader = pa.ipc.open_file(source)
                return reader.schema, sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            reader = pa.ipc.open_stream(source)
            return reader.schema, sum(batch.num_rows for batch in reader)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DastraError(f"corpus file '{path}' is not a readable {fmt.split('_')[0]} file ({exc})") from exc


def _check_columns(path: Path, schema: pa.Schema, text_column: str, id_column: str | None) -> None:
    names = schema.names
    for role, column in (("data.text_column", text_column), ("data.id_column", id_column)):
        if column is not None and column not in names:
            raise DastraError(f"corpus {path} has no column '{column}' ({role}); its columns are {names}")
    text_type = schema.field(text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_binary(text_type)
            or pa.types.is_large_binary(text_type)):
        raise DastraError(
            f"corpus {path}: column '{text_column}' (data.text_column) must hold text (string or binary), "
            f"not {text_type}"
        )
    if id_column is not None and not is_id_type(schema.field(id_column).type):
        raise DastraError(
            f"corpus {path}: column '{id_column}' (data.id_column) must hold integers or strings, "
            f"not {schema.field(id_column).type}; or set data.id_column: null to use row numbers"
        )


# --------------------------------------------------------------------------------------------------------------------
# reading


def _decode(values: list[bytes | None], stats: CorpusStats) -> list[str | None]:
    """Text of each row, or None for a row to skip (counted in `stats`)."""
    texts: list[str | None] = []
    for value in values:
        if value is None:
            stats.skipped_empty += 1
            texts.append(None)
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8 += 1
            texts.append(None)
            continue
        if not text.strip():
            stats.skipped_empty += 1
            texts.append(None)
            continue
        texts.append(text)
    return texts


def _as_bytes(column: pa.Array) -> pa.Array:
    """The text column as binary, without copying: decoding row by row then catches invalid UTF-8 per row."""
    if pa.types.is_string(column.type):
        return column.view(pa.binary())
    if pa.types.is_large_string(column.type):
        return column.view(pa.large_binary())
    return column


class Corpus:
    """An ordered list of Parquet/Arrow files with a text column and, optionally, an id column (integers or strings)."""

    def __init__(
        self, source: str, files: tuple[CorpusFile, ...], text_column: str, id_column: str | None, string_ids: bool
    ) -> None:
        self.source = source
        self.files = files
        self.text_column = text_column
        self.id_column = id_column
        self.string_ids = string_ids

    @property
    def keys_are_rows(self) -> bool:
        """Document keys (`Document.key`) are global rows: no id column, or a string one."""
        return self.id_column is None or self.string_ids

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.id_column, self.text_column) if c is not None]

    @property
    def fingerprint(self) -> str:
        """Changes when the corpus files do: their names, row counts and sizes, in order."""
        files = [(Path(f.path).name, f.num_rows, Path(f.path).stat().st_size) for f in self.files]
        return hashlib.sha256(repr(files).encode()).hexdigest()[:16]

    def shard_plan(self, rows_per_shard: int) -> ShardPlan:
        """Cut every file into consecutive shards of at most `rows_per_shard` rows (deterministic)."""
        if rows_per_shard <= 0:
            raise DastraError(f"data.shard_rows must be positive (got {rows_per_shard})")
        shards: list[CorpusShard] = []
        for f in self.files:
            for start in range(0, f.num_rows, rows_per_shard):
                stop = min(start + rows_per_shard, f.num_rows)
                shards.append(CorpusShard(len(shards), f.path, f.format, start, stop, f.row_offset + start))
        described = {
            "files": self.fingerprint,
            "columns": [self.text_column, self.id_column],
            "rows_per_shard": rows_per_shard,
        }
        fingerprint = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
        return ShardPlan(tuple(shards), rows_per_shard, fingerprint)

    def _whole_file(self, f: CorpusFile) -> CorpusShard:
        return CorpusShard(-1, f.path, f.format, 0, f.num_rows, f.row_offset)

    def _record_batches(self, shard: CorpusShard, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The rows of `shard`, `columns` only, in batches of at most `batch_rows` rows."""
        if shard.format == "parquet":
            parquet = pq.ParquetFile(shard.path)
            groups: list[int] = []
            first_row, position = 0, 0
            for group in range(parquet.num_row_groups):  # only the row groups that overlap the shard are read
                size = parquet.metadata.row_group(group).num_rows
                if position + size > shard.row_start and position < shard.row_stop:
                    first_row = first_row if groups else position
                    groups.append(group)
                position += size
            if groups:
                batches = parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns)
                yield from self._window(batches, first_row, shard)
            return
        with pa.memory_map(shard.path) as source:
            if shard.format == "arrow_file":
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(pa.ipc.open_stream(source))
            for batch in self._window(batches, 0, shard):
                batch = batch.select(columns)
                for start in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(start, batch_rows)

    @staticmethod
    def _window(batches: Iterable[pa.RecordBatch], position: int, shard: CorpusShard) -> Iterator[pa.RecordBatch]:
        """Cut a stream of batches starting at file row `position` down to the shard's rows."""
        for batch in batches:
            start, stop = position, position + batch.num_rows
            position = stop
            if stop <= shard.row_start:
                continue
            if start >= shard.row_stop:
                return
            lo, hi = max(shard.row_start - start, 0), min(shard.row_stop, stop) - start
            yield batch.slice(lo, hi - lo) if (lo, hi) != (0, batch.num_rows) else batch

    def iter_documents(
        self,
        shard: CorpusShard | None = None,
        stats: CorpusStats | None = None,
        batch_rows: int = READ_BATCH_ROWS,
    ) -> Iterator[Document]:
        """Every usable document of the shard (default: the whole corpus), in row order."""
        stats = stats if stats is not None else CorpusStats()
        shards = [shard] if shard is not None else [self._whole_file(f) for f in self.files]
        for part in shards:
            row = part.row_offset
            for batch in self._record_batches(part, self.columns, batch_rows):
                texts = _decode(_as_bytes(batch.column(self.text_column)).to_pylist(), stats)
                if self.id_column is None:
                    ids = list(range(row, row + batch.num_rows))
                else:
                    ids = batch.column(self.id_column).to_pylist()
                    if any(i is None for i in ids):
                        raise DastraError(
                            f"corpus {part.path}: column '{self.id_column}' (data.id_column) has a null doc id; "
                            "give every row an id, or set data.id_column: null to use row numbers"
                        )
                for offset, (doc_id, text) in enumerate(zip(ids, texts)):
                    if text is not None:
                        stats.documents += 1
                        yield Document(doc_id, row + offset, text)
                stats.rows += batch.num_rows
                row += batch.num_rows

    def documents_at(self, rows: Iterable[int]) -> dict[int, Document]:
        """The documents at these global rows (rows that are skipped as empty/non-UTF-8 are absent)."""
        wanted = sorted(set(int(r) for r in rows))
        found: dict[int, Document] = {}
        for f in self.files:
            inside = [r for r in wanted if f.row_offset <= r < f.row_offset + f.num_rows]
            # One read per run of nearby rows: a shard-sized window around each group of wanted rows.
            while inside:
                start = inside[0] - f.row_offset
                stop = min(start + READ_BATCH_ROWS, f.num_rows)
                window = CorpusShard(-1, f.path, f.format, start, stop, f.row_offset + start)
                chunk = {r for r in inside if r - f.row_offset < stop}
                for doc in self.iter_documents(window):
                    if doc.row in chunk:
                        found[doc.row] = doc
                inside = [r for r in inside if r not in chunk]
        return found

    def doc_ids(self, keys: Iterable[int]) -> dict[int, int | str]:
        """Document key -> doc_id as the corpus gives it (a positional read of the id column for string ids)."""
        return self.texts_and_ids(keys, texts=False)[1]

    def texts_and_ids(self, keys: Iterable[int], texts: bool = True) -> tuple[dict[int, str], dict[int, int | str]]:
        """(key -> text, key -> doc_id) of the given document keys, reading each document once."""
        wanted = sorted(set(int(k) for k in keys))
        if not self.keys_are_rows or self.id_column is None:
            return (self.texts(wanted) if texts else {}), {k: k for k in wanted}
        documents = self.documents_at(wanted)
        return {row: doc.text for row, doc in documents.items()}, {row: doc.doc_id for row, doc in documents.items()}

    def texts(self, keys: Iterable[int]) -> dict[int, str]:
        """Document key -> text: a positional read when keys are rows, else one streaming scan of the id column."""
        wanted = sorted(set(int(d) for d in keys))
        if not wanted:
            return {}
        if self.keys_are_rows:
            return {row: doc.text for row, doc in self.documents_at(wanted).items()}
        value_set = pa.array(wanted, pa.int64())
        found: dict[int, str] = {}
        for f in self.files:
            for batch in self._record_batches(self._whole_file(f), self.columns, READ_BATCH_ROWS * 8):
                hits = batch.filter(pc.is_in(batch.column(self.id_column).cast(pa.int64()), value_set=value_set))
                if hits.num_rows:
                    stats = CorpusStats()
                    texts = _decode(_as_bytes(hits.column(self.text_column)).to_pylist(), stats)
                    found.update((int(i), t) for i, t in zip(hits.column(self.id_column).to_pylist(), texts) if t)
        return found


def open_corpus(
    source: str | Path | Corpus,
    text_column: str = "text",
    id_column: str | None = "doc_id",
    split: str = "train",
) -> Corpus:
    """Find the files behind `source`, check that each has the columns, and count rows (no text is read)."""
    if isinstance(source, Corpus):
        return source
    files: list[CorpusFile] = []
    offset = 0
    id_kinds: set[str] = set()
    for path in corpus_files(source, split):
        fmt = _file_format(path)
        schema, num_rows = _schema_and_rows(path, fmt)
        _check_columns(path, schema, text_column, id_column)
        if id_column is not None:
            id_kinds.add("integer" if pa.types.is_integer(schema.field(id_column).type) else "string")
        files.append(CorpusFile(str(path), fmt, num_rows, offset))
        offset += num_rows
    if offset == 0:
        raise DastraError(f"corpus {source} is empty")
    if len(id_kinds) > 1:
        raise DastraError(
            f"corpus {source}: column '{id_column}' (data.id_column) holds integers in some files and strings in "
            "others; give every file the same id type"
        )
    return Corpus(str(source), tuple(files), text_column, id_column, id_kinds == {"string"})
