"""Shared fixtures: a tiny random GPT-2 (eager attention, Conv1D modules), random LM batches in the format of
`models/lm.py`, a tiny classifier wrapped as a "language model" so that the LM code paths (shifted labels,
sampled labels, attention mask) run unchanged on a model whose Fisher can be built densely, and run workspaces
(a corpus, queries and a saved tiny model) for the CLI and distributed tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

from distributed_astra.curvature import fit_ekfac
from distributed_astra.data.tokenizer import train_bpe_tokenizer
from distributed_astra.ihvp.ekfac import default_damping
from distributed_astra.models import tiny
from distributed_astra.models.lm import IGNORE_INDEX
from distributed_astra.models.load import prepare_for_attribution
from distributed_astra.models.modules import select_tracked_modules

VOCAB = 64

# Opt-in torch thread count, to check that tolerances hold under another BLAS blocking: DASTRA_TEST_THREADS=N sets it
# at import, and `one_thread` (and the modules that pin one thread themselves) use N instead of 1.
TEST_THREADS = int(os.environ["DASTRA_TEST_THREADS"]) if os.environ.get("DASTRA_TEST_THREADS") else None
if TEST_THREADS:
    torch.set_num_threads(TEST_THREADS)


def build_tiny_gpt2(
    n_embd: int = 16,
    n_layer: int = 2,
    n_head: int = 2,
    vocab_size: int = VOCAB,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 in eval mode (NOT yet prepared for attribution).

    Layer-norm parameters and biases are randomised too, so that no factor has an accidental structure
    (GPT-2's default init sets biases to 0 and LN gains to 1).
    """
    model = tiny.build_tiny_gpt2(vocab_size, n_layer, n_head, n_embd, max_length=64, seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("weight") and p.dim() == 2:
                p.mul_(5.0)  # std 0.1 instead of 0.02: less uniform predictions, larger gradients
    return model.to(dtype).eval()


def build_batches(
    num_batches: int = 3,
    batch_size: int = 4,
    seq_len: int = 12,
    vocab_size: int = VOCAB,
    seed: int = 0,
    prompt_len: int = 0,
    empty_row: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Random right-padded batches: input_ids, attention_mask, labels (-100 at padding), doc_id.

    prompt_len > 0 masks the labels of the first tokens of odd rows (a prompt carrying no loss);
    empty_row makes the last row of each batch pure padding (no token, no loss).
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(num_batches):
        ids = torch.randint(2, vocab_size, (batch_size, seq_len), generator=g)
        lengths = torch.randint(2, seq_len + 1, (batch_size,), generator=g)
        lengths[0] = seq_len
        if empty_row:
            lengths[-1] = 0
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
        if prompt_len:
            labels[1::2, :prompt_len] = IGNORE_INDEX
        doc_id = torch.arange(i * batch_size, (i + 1) * batch_size)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "doc_id": doc_id})
    return batches


class TinyClassifier(nn.Module):
    """x -> head(tanh(hidden(x))) over a fixed table of inputs, shaped like a causal LM.

    input_ids [B, 2]: position 0 holds the example index (its logits predict the label at position 1); position 1
    is padding (attention_mask [1, 0]), so every example is a one-token sequence and A, S, Λ see exactly one
    (ā, Ds) per example. Only `head` is meant to be tracked: its Fisher block is (1/N) Σ ā āᵀ ⊗ (diag p − p pᵀ).
    """

    def __init__(self, inputs: torch.Tensor, hidden: int, num_classes: int, seed: int = 0, scale: float = 2.0):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("inputs", inputs)
        self.hidden = nn.Linear(inputs.shape[1], hidden)
        self.head = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            self.hidden.weight.mul_(scale)
            self.head.weight.mul_(scale * 2)
            self.head.bias.normal_()
        self.to(inputs.dtype).eval().requires_grad_(False)

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """ā = [tanh(hidden(x)); 1] of examples idx: [n, hidden+1]."""
        a = torch.tanh(self.hidden(self.inputs[idx]))
        return torch.cat([a, torch.ones_like(a[:, :1])], dim=1)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.inputs[input_ids].requires_grad_(True)  # gradients flow through activations only
        return SimpleNamespace(logits=self.head(torch.tanh(self.hidden(x))))


def classifier_batches(num_examples: int, repeats: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Every example index `repeats` times, in batches of one-token sequences (see TinyClassifier)."""
    idx = torch.arange(num_examples).repeat(repeats)
    batches = []
    for start in range(0, idx.numel(), batch_size):
        chunk = idx[start : start + batch_size]
        n = chunk.numel()
        ids = torch.stack([chunk, chunk], dim=1)
        mask = torch.tensor([[1, 0]]).repeat(n, 1)
        labels = torch.stack([torch.full((n,), IGNORE_INDEX), torch.zeros(n, dtype=torch.long)], dim=1)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@pytest.fixture(scope="session")
def tiny_gpt2_factory():
    return build_tiny_gpt2


@pytest.fixture(scope="session")
def batch_factory():
    return build_batches


@pytest.fixture
def tiny_gpt2():
    """float64 tiny GPT-2, prepared for attribution (frozen parameters, input embeddings require grad)."""
    return prepare_for_attribution(build_tiny_gpt2())


@pytest.fixture
def tiny_batches():
    return build_batches(num_batches=3, batch_size=4, seq_len=12, prompt_len=3, empty_row=True)


@pytest.fixture
def tiny_classifier():
    """(model, num_examples): 24 examples in R^3, 6 hidden units, 4 classes, float64."""
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(24, 3, generator=g, dtype=torch.float64)
    return TinyClassifier(inputs, hidden=6, num_classes=4), 24


@pytest.fixture(scope="session")
def classifier_batch_factory():
    return classifier_batches


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is 10-50x faster than two on this shared machine (`pytestmark = usefixtures`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS or 1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- scale-aware checks
def assert_close_rel(actual, expected, rtol: float, what: str = "") -> None:
    """Every element within rtol · max|expected| of `expected` (same shape; dtypes may differ); `what` heads the error.

    The round-off of a sum or a dot product scales with the magnitude of its terms, which max|expected| stands for,
    not with the element itself: an element near zero by cancellation carries the same absolute error as the
    largest one, so an element-wise relative tolerance (or a fixed atol) holds on one CPU/BLAS and not another.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=0.0, atol=rtol * scale, check_dtype=False,
        msg=lambda m: f"{what}: {m} (atol = {rtol:g} x max|expected| = {rtol * scale:.3g})",
    )


def assert_same_eigendecomposition(eigval, q, eigval_ref, q_ref, rtol: float) -> None:
    """(ascending eigenvalues, eigenvector columns) of a symmetric matrix against those of a reference that differs
    by E with ‖E‖₂ ≤ rtol · max|λ_ref|, checked only through what such an E determines (never a single
    eigenvector of a (near-)degenerate eigenvalue, whose direction within its eigenspace is round-off):

    - eigenvalues (Weyl): |λ_i − λ_ref,i| ≤ rtol · max|λ_ref|;
    - the matrices Q diag(λ) Qᵀ, invariant to any rotation within an eigenspace: ‖·‖₂ difference ≤ rtol · max|λ_ref|;
    - each eigenvector up to sign (Davis-Kahan): sin∠(q_i, q_ref,i) ≤ rtol · max|λ_ref| / (gap_i − rtol · max|λ_ref|),
      gap_i = min_{j≠i} |λ_ref,i − λ_ref,j|; a column whose gap is within the perturbation is not determined on its
      own (no bound), only through the reconstruction.
    """
    eigval, q, eigval_ref, q_ref = (t.double() for t in (eigval, q, eigval_ref, q_ref))
    bound = rtol * float(eigval_ref.abs().max())
    assert_close_rel(eigval, eigval_ref, rtol, "eigenvalues (Weyl bound)")
    dense = (q * eigval) @ q.T
    dense_ref = (q_ref * eigval_ref) @ q_ref.T
    diff = float(torch.linalg.matrix_norm(dense - dense_ref, ord=2))
    assert diff <= bound, f"‖Q diag(λ) Qᵀ − reference‖₂ = {diff:.3g} > {bound:.3g}"
    gaps = (eigval_ref[:, None] - eigval_ref[None, :]).abs()
    gaps.fill_diagonal_(float("inf"))
    separation = (gaps.min(dim=1).values - bound).clamp_min(0.0)
    cos = (q * q_ref).sum(dim=0)
    sin = (q - cos * q_ref).norm(dim=0)  # ‖q_i − (q_i·r_i) r_i‖, accurate where 1 − cos² is not
    allowed = torch.where(separation > 0, bound / separation, torch.full_like(separation, float("inf")))
    worst = int((sin - allowed).argmax())
    assert bool((sin <= allowed).all()), (
        f"eigenvector {worst}: sin angle {float(sin[worst]):.3g} > Davis-Kahan bound {float(allowed[worst]):.3g}"
    )


# ------------------------------------------------------------------------------------------- run workspaces
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river city stone".split()
QUERIES = [
    {"query_id": 0, "prompt": "alpha beta", "completion": " gamma delta", "fact_doc_id": 1003},
    {"query_id": 1, "prompt": "river city", "completion": " stone", "fact_doc_id": None},
    {"query_id": 2, "prompt": "omega", "completion": " sigma kappa lambda", "fact_doc_id": 1010},
]


def corpus_rows(
    n: int, words: list[str] = WORDS, first_id: int = 1000, min_words: int = 6, max_words: int = 40
) -> list[dict]:
    """n documents of seeded random words: {"doc_id": first_id + i, "text": ...}."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        picks = torch.randint(len(words), (int(torch.randint(min_words, max_words, (1,), generator=g)),), generator=g)
        rows.append({"doc_id": first_id + i, "text": " ".join(words[j] for j in picks)})
    return rows


def write_workspace(
    root: Path, rows: list[dict], queries: list[dict], n_layer: int = 2, row_group_size: int | None = None
) -> Path:
    """What a run reads: corpus.parquet, queries.parquet, and model/ (a BPE tokenizer and a random tiny GPT-2)."""
    pq.write_table(pa.Table.from_pylist(rows), root / "corpus.parquet", row_group_size=row_group_size)
    pq.write_table(pa.Table.from_pylist(queries), root / "queries.parquet")
    tokenizer = train_bpe_tokenizer([r["text"] for r in rows], 300, root / "model")
    tiny.build_tiny_gpt2(len(tokenizer), n_layer, 2, 16, 32, seed=0).save_pretrained(root / "model")
    return root



def workspace_overrides(workspace: Path) -> list[str]:
    """The config overrides that point a run at what `write_workspace` wrote."""
    return [
        "model.source=path",
        f"model.path={workspace / 'model'}",
        f"data.corpus={workspace / 'corpus.parquet'}",
        f"data.queries={workspace / 'queries.parquet'}",
    ]

def assert_one_line_error(result, *fragments: str) -> None:
    """A CLI result that failed on bad input: exit code 2, one line starting "error:", holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


GPT2_TRACKED = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.mlp.*"]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_factory, batch_factory):
    """A prepared tiny GPT-2 (seed 3), its GPT2_TRACKED modules, three prompt-masked batches with an empty row,
    their EK-FAC factors and the default damping: the solvers' GPT-2 case (test_solvers, test_heldout)."""
    model = prepare_for_attribution(tiny_gpt2_factory(seed=3))
    tracked = select_tracked_modules(model, GPT2_TRACKED)
    batches = batch_factory(num_batches=3, batch_size=4, seq_len=12, seed=7, prompt_len=3, empty_row=True)
    factors = fit_ekfac(model, tracked, lambda: batches, torch.float64, seed=1)
    return model, tracked, batches, factors, default_damping(factors)
