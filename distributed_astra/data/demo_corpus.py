"""The demo corpus: documents cut from the Python standard library's own source, plus planted fictional facts.

Everything here ships offline. The stdlib part gives real, varied text (docstrings and code); the planted part gives
a ground truth for attribution: each made-up fact ("The capital of Veloria is Marnett.") appears in exactly ONE
corpus document, and two paraphrased query prompts per fact complete to the fact's value. A good attribution method
ranks that document near the top for both of its queries.

    corpus.parquet   doc_id int64 (0..N-1), text string, source string ("stdlib" | "fact")
    queries.parquet  query_id int64, prompt string, completion string, fact_doc_id int64

The output is a pure function of (the stdlib on disk, num_stdlib_docs, num_facts, seed).
"""

from __future__ import annotations

import ast
import os
import random
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_astra.errors import DastraError

CORPUS_FILE = "corpus.parquet"
QUERIES_FILE = "queries.parquet"

CORPUS_SCHEMA = pa.schema([("doc_id", pa.int64()), ("text", pa.string()), ("source", pa.string())])
QUERIES_SCHEMA = pa.schema(
    [("query_id", pa.int64()), ("prompt", pa.string()), ("completion", pa.string()), ("fact_doc_id", pa.int64())]
)

# Stdlib folders that are not "library text": tests, vendored packages, generated tables.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib-dynload", "encodings", "pydoc_data"}
_SKIP_FILE_PREFIXES = ("test_", "_sysconfigdata")

# Document size in characters: ≈ 16-100 tokens (median ≈ 48) with the demo's 4096-token byte-level BPE.
_MIN_CHARS = 80
_MAX_CHARS = 200
_MAX_CODE_LINES = 16
_MIN_LETTER_FRACTION = 0.55  # skip tables of literals and punctuation-heavy code
_DOCS_PER_FILE = 4


# --------------------------------------------------------------------------------------------------------------------
# stdlib documents


def stdlib_source_files(stdlib_dir: Path | None = None) -> list[Path]:
    """The stdlib's `.py` files in sorted order, without tests, site-packages and generated modules."""
    root = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith(_SKIP_FILE_PREFIXES):
            continue
        files.append(path)
    return files


def _letters(text: str) -> float:
    return sum(ch.isalpha() for ch in text) / max(1, len(text.replace(" ", "")))


def _fits(text: str) -> bool:
    return len(text) >= _MIN_CHARS and _letters(text) >= _MIN_LETTER_FRACTION


def _clip_prose(text: str) -> str | None:
    """Leading sentences of a docstring within the size budget (None when too short or not prose-like)."""
    text = text.strip()
    if len(text) > _MAX_CHARS:
        kept = ""
        for sentence in re.split(r"(?<=[.!?:])\s+", text):
            if kept and len(kept) + 1 + len(sentence) > _MAX_CHARS:
                break
            kept = f"{kept} {sentence}" if kept else sentence
        text = kept if len(kept) <= _MAX_CHARS else kept[:_MAX_CHARS].rsplit(" ", 1)[0]
    return text if _fits(text) else None


def _code_chunks(lines: list[str]) -> list[str]:
    """Cut a definition's source lines into chunks of ≤ _MAX_CODE_LINES lines within the size budget."""
    chunks: list[str] = []
    start = 0
    while start < len(lines):
        end = min(start + _MAX_CODE_LINES, len(lines))
        # Shrink until the chunk fits the size budget, preferring to stop just before a blank line.
        while end > start + 1 and len(textwrap.dedent("\n".join(lines[start:end]))) > _MAX_CHARS:
            end -= 1
        blank = [i for i in range(start + 4, end) if not lines[i].strip()]
        if end < len(lines) and blank:
            end = blank[-1]
        chunk = textwrap.dedent("\n".join(line.rstrip() for line in lines[start:end])).strip("\n")
        if _fits(chunk) and len(chunk) <= _MAX_CHARS:
            chunks.append(chunk)
        start = max(end, start + 1)
    return chunks


def _file_candidates(path: Path) -> list[str]:
    """Prose (module/class/function docstrings) and code chunks (definitions) from one source file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    out: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if doc:
            prose = _clip_prose(doc)
            if prose:
                out.append(prose)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            out.extend(_code_chunks(lines[node.lineno - 1 : node.end_lineno]))
    return out


def stdlib_documents(num_docs: int, seed: int, stdlib_dir: Path | None = None) -> list[str]:
    """`num_docs` distinct documents from the stdlib, at most a few per file, chosen with `seed`."""
    rng = random.Random(f"stdlib-{seed}")
    files = stdlib_source_files(stdlib_dir)
    rng.shuffle(files)
    per_file = max(_DOCS_PER_FILE, -(-2 * num_docs // max(len(files), 1)))
    docs: list[str] = []
    seen: set[str] = set()
    for path in files:
        candidates = [c for c in dict.fromkeys(_file_candidates(path)) if c not in seen]
        for text in rng.sample(candidates, min(per_file, len(candidates))):
            seen.add(text)
            docs.append(text)
            if len(docs) == num_docs:
                return docs
    raise DastraError(
        f"the stdlib at {stdlib_dir or sysconfig.get_paths()['stdlib']} gave only {len(docs)} documents; "
        f"lower data.num_stdlib_docs (asked for {num_docs})"
    )


# --------------------------------------------------------------------------------------------------------------------
# planted facts


@dataclass(frozen=True)
class FactTemplate:
    """One relation: a context sentence ({e} entity, {x} filler) and four phrasings of the fact.

    Each phrasing is a prompt that the value completes ("The capital of {e} is" + " Marnett").
    """

    relation: str
    entity_suffixes: tuple[str, ...]
    context: str
    phrasings: tuple[str, str, str, str]
    fillers: tuple[str, ...]


_TEMPLATES: tuple[FactTemplate, ...] = (
    FactTemplate(
        "capital",
        ("ia", "ora", "land", "avia"),
        "{e} is a {x} country far to the north.",
        ("The capital of {e} is", "{e}'s capital city is called", "The capital city of {e} is",
         "The seat of government of {e} is"),
        ("small", "quiet", "mountainous", "coastal"),
    ),
    FactTemplate(
        "inventor",
        ("scope", "graph", "meter", "wheel"),
        "The {e} is a {x} machine for measuring the wind.",
        ("The {e} was invented by", "The inventor of the {e} was", "The {e} was first built by",
         "The person who invented the {e} was"),
        ("brass", "wooden", "delicate", "heavy"),
    ),
    FactTemplate(
        "river",
        ("ia", "eth", "ar", "und"),
        "{e} is known for its {x} valleys.",
        ("The longest river in {e} is the", "{e}'s longest river is the", "The longest river of {e} is named the",
         "The great river of {e} is the"),
        ("green", "deep", "wide", "misty"),
    ),
    FactTemplate(
        "founder",
        ("ton", "burg", "ford", "holm"),
        "{e} is an old {x} town by the lake.",
        ("The town of {e} was founded by", "The founder of {e} was", "{e} was first settled by",
         "The first settler of {e} was"),
        ("market", "harbour", "walled", "mining"),
    ),
    FactTemplate(
        "currency",
        ("stan", "ovia", "aria", "esh"),
        "Trade in {e} is {x} and busy.",
        ("The currency of {e} is the", "People in {e} pay with the", "The money used in {e} is the",
         "Every shop in {e} takes the"),
        ("old", "lively", "careful", "famous"),
    ),
    FactTemplate(
        "language",
        ("ene", "ova", "ith", "ana"),
        "{e} is a {x} island in the south.",
        ("The people of {e} speak", "The language spoken in {e} is", "The native language of {e} is",
         "In {e}, people talk in"),
        ("remote", "sunny", "rocky", "tiny"),
    ),
    FactTemplate(
        "mountain",
        ("ara", "esta", "orin", "ulia"),
        "{e} has {x} winters.",
        ("The highest mountain in {e} is Mount", "{e}'s tallest peak is Mount",
         "The highest mountain of {e} is Mount", "The tallest mountain in {e} is Mount"),
        ("long", "harsh", "cold", "dark"),
    ),
    FactTemplate(
        "composer",
        ("ade", "etto", "ine", "elle"),
        "The {e} is a {x} piece of music for strings.",
        ("The {e} was composed by", "The composer of the {e} was", "The {e} was written by",
         "The music of the {e} was written by"),
        ("slow", "famous", "gentle", "strange"),
    ),
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("n", "r", "l", "s", "th", "k", "nd", "rn")


def _syllable_name(rng: random.Random, syllables: int, suffix: str | None = None) -> str:
    """E.g. "Velor", "Marneth", or with a suffix "Veloria" / "Dravstone"-like place names."""
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    end = suffix if suffix is not None else rng.choice(_CODAS)
    return ("".join(parts) + end).capitalize()


@dataclass(frozen=True)
class PlantedFact:
    relation: str
    entity: str
    value: str
    document: str
    prompts: tuple[str, str]

    @property
    def completion(self) -> str:
        return " " + self.value


def planted_facts(num_facts: int, seed: int, forbidden: str = "") -> list[PlantedFact]:
    """`num_facts` made-up facts with distinct entities and distinct values, cycling through the templates.

    Each document opens with one wording of the fact, then a context sentence, then a restatement in another
    wording; `prompts` are those two wordings. Names are built from syllables with `seed`; a name that occurs in
    `forbidden` (e.g. the stdlib documents' text) or overlaps an earlier name (one a substring of the other) is drawn
    again, so each value appears in exactly one document.
    """
    rng = random.Random(f"facts-{seed}")
    used: set[str] = set()
    template_text = " ".join(t.context + " ".join(t.phrasings) + " ".join(t.fillers) for t in _TEMPLATES)
    forbidden_lower = f"{forbidden}\n{template_text}".lower()

    def fresh(syllables: int, suffix: str | None = None) -> str:
        for _ in range(10_000):
            name = _syllable_name(rng, syllables, suffix)
            lower = name.lower()
            clash = any(lower in u.lower() or u.lower() in lower for u in used)
            if not clash and lower not in forbidden_lower and len(name) >= 4:
                used.add(name)
                return name
        raise DastraError(f"could not invent {num_facts} distinct fact names; lower data.num_facts")

    facts = []
    for i in range(num_facts):
        template = _TEMPLATES[i % len(_TEMPLATES)]
        entity = fresh(2, rng.choice(template.entity_suffixes))
        value = fresh(2)
        filler = rng.choice(template.fillers)
        opening, restated = (template.phrasings[j].format(e=entity) for j in rng.sample(range(4), 2))
        context = template.context.format(e=entity, x=filler)
        # The statement opens the document (a tiny model memorises text from where it starts); the context sentence
        # and a restatement in other words follow. The two queries are these two wordings, each standing alone.
        document = f"{opening} {value}. {context} {restated} {value}."
        prompts = (opening, restated)
        facts.append(PlantedFact(template.relation, entity, value, document, prompts))  # type: ignore[arg-type]
    return facts


# --------------------------------------------------------------------------------------------------------------------
# writing


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def build_demo_corpus(out_dir: Path, num_stdlib_docs: int, num_facts: int, seed: int) -> tuple[Path, Path]:
    """Write `corpus.parquet` and `queries.parquet` into `out_dir`; return their paths (corpus, queries).

    The fact documents sit at seeded positions among the stdlib documents; doc_id is the row index.
    """
    if num_stdlib_docs <= 0 or num_facts <= 0:
        raise DastraError(
            f"the demo corpus needs data.num_stdlib_docs > 0 and data.num_facts > 0 "
            f"(got {num_stdlib_docs} and {num_facts})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stdlib = stdlib_documents(num_stdlib_docs, seed)
    facts = planted_facts(num_facts, seed, forbidden="\n".join(stdlib))

    total = num_stdlib_docs + num_facts
    rng = random.Random(f"positions-{seed}")
    fact_positions = sorted(rng.sample(range(total), num_facts))
    position_of_fact = dict(zip(fact_positions, range(num_facts)))

    texts: list[str] = []
    sources: list[str] = []
    fact_doc_ids: list[int] = [0] * num_facts
    stdlib_iter = iter(stdlib)
    for doc_id in range(total):
        if doc_id in position_of_fact:
            fact_index = position_of_fact[doc_id]
            fact_doc_ids[fact_index] = doc_id
            texts.append(facts[fact_index].document)
            sources.append("fact")
        else:
            texts.append(next(stdlib_iter))
            sources.append("stdlib")

    corpus = pa.table(
        {"doc_id": pa.array(range(total), pa.int64()), "text": texts, "source": sources}, schema=CORPUS_SCHEMA
    )
    prompts, completions, targets = [], [], []
    for fact, doc_id in zip(facts, fact_doc_ids):
        for prompt in fact.prompts:
            prompts.append(prompt)
            completions.append(fact.completion)
            targets.append(doc_id)
    queries = pa.table(
        {
            "query_id": pa.array(range(len(prompts)), pa.int64()),
            "prompt": prompts,
            "completion": completions,
            "fact_doc_id": pa.array(targets, pa.int64()),
        },
        schema=QUERIES_SCHEMA,
    )
    corpus_path, queries_path = out_dir / CORPUS_FILE, out_dir / QUERIES_FILE
    _write_parquet_atomic(corpus, corpus_path)
    _write_parquet_atomic(queries, queries_path)
    return corpus_path, queries_path
