"""The solvers' live [Q, D] vectors, counted from the storages the solve really allocates (issue 16, scope 4).

`DirectionStorage` (a TorchDispatchMode) sees every tensor an operation creates during `solve`, keeps those whose
storage holds direction blocks of a tracked module (q·out·(in+1) elements, the last dimension out or in+1: the
[q, out, in+1] blocks, their folded copies inside matmul, their float64 images in the EK-FAC rotations) and frees
them when their storage dies. At every allocation it notes, per module, how many query rows of that module are
alive, in bytes of v's dtype. A whole [Q, D] vector needs every module's block: the vectors alive at an instant
are the smallest of those row counts over the modules, one module's transients (its rotations, its rows of v)
do not make one. Per query is the growth of the peak from Q = 2 to Q = 6 queries: what does not grow with Q (the
weights in the [out, in+1] layout, Λ's transforms, the one-row power iteration of lr_mode auto) cancels. v itself
was allocated before the solve and is not counted.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distributed_astra.config import SolverConfig
from distributed_astra.curvature import fit_ekfac
from distributed_astra.ihvp.ekfac import default_damping
from distributed_astra.ihvp.products import FisherProduct, GGNProduct, vec_to
from distributed_astra.ihvp.solvers import (
    LIVE_VECTORS_PER_QUERY,
    MinibatchSampler,
    ekfac_preconditioner,
    solve,
)
from distributed_astra.models.modules import select_tracked_modules
from tests.test_products import flatten, random_vectors, rel

pytestmark = pytest.mark.usefixtures("one_thread")


class DirectionStorage(TorchDispatchMode):
    """Per shape of the tracked modules' blocks, the live bytes of direction-block storages created under this
    mode; `peak_vectors` is the largest number of whole vectors (every module's block, counted in `itemsize`-byte
    query rows) alive at once, `peak_rows` the same count weighted by block size, whole vectors or not."""

    def __init__(self, tracked, exclude: list[torch.Tensor], itemsize: int) -> None:
        super().__init__()
        self.blocks: dict[tuple[int, int], int] = {}  # (out, in+1) -> modules of that shape
        for t in tracked.values():
            self.blocks[tuple(t.shape)] = self.blocks.get(tuple(t.shape), 0) + 1
        self.itemsize = itemsize
        self.live = dict.fromkeys(self.blocks, 0)
        self.peak_vectors = 0.0
        self.peak_rows = 0.0
        self._alive: set[int] = {t.untyped_storage()._cdata for t in exclude}

    def _shape(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """The block shape whose rows `tensor` holds: [q, out, in+1] (or transposed), or a folded [q·a, b]."""
        matches = []
        for out, inp in self.blocks:
            for a, b in ((out, inp), (inp, out)):
                if tensor.dim() >= 3 and tuple(tensor.shape[-2:]) == (a, b):
                    matches.append((out, inp))
                elif tensor.dim() == 2 and tensor.shape[1] == b and tensor.shape[0] % a == 0:
                    matches.append((out, inp))
        assert len(set(matches)) <= 1, f"ambiguous direction block {tuple(tensor.shape)}: {matches}"
        return matches[0] if matches else None

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._alive:
            return
        shape = self._shape(tensor)
        if shape is None:
            return
        self._alive.add(key)
        size = storage.nbytes()
        self.live[shape] += size
        weakref.finalize(storage, self._free, key, shape, size)
        block = {s: count * s[0] * s[1] * self.itemsize for s, count in self.blocks.items()}  # one row, all modules
        rows = {s: self.live[s] / block[s] for s in self.blocks}
        self.peak_vectors = max(self.peak_vectors, min(rows.values()))
        self.peak_rows = max(self.peak_rows, sum(self.live.values()) / sum(block.values()))

    def _free(self, key: int, shape: tuple[int, int], size: int) -> None:
        self._alive.discard(key)
        self.live[shape] -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out


@pytest.fixture(scope="module")
def mlps(gpt2):
    """The solvers' GPT-2 with both MLP blocks tracked (block shapes [64, 17] and [16, 65], which no other tensor of
    the solve has), their EK-FAC factors and λ."""
    model, _, batches, _, _ = gpt2
    tracked = select_tracked_modules(model, ["transformer.h.*.mlp.*"])
    factors = fit_ekfac(model, tracked, lambda: batches, torch.float64, seed=1)
    return model, tracked, batches, factors, default_damping(factors)


def _solve(problem, cfg: SolverConfig, num_queries: int, kind: str, vector_dtype=None, count: bool = True):
    model, tracked, batches, factors, lam = problem
    v = random_vectors(tracked, num_queries, seed=11)
    if vector_dtype is not None:
        v = vec_to(v, dtype=vector_dtype)  # the caller's query gradients already in the storage dtype
    product = GGNProduct(model, tracked) if kind == "ggn" else FisherProduct(model, tracked, 1, torch.Generator().manual_seed(2))
    sampler = MinibatchSampler(batches, cfg.minibatch_size, torch.Generator().manual_seed(cfg.seed))
    heldout = sampler.draw(3, torch.Generator().manual_seed(cfg.seed + 1))
    preconditioner = ekfac_preconditioner(factors, cfg, lam) if cfg.name == "astra" else None
    mode = DirectionStorage(tracked, list(v.values()), next(iter(v.values())).element_size())
    with mode if count else torch.no_grad():
        result = solve(v, preconditioner, product, sampler, cfg, lam, heldout=heldout, vector_dtype=vector_dtype)
    return result, mode


def _per_query(problem, cfg, kind, vector_dtype=None) -> tuple[float, float]:
    """(whole vectors, block-weighted rows) per query besides v: the growth of the peaks from 2 to 6 queries."""
    small, large = (_solve(problem, cfg, q, kind, vector_dtype)[1] for q in (2, 6))
    return (large.peak_vectors - small.peak_vectors) / 4, (large.peak_rows - small.peak_rows) / 4


ASTRA = dict(name="astra", iterations=6, lr=1.0, lr_mode="auto", momentum=0.9, minibatch_size=4, heldout_every=2,
             tolerance=0.02, patience=2)


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_astra_holds_at_most_four_vectors_per_query_besides_v(mlps, kind):
    """ASTRA (heavy ball, EK-FAC preconditioned, held-out evaluations, queries stopping at different iterations):
    x, the momentum and the product's result, two at its end: LIVE_VECTORS_PER_QUERY = 4 whole [Q, D] vectors
    per query at the peak, and one module's rotations on top."""
    cfg = SolverConfig(**ASTRA)
    vectors, rows = _per_query(mlps, cfg, kind)
    assert LIVE_VECTORS_PER_QUERY == 4
    assert vectors == pytest.approx(LIVE_VECTORS_PER_QUERY, rel=1e-9)  # the constant is the solver's real peak
    assert rows <= LIVE_VECTORS_PER_QUERY + 1


def test_sni_and_lissa_stay_within_the_constant_lissa_repeats_add_their_total(mlps):
    sni = SolverConfig(name="sni", iterations=4, lr=0.3, lr_mode="absolute", momentum=0.0, minibatch_size=4,
                       heldout_every=2)
    assert _per_query(mlps, sni, "ggn")[0] <= LIVE_VECTORS_PER_QUERY
    lissa = sni.model_copy(update={"name": "lissa", "lissa_repeats": 2})
    assert _per_query(mlps, lissa, "ggn")[0] <= LIVE_VECTORS_PER_QUERY + 1  # Alg 1's running sum


def test_bfloat16_storage_halves_the_vectors_and_keeps_the_answer(mlps):
    """vector_dtype=bfloat16 with a bfloat16 model (the product's working copies in bfloat16 too): at most 4
    bfloat16 vectors per query, at most half the bytes of float32 storage, and the directions of the float32
    storage to bfloat16's precision."""
    model, _, batches, factors, lam = mlps
    half = copy.deepcopy(model).to(torch.bfloat16)
    problem = (half, select_tracked_modules(half, ["transformer.h.*.mlp.*"]), batches, factors, lam)
    cfg = SolverConfig(**{**ASTRA, "tolerance": 0.0})
    stored = {dtype: _per_query(problem, cfg, "ggn", dtype)[0] for dtype in (torch.float32, torch.bfloat16)}
    assert stored[torch.bfloat16] <= LIVE_VECTORS_PER_QUERY
    assert 2 * stored[torch.bfloat16] <= 0.5 * 4 * stored[torch.float32]  # bytes per query
    names = list(problem[1])
    reference, _ = _solve(problem, cfg, 3, "ggn", torch.float32, count=False)
    halved, _ = _solve(problem, cfg, 3, "ggn", torch.bfloat16, count=False)
    assert all(t.dtype == torch.bfloat16 for t in halved.x.values())
    assert halved.status == reference.status
    as64 = [flatten(vec_to(r.x, dtype=torch.float64), names) for r in (halved, reference)]
    assert rel(*as64) < 2e-2
