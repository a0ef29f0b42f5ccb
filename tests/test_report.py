"""`dastra report` on a tiny run directory built by the real pipeline (EK-FAC and ASTRA solves): the HTML's structure
(parsed with html.parser), its embedded PNGs, HTML escaping, per-token terms and bad input. The headless-Chromium
screenshot check is `benchmarks/bench_report_browser.py` (Chromium is not on a fresh machine).
"""

from __future__ import annotations

import base64
import io
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import AutoTokenizer
from typer.testing import CliRunner

from distributed_astra.cli import app
from distributed_astra.report.segments import best_window, token_segments
from tests.conftest import corpus_rows, workspace_overrides, write_workspace

# Words with HTML-special characters: the report must show them as text, never as markup.
WORDS = "alpha beta gamma delta <i>kappa</i> sigma&omega river \"city\" stone 'theta' café 日本".split()
NUM_SHOWN, TOP_K = 2, 4


def _overrides(workspace: Path, *extra: str) -> list[str]:
    settings = [
        *workspace_overrides(workspace),
        "model.dtype=float64",
        "data.max_length=32",
        "factors.batch_size=16",
        "scoring.batch_size=16",
        f"scoring.top_k={TOP_K}",
        f"report.num_queries={NUM_SHOWN}",
        "report.max_tokens=200",
        "tracking.wandb_mode=disabled",
        *extra,
    ]
    return [a for s in settings for a in ("--set", s)]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """`dastra run` with dense scores: fit, query, ASTRA solve and score, its EK-FAC baseline, and the report (so the
    report shows both solvers); then `dastra report` again on the finished run."""
    root = tmp_path_factory.mktemp("report")
    rows = corpus_rows(40, WORDS, first_id=500)
    queries = [
        {"query_id": 3, "prompt": "alpha <b>beta</b>", "completion": " gamma & delta", "fact_doc_id": 503},
        {"query_id": 1, "prompt": "river", "completion": " \"city\" stone", "fact_doc_id": None},
        {"query_id": 2, "prompt": "café", "completion": " 日本", "fact_doc_id": None},
    ]
    write_workspace(root, rows, queries, n_layer=1)
    run = root / "run"
    astra = ("solver.name=astra", "solver.baselines=[ekfac]", "solver.iterations=5", "solver.minibatch_size=4")
    result = invoke("run", "--run-dir", str(run), *_overrides(root, "scoring.dense=true", *astra))
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file()  # `dastra run` (so `make demo`) ends with the report
    result = invoke("report", "--run-dir", str(run), *_overrides(root))
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output
    return run


class ReportParser(HTMLParser):
    """Collects query sections, their document rows, token spans, images and every start tag."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []  # start tags inside the query sections
        self.sections: list[dict] = []
        self.images: list[dict[str, str]] = []
        self.text: list[str] = []
        self._row: dict | None = None
        self._span: dict | None = None
        self._in_section = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if self.sections or (tag == "section" and "query" in classes):
            self.tags.append(tag)
        if tag == "section" and "query" in classes:
            self.sections.append({"query_id": int(attrs["data-query-id"]), "rows": [], "text": []})
        elif tag == "tr" and "doc" in classes:
            self._row = {**attrs, "spans": []}
            self.sections[-1]["rows"].append(self._row)
        elif tag == "span" and "tok" in classes and self._row is not None:
            self._span = {"classes": classes, "style": attrs.get("style", ""), "title": attrs.get("title", ""), "text": ""}
            self._row["spans"].append(self._span)
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._span is not None:
            self._span["text"] += data
        if self.sections:
            self.sections[-1]["text"].append(data)


def _parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_report_has_a_section_per_shown_query_with_k_rows_matching_topk(run_dir: Path):
    parser = _parse(run_dir / "report.html")
    topk = pq.read_table(run_dir / "topk.parquet").to_pylist()
    shown = list(dict.fromkeys(r["query_id"] for r in topk))[:NUM_SHOWN]
    assert [s["query_id"] for s in parser.sections] == shown
    for section in parser.sections:
        expected = [r for r in topk if r["query_id"] == section["query_id"]]
        assert len(section["rows"]) == TOP_K == len(expected)
        assert [int(r["data-rank"]) for r in section["rows"]] == list(range(1, TOP_K + 1))
        assert [int(r["data-doc-id"]) for r in section["rows"]] == [r["doc_id"] for r in expected]
        assert [float(r["data-score"]) for r in section["rows"]] == pytest.approx([r["score"] for r in expected])
    # Query 3's prompt and completion are shown as text, HTML characters included.
    first = "".join(parser.sections[0]["text"])
    assert "alpha <b>beta</b>" in first and " gamma & delta" in first
    assert not list(run_dir.glob(".report.html.tmp-*"))


def test_report_embeds_valid_pngs_of_every_plot(run_dir: Path):
    parser = _parse(run_dir / "report.html")
    sources = [img["src"] for img in parser.images]
    assert len(sources) == 3  # convergence (astra), score distribution, eigen-spectra
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        image.load()
        assert image.format == "PNG" and min(image.size) > 150
        pixels = np.asarray(image.convert("L"))
        assert (pixels < 200).mean() > 0.01  # something is drawn
    alts = [img["alt"] for img in parser.images]
    assert alts == ["Solver convergence", "Score distribution", "EK-FAC eigen-spectra"]
    page = "".join(parser.text)
    assert "solve: astra" in page and "solve: ekfac" in page
    assert "A positive score means the document helped" in page and "lowered the query's loss" in page


def test_document_text_is_escaped_and_tokens_are_shaded_by_their_terms(run_dir: Path):
    parser = _parse(run_dir / "report.html")
    # No markup from the corpus or the queries made it into the page as tags.
    assert {"section", "tr", "span"} <= set(parser.tags) and not {"i", "b"} & set(parser.tags)
    corpus = {r["doc_id"]: r["text"] for r in corpus_rows(40, WORDS, first_id=500)}
    tokens = pq.read_table(run_dir / "token_scores.parquet").to_pylist()
    terms = {(t["query_id"], t["doc_id"]): t for t in tokens}
    for section in parser.sections:
        for row in section["rows"]:
            entry = terms[(section["query_id"], int(row["data-doc-id"]))]
            # max_tokens=200 shows whole documents: the shaded pieces concatenate to the text, then eos.
            pieces = [s["text"] for s in row["spans"] if "special" not in s["classes"]]
            assert "".join(pieces) == corpus[int(row["data-doc-id"])]
            assert [s["text"] for s in row["spans"] if "special" in s["classes"]] == ["<|endoftext|>"]
            # Colour follows the sign of each piece's term, opacity its magnitude; the largest is the darkest.
            values = np.array([float(s["title"].split()[1]) for s in row["spans"]])
            alphas = np.array([float(s["style"].split(":")[1]) for s in row["spans"]])
            assert all(("pos" in s["classes"]) == (v >= 0) for s, v in zip(row["spans"], values))
            assert alphas[np.abs(values).argmax()] == alphas.max() == 0.75
            assert abs(values.sum() - entry["score"]) <= 1e-3 * np.abs(values).sum()


def test_token_scores_sum_to_the_topk_scores(run_dir: Path):
    tokens = pq.read_table(run_dir / "token_scores.parquet").to_pylist()
    topk = {(r["query_id"], r["doc_id"]): r["score"] for r in pq.read_table(run_dir / "topk.parquet").to_pylist()}
    assert len(tokens) == NUM_SHOWN * TOP_K
    for row in tokens:
        assert len(row["token_ids"]) == len(row["token_scores"]) > 1
        assert sum(row["token_scores"]) == pytest.approx(topk[(row["query_id"], row["doc_id"])], rel=1e-6)


def test_max_tokens_caps_the_text_to_the_most_influential_window(run_dir: Path, tmp_path: Path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "scores")  # without dense scores the histogram falls back to the top-k
    workspace = run_dir.parent
    result = invoke("report", "--run-dir", str(copy), *_overrides(workspace, "report.max_tokens=5", "report.num_queries=1"))
    assert result.exit_code == 0, result.output
    parser = _parse(copy / "report.html")
    assert len(parser.sections) == 1 and len(parser.sections[0]["rows"]) == TOP_K
    assert all(len(row["spans"]) <= 5 for row in parser.sections[0]["rows"])
    assert "scoring.dense: true records every document" in "".join(parser.text)


def test_topk_from_other_directions_is_refused_and_the_old_report_kept(run_dir: Path, tmp_path: Path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = (copy / "report.html").read_bytes()
    topk = pq.read_table(copy / "topk.parquet")
    scores = topk.column("score").to_numpy().copy()
    scores[1] *= 1.5
    pq.write_table(topk.set_column(topk.column_names.index("score"), "score", pa.array(scores)), copy / "topk.parquet")
    result = invoke("report", "--run-dir", str(copy), *_overrides(run_dir.parent))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "topk.parquet: document" in lines[0] and "dastra score --solver astra" in lines[0]
    assert (copy / "report.html").read_bytes() == before


def test_report_before_score_says_which_stage_to_run(run_dir: Path, tmp_path: Path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "topk.parquet").unlink()
    result = invoke("report", "--run-dir", str(copy), *_overrides(run_dir.parent))
    assert result.exit_code == 2 and "run `dastra score` first" in result.output


def test_segments_concatenate_to_the_text_and_merge_split_characters(run_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(run_dir.parent / "model")
    text = "café 日本 <i>kappa</i> & ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    terms = np.arange(1.0, len(ids) + 1)
    segments = token_segments(tokenizer, text, ids, terms)
    assert "".join(s.text for s in segments if not s.special) == text
    assert [s.special for s in segments].count(True) == 1 and segments[-1].special
    assert sum(s.term for s in segments) == pytest.approx(terms.sum())
    assert len(segments) < len(ids)  # multi-byte characters split over tokens became one piece each
    assert any(s.text.endswith("✓") for s in segments)


def test_best_window_is_the_brute_force_maximum():
    rng = np.random.default_rng(0)
    for n, width in ((30, 7), (5, 9), (12, 12), (40, 1)):
        values = rng.random(n)
        start, stop = best_window(values, width)
        candidates = [values[i : i + width].sum() for i in range(max(1, n - width + 1))]
        assert stop - start == min(n, width)
        assert values[start:stop].sum() == pytest.approx(max(candidates))


class SectionParser(HTMLParser):
    """Top-level section ids in page order, the table of contents' links, and the text and rows of each section."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.toc: list[str] = []
        self.text: dict[str, list[str]] = {}
        self.method_rows: list[dict] = []
        self.verdicts: list[str] = []
        self._in_toc = False
        self._row: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "nav" and "toc" in classes:
            self._in_toc = True
        elif tag == "a" and self._in_toc:
            self.toc.append(attrs["href"])
        elif tag == "section":
            self.sections.append(attrs.get("id", ""))
        elif tag == "tr" and "method" in classes:
            self._row = {"method": attrs["data-method"], "primary": "primary" in classes, "cells": []}
            self.method_rows.append(self._row)
        elif tag == "p" and "verdict" in classes:
            self.verdicts.append(attrs["data-method"])

    def handle_endtag(self, tag):
        if tag == "nav":
            self._in_toc = False
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self.sections:
            self.text.setdefault(self.sections[-1], []).append(data)
        if self._row is not None and data.strip():
            self._row["cells"].append(data.strip())


def test_report_has_a_table_of_contents_methods_side_by_side_convergence_and_settings(run_dir: Path):
    import json

    parser = SectionParser()
    parser.feed((run_dir / "report.html").read_text(encoding="utf-8"))
    top = [s for s in parser.sections if not s.startswith("query-")]
    assert top == ["summary", "fact-tracing", "convergence", "settings", "sign-convention", "plots", "queries"]
    # Every section is linked from the contents, and so is every shown query.
    shown = [s["query_id"] for s in _parse(run_dir / "report.html").sections]
    assert parser.toc == [f"#{s}" for s in top] + [f"#query-{q}" for q in shown]
    # Fact tracing of ASTRA and its EK-FAC baseline side by side, with summary.json's figures.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(r["method"], r["primary"]) for r in parser.method_rows] == [("astra", True), ("ekfac", False)]
    for row, facts in zip(parser.method_rows, (summary["fact_tracing"], summary["baselines"]["ekfac"]["fact_tracing"])):
        assert row["cells"][1:4] == [f"{facts['recall@1']:.3f}", f"{facts['recall@10']:.3f}", f"{facts['mrr']:.3f}"]
    # The held-out convergence verdict of the iterative solve, with its cost, and the figure.
    assert parser.verdicts == ["astra"]
    convergence = "".join(parser.text["convergence"])
    assert "held-out h" in convergence and "held-out batch of 4 sequences every 10 iterations" in convergence
    assert ("more iterations" in convergence) or ("did NOT decrease" in convergence)
    assert summary["heldout_objective_first_mean"] is not None and isinstance(summary["heldout_decreased"], bool)
    # The settings that decide the result.
    settings = "".join(parser.text["settings"])
    for fragment in ("5 iterations", "minibatch 4 sequences", "λ = ", "tracked modules", "transformer.h.0.mlp.c_fc"):
        assert fragment in settings, fragment


def test_convergence_verdicts_say_whether_more_iterations_would_help():
    from distributed_astra.report.build import convergence_verdict

    base = {"heldout_objective_first_mean": 10.0, "heldout_objective_last_mean": 4.0, "heldout_decreased": True,
            "heldout_decreased_fraction": 0.9}
    assert "still falling" in convergence_verdict({**base, "heldout_last_interval_change_median": -0.2})
    assert "levelled off" in convergence_verdict({**base, "heldout_last_interval_change_median": -0.001})
    worse = {**base, "heldout_objective_last_mean": 12.0, "heldout_decreased": False,
             "heldout_last_interval_change_median": 0.1}
    assert "did NOT decrease" in convergence_verdict(worse)
    assert "no held-out evaluation" in convergence_verdict({})
