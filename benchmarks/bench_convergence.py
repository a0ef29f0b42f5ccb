"""ASTRA vs SNI convergence to the exact iHVP, the ASTRA paper's Fig 3 at small scale (seeds §9.2, §10.3, §12.3).

    python benchmarks/bench_convergence.py              # ≈ 8-10 min on an idle 2-core machine, 1 thread
    python benchmarks/bench_convergence.py --quick      # smoke run (≈ 1.5 min CPU), writes to /tmp

Two models, each with G = GGN of the MEAN over its curvature set of the per-sequence loss (docs/design.md):
  mlp   MLP classifier 64-32-32-10 (ReLU) on scikit-learn's bundled `load_digits`, trained with Adam; every example
        is a one-token "sequence" (the batch layout of tests/conftest.py's TinyClassifier); all three nn.Linear
        tracked; G over the 1000 training examples.
  gpt2  GPT-2 (GPT2Config, eager attention): byte vocabulary 256, 2 layers, 4 heads, n_embd 64, n_inner 32,
        trained briefly on Python stdlib docstrings (byte level, 32-token sequences); tracked: the last block's MLP
        (c_fc, c_proj). G over a curvature subset of 48 training sequences.

Per model:
  * EK-FAC with the package (`fit_ekfac`, float64, labels resampled over 10 passes); λ = the ASTRA paper's Table 3
    value for the matching setting (MNIST MLP 0.0052, GPT-2 0.011; `--mlp-damping auto` etc. for default_damping).
    Also: EK-FAC's relative error and objective.
  * Dense G (float64, D × D) assembled column block by column block from full-curvature-set GGN products
    (product_sum over sub-batches, divided by N); x* = torch.linalg.solve(G + λI, v) for Q query gradients.
  * ASTRA and SNI through the package's `solve()` with the exact minibatch `GGNProduct` (`MinibatchSampler`), in
    two regimes, each with the same optimiser for both methods:
      fig3    the paper's Fig 3 convention: lr_mode "absolute" (α = lr), momentum 0, no decay, ℬ = 32 / 8;
      table3  the paper's Table 3 optimiser: momentum 0.9, step decay (×0.5 every 50 for the MLP, ×0.9 every 100
              for the GPT-2), ℬ = 256 / 16, lr_mode "auto" (α = lr / μ̂, μ̂ from the solver's power iteration),
              which makes lr scale-free.
    lr ∈ {1, …, 1e-5}; every lr runs seed 0 (minibatch order), the `--screen-top` best of them all 5 seeds. The
    relative error ‖x_k − x*‖/‖x*‖ of every iterate is read by a thin wrapper around the product (it sees x_k when
    solve() asks for G̃_k x_k); a run whose error exceeds 100 × max(1, e_0) or turns non-finite is aborted and
    counted as diverged. Best lr = lowest mean relative error over the last 10 iterations (mean over seeds).
    Also: the exact objective gap (h − h*)/|h*| (ASTRA Fig 3's metric, with the exact G) at checkpoints, and the
    same ASTRA update with the dense full G (no minibatch noise).
  * The spectrum of the preconditioned operator (P + λI)^{-1/2}(G + λI)(P + λI)^{-1/2} (Cholesky + eigvalsh).
    The same with the exact per-module diagonal blocks of G in place of EK-FAC: the best block-diagonal bound.
Also: the cost of one ASTRA iteration (intervals between on_iteration callbacks of a real solve(), median) relative
to a plain forward + loss.backward() on the same GPT-2 minibatch, for Q = 1 and Q = 8, float64 and float32.

Writes docs/results/convergence.png and docs/results/convergence.md (text below the marker line
`<!-- analysis -->` in an existing convergence.md is kept), prints one final JSON line.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distributed_astra.config import SolverConfig  # noqa: E402
from distributed_astra.curvature.factors import fit_ekfac  # noqa: E402
from distributed_astra.eval.tasks import TableMLP  # noqa: E402
from distributed_astra.ihvp.ekfac import default_damping  # noqa: E402
from distributed_astra.ihvp.products import CurvatureProduct, GGNProduct, vec_num_queries  # noqa: E402
from distributed_astra.ihvp.solvers import MinibatchSampler, ekfac_preconditioner, solve  # noqa: E402
from distributed_astra.models.lm import IGNORE_INDEX, summed_token_loss  # noqa: E402
from distributed_astra.models.load import prepare_for_attribution  # noqa: E402
from distributed_astra.models.modules import select_tracked_modules  # noqa: E402
from distributed_astra.scoring.gradients import query_gradients  # noqa: E402

LRS = [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
THRESHOLDS = [0.50, 0.25, 0.10, 0.05, 0.01]
ANALYSIS_MARKER = "<!-- analysis -->"


# ================================================================================================ helpers
def flatten(x: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """[Q, D]: modules in `names` order, each [out, in+1] row-major."""
    return torch.cat([x[n].reshape(x[n].shape[0], -1) for n in names], dim=1)


def unflatten(flat: torch.Tensor, tracked) -> dict[str, torch.Tensor]:
    sizes = [t.shape[0] * t.shape[1] for t in tracked.values()]
    return {n: c.reshape(flat.shape[0], *t.shape) for (n, t), c in zip(tracked.items(), flat.split(sizes, dim=1))}


def split_rows(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    return [{k: t[i : i + size] for k, t in batch.items()} for i in range(0, n, size)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dense_ggn(product: GGNProduct, rows: dict[str, torch.Tensor], sub_batch: int, col_chunk: int) -> torch.Tensor:
    """G = (1/N) Σ_n J_nᵀ H_n J_n over every row of `rows` as a dense float64 [D, D] matrix, from GGN products of
    unit vectors (column blocks), summed over sub-batches before dividing by N. Returns the symmetrised matrix."""
    tracked = product.tracked
    dim = sum(t.shape[0] * t.shape[1] for t in tracked.values())
    batches = split_rows(rows, sub_batch)
    g = torch.empty(dim, dim, dtype=torch.float64)
    for start in range(0, dim, col_chunk):
        stop = min(dim, start + col_chunk)
        eye = torch.zeros(stop - start, dim, dtype=torch.float64)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        vecs = unflatten(eye, tracked)
        total, count = None, 0
        for b in batches:
            s, n = product.product_sum(vecs, b)
            f = flatten(s, list(tracked))
            total = f if total is None else total + f
            count += n
        g[start:stop] = total / count
    asym = float((g - g.T).norm() / g.norm())
    if asym > 1e-8:
        raise RuntimeError(f"dense GGN is not symmetric (relative asymmetry {asym:.2e})")
    return 0.5 * (g + g.T)


class Diverged(Exception):
    pass


class RecordingProduct(CurvatureProduct):
    """Delegates to a GGNProduct; records ‖x_k − x*‖/‖x*‖ of the vectors solve() multiplies (the iterates x_k), and
    keeps the iterates x_k at the iterations in `checkpoints` (for the exact objective). Before the first iterate,
    products of one vector (Q = 1 < number of queries) are lr_mode=auto's power-iteration probes: passed through."""

    def __init__(
        self, inner: CurvatureProduct, xstar: torch.Tensor, checkpoints: set[int] = frozenset(),
        abort_factor: float = 100.0,
    ) -> None:
        self.inner = inner
        self.tracked = inner.tracked
        self.names = list(inner.tracked)
        self.xstar = xstar
        self.xstar_norm = xstar.norm(dim=1)
        self.abort_factor = abort_factor
        self.checkpoints = checkpoints
        self.errors: list[torch.Tensor] = []
        self.snapshots: dict[int, torch.Tensor] = {}

    def error(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = flatten(x, self.names).to(torch.float64)
        if flat.shape[0] != self.xstar.shape[0]:  # the monitor stopped a query: only NaN/Inf can do that here
            raise Diverged("a query was stopped by the monitor")
        return (flat - self.xstar).norm(dim=1) / self.xstar_norm

    def snapshot(self, k: int, flat: torch.Tensor) -> None:
        if k in self.checkpoints:
            self.snapshots[k] = flat.clone()

    def product_sum(self, vectors, batch):
        if not self.errors and vec_num_queries(vectors) == 1:
            return self.inner.product_sum(vectors, batch)
        err = self.error(vectors)
        self.errors.append(err)
        self.snapshot(len(self.errors) - 1, flatten(vectors, self.names).to(torch.float64))
        limit = self.abort_factor * max(1.0, float(self.errors[0].max()))
        if not bool(torch.isfinite(err).all()) or float(err.max()) > limit:
            raise Diverged(f"relative error {float(err.max()):.3g} at iteration {len(self.errors) - 1}")
        return self.inner.product_sum(vectors, batch)


# ================================================================================================ MLP on digits
def one_token_batch(index: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    n = index.numel()
    return {
        "input_ids": torch.stack([index, index], dim=1),
        "attention_mask": torch.tensor([[1, 0]]).repeat(n, 1),
        "labels": torch.stack([torch.full((n,), IGNORE_INDEX), labels], dim=1),
    }


def setup_mlp(args) -> dict:
    from sklearn.datasets import load_digits

    t0 = time.perf_counter()
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_train = args.mlp_train
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1.0)
    x = (x - mean) / std
    model = TableMLP(x, args.mlp_widths, 10, seed=0)
    train_idx = torch.arange(n_train)
    test_idx = torch.arange(n_train, len(y))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    for epoch in range(args.mlp_epochs):
        order = train_idx[torch.randperm(n_train, generator=g)]
        for i in range(0, n_train, 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model.net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        train_acc = float((model.net(x[train_idx]).argmax(1) == y[train_idx]).double().mean())
        test_acc = float((model.net(x[test_idx]).argmax(1) == y[test_idx]).double().mean())
        train_loss = float(F.cross_entropy(model.net(x[train_idx]), y[train_idx]))
    tracked = select_tracked_modules(model, ["layers.*"])
    rows = one_token_batch(train_idx, y[train_idx])
    # queries: the first Q test examples, loss = CE with their true label
    q_idx = test_idx[: args.mlp_queries]
    queries = {**one_token_batch(q_idx, y[q_idx]), "query_id": torch.arange(len(q_idx))}
    info = {
        "model": f"MLP 64-{'-'.join(map(str, args.mlp_widths))}-10 (ReLU), float64, trained {args.mlp_epochs} epochs "
        f"Adam (lr 3e-3, wd 1e-4, batch 64)",
        "data": f"sklearn load_digits: {n_train} train (the curvature set), {len(test_idx)} test; inputs standardised",
        "train_accuracy": round(train_acc, 4),
        "test_accuracy": round(test_acc, 4),
        "train_loss": round(train_loss, 4),
        "tracked": list(tracked),
        "curvature_sequences": n_train,
        "minibatch_size": {"fig3": args.mlp_minibatch, "table3": args.mlp_t3_minibatch},
        "queries": f"{len(q_idx)} test examples, f = CE with the true label",
        "train_s": round(time.perf_counter() - t0, 1),
    }
    log(f"mlp: train acc {train_acc:.3f}, test acc {test_acc:.3f}, train loss {train_loss:.3f}")
    return dict(
        name="mlp",
        model=model,
        tracked=tracked,
        rows=rows,
        queries=queries,
        fit_batches=lambda: split_rows(rows, 250) * args.mlp_fit_repeats,
        dense_sub_batch=n_train,
        dense_col_chunk=512,
        regimes={
            "fig3": fig3_regime(args.mlp_minibatch, args.mlp_astra_iters, args.mlp_sni_iters),
            # Table 3, MLP column: momentum 0.9, ×0.5 every 50 iterations, ℬ = 256
            "table3": table3_regime(args.mlp_t3_minibatch, args.mlp_t3_iters, 0.5, 50),
        },
        damping_choice=args.mlp_damping,
        damping_source="the ASTRA paper's Table 3 λ for its MNIST / FashionMNIST MLPs (same G scale: GGN of the mean "
        "per-example CE)",
        info=info,
    )


# ================================================================================================ tiny GPT-2
def stdlib_docstring_bytes(max_bytes: int) -> bytes:
    """Docstrings of the Python stdlib (sorted files, module/class/function docstrings), UTF-8, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        if path.name.startswith(("test_", "_")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    b = (doc.strip() + "\n\n").encode("utf-8")
                    chunks.append(b)
                    total += len(b)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def setup_gpt2(args) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    seq_len = args.gpt2_seq_len
    n_seq = args.gpt2_train_seqs + args.gpt2_queries
    stream = torch.tensor(list(stdlib_docstring_bytes(n_seq * seq_len)), dtype=torch.long)
    seqs = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))
    seqs = seqs[perm]
    query_ids, train_ids = seqs[: args.gpt2_queries], seqs[args.gpt2_queries :]
    config = GPT2Config(
        vocab_size=256, n_positions=seq_len, n_embd=args.gpt2_embd, n_layer=2, n_head=4, n_inner=args.gpt2_inner,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
    steps, bs = args.gpt2_steps, 32
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    g = torch.Generator().manual_seed(1)
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(train_ids), (bs,), generator=g)
        ids = train_ids[idx]
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model = prepare_for_attribution(model.to(torch.float64))
    with torch.no_grad():
        logits = model(input_ids=query_ids, use_cache=False).logits
        held_out = float(F.cross_entropy(logits[:, :-1].reshape(-1, 256), query_ids[:, 1:].reshape(-1)))
    tracked = select_tracked_modules(model, ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"])
    curv = train_ids[: args.gpt2_curv_seqs]
    rows = {"input_ids": curv, "attention_mask": torch.ones_like(curv), "labels": curv.clone()}
    queries = {
        "input_ids": query_ids, "attention_mask": torch.ones_like(query_ids), "labels": query_ids.clone(),
        "query_id": torch.arange(len(query_ids)),
    }
    info = {
        "model": f"GPT-2 (GPT2Config, eager): vocab 256 (bytes), 2 layers, 4 heads, n_embd {args.gpt2_embd}, "
        f"n_inner {args.gpt2_inner}, context {seq_len}; trained {steps} AdamW steps (batch 32, lr 3e-3, cosine), "
        "then float64",
        "data": f"Python stdlib docstrings (byte level), {len(train_ids)} training sequences of {seq_len} tokens; "
        f"curvature set = the first {len(curv)} of them",
        "train_loss_last50": round(statistics.mean(losses[-50:]), 4),
        "held_out_loss_per_token": round(held_out, 4),
        "tracked": list(tracked),
        "curvature_sequences": len(curv),
        "minibatch_size": {"fig3": args.gpt2_minibatch, "table3": args.gpt2_t3_minibatch},
        "queries": f"{len(query_ids)} held-out sequences, f = summed token CE over all {seq_len - 1} predictions",
        "train_s": round(time.perf_counter() - t0, 1),
    }
    log(f"gpt2: train loss {info['train_loss_last50']}, held-out loss {held_out:.3f} nats/byte")
    return dict(
        name="gpt2",
        model=model,
        tracked=tracked,
        rows=rows,
        queries=queries,
        fit_batches=lambda: split_rows(rows, 16) * args.gpt2_fit_repeats,
        dense_sub_batch=8,
        dense_col_chunk=64,
        regimes={
            "fig3": fig3_regime(args.gpt2_minibatch, args.gpt2_astra_iters, args.gpt2_sni_iters),
            # Table 3, GPT-2 column: momentum 0.9, ×0.9 every 100 iterations, ℬ = 16 (GPT-2 IF)
            "table3": table3_regime(args.gpt2_t3_minibatch, args.gpt2_t3_iters, 0.9, 100),
        },
        damping_choice=args.gpt2_damping,
        damping_source="the ASTRA paper's Table 3 λ for GPT-2 / WikiText-2 (also a summed-token, per-sequence G)",
        info=info,
    )


# ================================================================================================ experiment
REGIME_TITLES = {
    "fig3": "Fig 3 convention: absolute α, momentum 0, no decay",
    "table3": "Table 3 recipe: α = lr / μ̂ (lr_mode auto), momentum 0.9, step decay",
}


def fig3_regime(minibatch: int, astra_iters: int, sni_iters: int) -> dict:
    """The paper's Fig 3 sweep convention (seeds §5 NOTE): absolute α, plain minibatch GD."""
    return {"lr_mode": "absolute", "momentum": 0.0, "lr_decay": 1.0, "lr_decay_every": 1, "minibatch_size": minibatch,
            "iterations": {"astra": astra_iters, "sni": sni_iters}}


def table3_regime(minibatch: int, iterations: int, decay: float, every: int) -> dict:
    """The paper's Table 3 optimiser (seeds §5): SGD momentum 0.9 and step decay, the same for both methods, with
    α = lr / μ̂ (`lr_mode=auto`, μ̂ = largest eigenvalue of each method's minibatch operator) so lr is scale-free."""
    return {"lr_mode": "auto", "momentum": 0.9, "lr_decay": decay, "lr_decay_every": every,
            "minibatch_size": minibatch, "iterations": {"astra": iterations, "sni": iterations}}


def run_one(method, lr, seed, v, precond, recorder, rows, regime, damping):
    cfg = SolverConfig(
        name=method, lr=lr, lr_mode=regime["lr_mode"], momentum=regime["momentum"], lr_decay=regime["lr_decay"],
        lr_decay_every=regime["lr_decay_every"], iterations=regime["iterations"][method], tolerance=0.0,
        patience=10**9, minibatch_size=regime["minibatch_size"],
    )
    sampler = MinibatchSampler(rows, regime["minibatch_size"], torch.Generator().manual_seed(1000 + seed))
    h_trace: list[torch.Tensor] = []
    alphas: list[float] = []
    diverged = False
    final = None
    try:
        result = solve(
            v, precond if method == "astra" else None, recorder, sampler, cfg, damping,
            on_iteration=lambda k, h, r, a: (h_trace.append(h.clone()), alphas.append(float(a))),
        )
        final = flatten(result.x, recorder.names).to(torch.float64)
        final_err = recorder.error(result.x)
        diverged = any(s == "diverged" for s in result.status) or not bool(torch.isfinite(final_err).all())
        errors = torch.stack([*recorder.errors, final_err])  # [iterations + 1, Q]: x_0 … x_K
        recorder.snapshot(len(errors) - 1, final)
    except Diverged:
        diverged = True
        errors = torch.stack(recorder.errors)
    h = torch.stack(h_trace) if h_trace else torch.empty(0, v[next(iter(v))].shape[0])
    return {"errors": errors, "h": h, "diverged": diverged, "alpha0": alphas[0] if alphas else None,
            "final": final, "snapshots": recorder.snapshots}


def first_hit(curve: torch.Tensor, thr: float) -> int | None:
    hit = (curve <= thr).nonzero()
    return int(hit[0]) if len(hit) else None


def objective_gap(x: torch.Tensor, ctx: dict) -> torch.Tensor:
    """(h(x) − h*)/|h*| per query with the exact G: h(x) − h* = ½ (x − x*)ᵀ(G + λI)(x − x*) (seeds §12.2)."""
    e = x - ctx["xstar"]
    return 0.5 * ((e @ ctx["a"]) * e).sum(1) / ctx["h_star"].abs()


def full_g_twin(ctx: dict, regime: dict, alpha0: float, iterations: int) -> torch.Tensor:
    """The same ASTRA update (α_0, momentum, decay of the regime) with the exact G instead of G̃_k, densely; mean
    relative error per iteration. What it leaves is the preconditioner's slow modes; the gap to the minibatch
    curve is minibatch noise."""
    x = ctx["ekfac_x"].clone()
    xstar = ctx["xstar"]
    errs = [(x - xstar).norm(dim=1) / xstar.norm(dim=1)]
    buf = None
    for k in range(iterations):
        d = (x @ ctx["a"] - ctx["vflat"]) @ ctx["p_inv"]
        buf = d if buf is None or regime["momentum"] == 0 else regime["momentum"] * buf + d
        x = x - alpha0 * regime["lr_decay"] ** (k // regime["lr_decay_every"]) * buf
        errs.append((x - xstar).norm(dim=1) / xstar.norm(dim=1))
        if not bool(torch.isfinite(errs[-1]).all()) or float(errs[-1].max()) > 1e3:
            break
    return torch.stack(errs).mean(dim=1)


def sweep(setup: dict, ctx: dict, regime_key: str, args) -> dict:
    """Every (method, lr) of one regime: seed 0 for every lr, all seeds for the `args.screen_top` best lrs of seed 0;
    best lr = lowest mean (over seeds) relative error over the last 10 iterations."""
    name, regime = setup["name"], setup["regimes"][regime_key]
    out: dict = {"regime": {k: v for k, v in regime.items()}, "title": REGIME_TITLES[regime_key]}
    runs: dict = {}
    t0 = time.perf_counter()
    for method in ("astra", "sni"):
        iters = regime["iterations"][method]
        checkpoints = set(range(0, iters + 1, max(1, iters // 15))) | {iters}

        def one(lr, seed):
            recorder = RecordingProduct(ctx["product"], ctx["xstar"], checkpoints)
            r = run_one(method, lr, seed, ctx["v"], ctx["precond"], recorder, setup["rows"], regime, ctx["damping"])
            if r["final"] is not None and not r["diverged"]:
                r["final_h_gap"] = float(objective_gap(r["final"], ctx).mean())
            return r

        for lr in LRS:
            t_lr = time.perf_counter()
            r = one(lr, 0)
            runs[(method, lr)] = {"seeds": [r], "diverged": r["diverged"]}
            log(f"{name}/{regime_key}: {method} lr {lr:g} seed 0: {'DIVERGED' if r['diverged'] else 'ok'}, last-10 "
                f"rel err {float(r['errors'][-10:].mean()):.4g}, α₀ {r['alpha0']} ({time.perf_counter() - t_lr:.1f} s)")
        ok = [lr for lr in LRS if not runs[(method, lr)]["diverged"]]
        ok.sort(key=lambda lr: float(runs[(method, lr)]["seeds"][0]["errors"][-10:].mean()))
        for lr in LRS:
            if lr not in ok[: args.screen_top]:
                runs[(method, lr)]["seeds"][0]["snapshots"] = {}
        for lr in ok[: args.screen_top]:
            for seed in range(1, args.seeds):
                r = one(lr, seed)
                runs[(method, lr)]["seeds"].append(r)
                if r["diverged"]:  # an lr with a diverged seed is out of the selection
                    runs[(method, lr)]["diverged"] = True
                    break
            log(f"{name}/{regime_key}: {method} lr {lr:g}: {len(runs[(method, lr)]['seeds'])} seeds, mean last-10 "
                f"rel err {statistics.mean(float(r['errors'][-10:].mean()) for r in runs[(method, lr)]['seeds']):.4g}")
    out["sweep_s"] = round(time.perf_counter() - t0, 1)

    summary: dict = {}
    curves: dict = {}
    for method in ("astra", "sni"):
        table = []
        best, best_val = None, math.inf
        best_h, best_h_val = None, math.inf
        for lr in LRS:
            r = runs[(method, lr)]
            seeds = r["seeds"]
            row = {"lr": lr, "diverged": r["diverged"], "seeds": len(seeds), "alpha0": seeds[0]["alpha0"]}
            if not r["diverged"]:
                err = torch.stack([s["errors"] for s in seeds])  # [seeds, K+1, Q]
                per_iter = err.mean(dim=2)  # mean over queries: [seeds, K+1]
                mean_curve = per_iter.mean(dim=0)
                row["last10_relerr"] = float(per_iter[:, -10:].mean())
                row["last10_relerr_seed_std"] = float(per_iter[:, -10:].mean(dim=1).std()) if len(seeds) > 1 else 0.0
                row["final_h_gap"] = statistics.mean(s["final_h_gap"] for s in seeds)
                # the paper's tuning criterion (Fig 3): mean of the monitor's (minibatch) h over the last 10
                # iterations, on seed 0 (which every lr has)
                row["seed0_last10_minibatch_h"] = float(seeds[0]["h"][-10:].mean())
                row["iterations_to"] = {}
                for thr in THRESHOLDS:
                    row["iterations_to"][f"{thr:g}"] = first_hit(mean_curve, thr)
                    row["iterations_to"][f"{thr:g}_per_seed"] = [first_hit(c, thr) for c in per_iter]
                curves[(method, lr)] = per_iter
                if len(seeds) == args.seeds and row["last10_relerr"] < best_val:
                    best, best_val = lr, row["last10_relerr"]
                if row["seed0_last10_minibatch_h"] < best_h_val:
                    best_h, best_h_val = lr, row["seed0_last10_minibatch_h"]
            table.append(row)
        gap_curve = None
        if best is not None:  # exact (h − h*)/|h*| of the best lr at the checkpoints, mean over seeds and queries
            seeds = runs[(method, best)]["seeds"]
            ks = sorted(set.intersection(*(set(s["snapshots"]) for s in seeds)))
            gap_curve = {k: statistics.mean(float(objective_gap(s["snapshots"][k], ctx).mean()) for s in seeds)
                         for k in ks}
        summary[method] = {"iterations": regime["iterations"][method], "best_lr": best, "best_lr_by_h": best_h,
                           "best_h_gap_curve": gap_curve, "sweep": table}
    out["methods"] = summary
    comparison = {}
    for thr in THRESHOLDS:
        key = f"{thr:g}"
        res = {}
        for method in ("astra", "sni"):
            lr = summary[method]["best_lr"]
            row = next(r for r in summary[method]["sweep"] if r["lr"] == lr) if lr is not None else None
            res[method] = row["iterations_to"][key] if row else None
        a_it, s_it = res["astra"], res["sni"]
        if a_it is not None and s_it is not None:
            ratio = a_it / max(1, s_it)
        elif a_it is not None:  # SNI never reached it: ratio ≤ a / N
            ratio = f"< {a_it / summary['sni']['iterations']:.3g} (SNI not within {summary['sni']['iterations']})"
        else:
            ratio = None
        comparison[key] = {"astra_iterations": a_it, "sni_iterations": s_it, "ratio_astra_over_sni": ratio}
    out["comparison"] = comparison
    # ASTRA's iterations to get as close to x* as SNI gets in all its iterations (SNI's last-10 mean)
    sni_lr, astra_lr = summary["sni"]["best_lr"], summary["astra"]["best_lr"]
    out["astra_to_match_sni_final"] = None
    if sni_lr is not None and astra_lr is not None:
        sni_final = float(curves[("sni", sni_lr)][:, -10:].mean())
        hit = first_hit(curves[("astra", astra_lr)].mean(dim=0), sni_final)
        out["astra_to_match_sni_final"] = {
            "sni_final_relerr": sni_final,
            "sni_iterations": summary["sni"]["iterations"],
            "astra_iterations": hit,
            "ratio": None if hit is None else hit / summary["sni"]["iterations"],
        }
    out["full_batch_astra"] = None
    if astra_lr is not None:
        alpha0 = runs[("astra", astra_lr)]["seeds"][0]["alpha0"]
        fb = full_g_twin(ctx, regime, alpha0, summary["astra"]["iterations"])
        out["_full_batch_curve"] = fb
        out["full_batch_astra"] = {"lr": astra_lr, "alpha0": alpha0, "final_relerr": float(fb[-1]),
                                   "iterations_to": {f"{t:g}": first_hit(fb, t) for t in THRESHOLDS}}
    out["_curves"] = curves
    return out


def experiment(setup: dict, args) -> dict:
    name, model, tracked, rows = setup["name"], setup["model"], setup["tracked"], setup["rows"]
    names = list(tracked)
    dim = sum(t.shape[0] * t.shape[1] for t in tracked.values())
    out: dict = {"setup": setup["info"], "tracked_parameters": dim}

    t0 = time.perf_counter()
    factors = fit_ekfac(model, tracked, setup["fit_batches"], torch.float64, seed=0)
    auto = default_damping(factors)
    damping = auto if setup["damping_choice"] == "auto" else float(setup["damping_choice"])
    out["fit_s"] = round(time.perf_counter() - t0, 1)
    out["damping"] = damping
    out["default_damping"] = auto
    out["damping_source"] = setup["damping_source"] if setup["damping_choice"] != "auto" else "default_damping"
    setup["factors"], setup["damping"] = factors, damping
    log(f"{name}: EK-FAC fitted in {out['fit_s']} s, λ = {damping:.4g} (default_damping {auto:.4g}), D = {dim}")

    t0 = time.perf_counter()
    product = GGNProduct(model, tracked)
    g = dense_ggn(product, rows, setup["dense_sub_batch"], setup["dense_col_chunk"])
    evals = torch.linalg.eigvalsh(g)
    a = g + damping * torch.eye(dim, dtype=torch.float64)
    _, v = query_gradients(model, tracked, [setup["queries"]], torch.float64)
    vflat = flatten(v, names)
    if vflat.shape[0] < 2:
        raise RuntimeError("RecordingProduct tells iterates from lr_mode=auto's one-vector probes by Q > 1")
    xstar = torch.linalg.solve(a, vflat.T).T
    # the dense solve must agree with the full-curvature-set GGN product (layout / order / scale check)
    full = MinibatchSampler(rows, 1).full_batch()
    check = flatten(product.product(unflatten(xstar, tracked), full), names) + damping * xstar
    residual = float(((check - vflat).norm(dim=1) / vflat.norm(dim=1)).max())
    out["dense_s"] = round(time.perf_counter() - t0, 1)
    out["dense_check_residual"] = residual
    out["spectrum"] = {
        "sigma_max": float(evals.max()),
        "sigma_median": float(evals.median()),
        "mean_lambda_ekfac": auto / 0.1,
        "condition_number_G_plus_lambda": float((evals.max() + damping) / (evals.min().clamp_min(0) + damping)),
    }
    log(f"{name}: dense G in {out['dense_s']} s, σ_max {float(evals.max()):.4g}, κ(G+λI) "
        f"{out['spectrum']['condition_number_G_plus_lambda']:.3g}, residual check {residual:.2e}")
    if residual > 1e-8:
        raise RuntimeError(f"{name}: dense solve disagrees with the GGN product (residual {residual:.2e})")

    cfg_pre = SolverConfig(name="astra", lr_mode="absolute")
    precond = ekfac_preconditioner(factors, cfg_pre, damping)
    ekfac_x = flatten(precond(v), names)
    p_inv = flatten(precond(unflatten(torch.eye(dim, dtype=torch.float64), tracked)), names)  # symmetric
    ekfac_err = (ekfac_x - xstar).norm(dim=1) / xstar.norm(dim=1)
    grad_err = (vflat - xstar).norm(dim=1) / xstar.norm(dim=1)
    out["ekfac_relative_error"] = [float(e) for e in ekfac_err]
    h_star = -0.5 * (vflat * xstar).sum(1)
    ctx = {"product": product, "v": v, "vflat": vflat, "precond": precond, "xstar": xstar, "a": a, "h_star": h_star,
           "damping": damping, "p_inv": p_inv, "ekfac_x": ekfac_x}
    out["ekfac_h_gap_full_G"] = [float(e) for e in objective_gap(ekfac_x, ctx)]
    out["gradient_h_gap_full_G"] = [float(e) for e in objective_gap(vflat, ctx)]
    # spectrum of the preconditioned operator (P + λI)⁻¹(G + λI): similar to Lᵀ(G + λI)L with LLᵀ = (P + λI)⁻¹
    # (Cholesky), an SPD matrix; ASTRA's full-batch step is stable only for α < 2 / μ_max (with momentum β:
    # α < 2(1 + β) / μ_max), and its slowest directions contract by ≈ α μ_min / (1 − β) per iteration
    t0 = time.perf_counter()
    chol = torch.linalg.cholesky(0.5 * (p_inv + p_inv.T))
    mu = torch.linalg.eigvalsh(chol.T @ a @ chol)
    # the same spectrum with the EXACT per-module diagonal blocks of G as preconditioner: the best any block-diagonal
    # (per-layer) approximation such as EK-FAC can do; what it cannot fix is cross-module curvature
    blocks = torch.zeros_like(g)
    offset = 0
    for t in tracked.values():
        size = t.shape[0] * t.shape[1]
        blocks[offset : offset + size, offset : offset + size] = g[offset : offset + size, offset : offset + size]
        offset += size
    blocks_inv = torch.linalg.inv(blocks + damping * torch.eye(dim, dtype=torch.float64))
    chol_blocks = torch.linalg.cholesky(0.5 * (blocks_inv + blocks_inv.T))
    mu_blocks = torch.linalg.eigvalsh(chol_blocks.T @ a @ chol_blocks)
    out["spectrum_s"] = round(time.perf_counter() - t0, 1)
    quant = torch.quantile(mu, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64))
    out["spectrum"].update({
        "preconditioned_mu_max": float(mu.max()),
        "preconditioned_mu_min": float(mu.min()),
        "preconditioned_mu_q01_median_q99": [float(x) for x in quant],
        "preconditioned_condition_number": float(mu.max() / mu.min()),
        "preconditioned_count_mu_below_0.1": int((mu < 0.1).sum()),
        "preconditioned_count_mu_above_10": int((mu > 10).sum()),
        "astra_stable_lr_below": 2.0 / float(mu.max()),
        "block_exact_mu_min": float(mu_blocks.min()),
        "block_exact_mu_max": float(mu_blocks.max()),
        "block_exact_condition_number": float(mu_blocks.max() / mu_blocks.min()),
        "sni_stable_lr_below": 2.0 / (float(evals.max()) + damping),
    })
    log(f"{name}: EK-FAC rel err {float(ekfac_err.mean()):.3f}, (h - h*)/|h*| "
        f"{statistics.mean(out['ekfac_h_gap_full_G']):.3g}, μ((P+λ)⁻¹(G+λ)) ∈ [{float(mu.min()):.3g}, "
        f"{float(mu.max()):.3g}] ({out['spectrum_s']} s)")
    out["gradient_relative_error"] = [float(e) for e in grad_err]
    out["regimes"] = {key: sweep(setup, ctx, key, args) for key in setup["regimes"]}
    return out


# ================================================================================================ cost
def measure_cost(setup: dict, args) -> dict:
    """One ASTRA iteration (GGN product + EK-FAC apply + solver bookkeeping) vs forward + loss.backward()."""
    import copy

    model, tracked, rows = setup["model"], setup["tracked"], setup["rows"]
    factors, damping = setup["factors"], setup["damping"]
    sampler = MinibatchSampler(rows, setup["regimes"]["fig3"]["minibatch_size"], torch.Generator().manual_seed(7))
    batch = sampler.sample()
    results = {}
    for dtype in (torch.float64, torch.float32):
        m = copy.deepcopy(model).to(dtype)
        m = prepare_for_attribution(m)
        tr = select_tracked_modules(m, list(tracked))
        product = GGNProduct(m, tr)
        trainable = copy.deepcopy(model).to(dtype).requires_grad_(True)
        precond = ekfac_preconditioner(factors, SolverConfig(name="astra"), damping)
        g = torch.Generator().manual_seed(3)

        def fwd_bwd():
            trainable.zero_grad(set_to_none=True)
            out = trainable(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            summed_token_loss(out.logits, batch["labels"]).mean().backward()

        def astra(q: int, k: int):
            """A solve() of k iterations whose on_iteration callback timestamps every iteration: the intervals
            between consecutive callbacks are whole iterations (update + product + EK-FAC apply + monitor)."""
            v = {n: torch.randn(q, *t.shape, generator=g, dtype=torch.float64) for n, t in tr.items()}
            cfg = SolverConfig(name="astra", lr=1e-2, lr_mode="absolute", momentum=0.0, lr_decay=1.0, iterations=k,
                               patience=10**9)

            def run() -> list[float]:
                stamps: list[float] = []
                solve(v, precond, product, itertools.repeat(batch), cfg, damping,
                      on_iteration=lambda *_: stamps.append(time.perf_counter()))
                return [b - a for a, b in zip(stamps[:-1], stamps[1:])]

            return run

        def timed(fn, n: int):
            def run() -> list[float]:
                out = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t0)
                return out

            return run

        k = args.cost_iters
        contenders = {"fwd_bwd": timed(fwd_bwd, k)}
        for q in (1, 8):
            contenders[f"astra_q{q}"] = astra(q, k + 1)
            vq = {n: torch.randn(q, *t.shape, generator=g, dtype=torch.float64) for n, t in tr.items()}
            contenders[f"product_q{q}"] = timed(lambda vq=vq: product.product(vq, batch), k)
            contenders[f"ekfac_apply_q{q}"] = timed(lambda vq=vq: precond(vq), k)
        times: dict[str, list[float]] = {c: [] for c in contenders}
        for fn in contenders.values():  # warm-up
            fn()
        for rep in range(args.cost_repeats):
            order = list(contenders)
            order = order[rep % len(order):] + order[: rep % len(order)]
            for c in order:
                times[c].extend(contenders[c]())
        med = {c: statistics.median(t) for c, t in times.items()}
        low = {c: min(t) for c, t in times.items()}
        fb = med["fwd_bwd"]
        res = {"fwd_bwd_ms": round(1000 * fb, 3), "minibatch": list(batch["input_ids"].shape),
               "samples_per_median": len(times["fwd_bwd"])}
        for q in (1, 8):
            per_iter = med[f"astra_q{q}"]
            res[f"q{q}"] = {
                "astra_iteration_ms": round(1000 * per_iter, 3),
                "ratio_to_fwd_bwd": round(per_iter / fb, 2),
                "ratio_of_minimums": round(low[f"astra_q{q}"] / low["fwd_bwd"], 2),
                "ggn_product_ms": round(1000 * med[f"product_q{q}"], 3),
                "ekfac_apply_ms": round(1000 * med[f"ekfac_apply_q{q}"], 3),
                "solver_overhead_ms": round(1000 * (per_iter - med[f"product_q{q}"] - med[f"ekfac_apply_q{q}"]), 3),
            }
        results[str(dtype).removeprefix("torch.")] = res
        log(f"cost [{dtype}]: {json.dumps(res)}")
    return results


# ================================================================================================ report
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    regimes = list(results[models[0]]["regimes"])
    fig, axes = plt.subplots(2 * len(regimes), len(models), figsize=(6.2 * len(models), 4.2 * 2 * len(regimes)),
                             squeeze=False)
    colors = {"astra": "tab:blue", "sni": "tab:red"}
    lr_colors = dict(zip(LRS, plt.cm.viridis([0.0, 0.2, 0.4, 0.6, 0.8, 0.95])))
    for row0, key in enumerate(regimes):
        for col, name in enumerate(models):
            res = results[name]
            reg = res["regimes"][key]
            ax = axes[2 * row0, col]
            for method in ("astra", "sni"):
                lr = reg["methods"][method]["best_lr"]
                if lr is None:
                    continue
                per_iter = reg["_curves"][(method, lr)]  # [seeds, K+1]
                mean = per_iter.mean(0)
                std = per_iter.std(0) if per_iter.shape[0] > 1 else torch.zeros(per_iter.shape[1])
                it = torch.arange(per_iter.shape[1])
                ax.plot(it, mean, color=colors[method], label=f"{method.upper()} (best lr = {lr:g})", lw=1.6)
                ax.fill_between(it, (mean - std).clamp_min(1e-12), mean + std, color=colors[method], alpha=0.25, lw=0)
            if "_full_batch_curve" in reg:
                fb = reg["_full_batch_curve"]
                ax.plot(torch.arange(len(fb)), fb, color=colors["astra"], ls="--", lw=1.0,
                        label=f"ASTRA lr = {reg['full_batch_astra']['lr']:g}, full G (no minibatch noise)")
            ekfac = statistics.mean(res["ekfac_relative_error"])
            ax.axhline(ekfac, color="tab:gray", ls=":", lw=1, label=f"EK-FAC (ASTRA x₀): {ekfac:.3g}")
            for thr in THRESHOLDS:
                ax.axhline(thr, color="k", ls="--", lw=0.6, alpha=0.5)
            ax.set_yscale("log")
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlim(left=0)
            ax.set_xlabel("iteration k")
            ax.set_ylabel("‖x_k − x*‖ / ‖x*‖ (mean over queries)")
            ax.set_title(f"{name} [{key}]: {reg['title']}\nbest lr per method, mean ± std over seeds; "
                         f"λ = {res['damping']:.3g}, ℬ = {reg['regime']['minibatch_size']}", fontsize=9)
            ax.legend(fontsize=7, loc="lower left")
            ax.grid(True, which="both", alpha=0.2)
            ax = axes[2 * row0 + 1, col]
            for method, ls in (("astra", "-"), ("sni", "--")):
                for lr in LRS:
                    if (method, lr) not in reg["_curves"]:
                        continue
                    mean = reg["_curves"][(method, lr)].mean(0)
                    ax.plot(torch.arange(len(mean)), mean, ls=ls, color=lr_colors[lr], lw=1.2,
                            label=f"{method.upper()} lr={lr:g}")
            ax.set_yscale("log")
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlim(left=0)
            ax.set_xlabel("iteration k")
            ax.set_ylabel("relative error (mean over seeds, queries)")
            ax.set_title(f"{name} [{key}]: lr sweep (solid ASTRA, dashed SNI; diverged lrs omitted)", fontsize=9)
            ax.legend(fontsize=7, ncol=2, loc="lower left")
            ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt_it(x, n) -> str:
    return f"not within {n}" if x is None else str(x)


def fmt_ratio(r) -> str:
    return f"{r:.3g}" if isinstance(r, float) else ("-" if r is None else r)


def regime_markdown(results: dict, key: str) -> list[str]:
    L = []
    first = results[next(iter(results))]["regimes"][key]
    L.append(f"## Regime `{key}`: {first['title']}\n")
    L.append("| model | method | best lr (by rel. err) | α₀ of best lr | best lr (by minibatch h, seed 0) | "
             "last-10 rel. err | final (h − h*)/\\|h*\\| | "
             + " | ".join(f"iters to {t:.0%}" for t in THRESHOLDS) + " |")
    L.append("|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(THRESHOLDS))
    for name, res in results.items():
        reg = res["regimes"][key]
        for method in ("astra", "sni"):
            s = reg["methods"][method]
            lr = s["best_lr"]
            row = next((r for r in s["sweep"] if r["lr"] == lr), None)
            its = [fmt_it(row["iterations_to"][f"{t:g}"], s["iterations"]) if row else "-" for t in THRESHOLDS]
            best_h = "-" if s["best_lr_by_h"] is None else f"{s['best_lr_by_h']:g}"
            err = f"{row['last10_relerr']:.4g}" if row else "-"
            gap = f"{row['final_h_gap']:.3g}" if row else "-"
            a0 = f"{row['alpha0']:.3g}" if row and row["alpha0"] is not None else "-"
            L.append(f"| {name} | {method.upper()} | {'-' if lr is None else f'{lr:g}'} | {a0} | {best_h} | {err} | "
                     f"{gap} | " + " | ".join(its) + " |")
    L.append("")
    L.append("| model | threshold | ASTRA iters | SNI iters | ASTRA / SNI (target ≤ 0.2) | ASTRA with full G |")
    L.append("|---|---|---:|---:|---|---:|")
    for name, res in results.items():
        reg = res["regimes"][key]
        for thr in THRESHOLDS:
            c = reg["comparison"][f"{thr:g}"]
            fb = reg["full_batch_astra"]
            fb = fmt_it(fb["iterations_to"][f"{thr:g}"], reg["methods"]["astra"]["iterations"]) if fb else "-"
            L.append(f"| {name} | {thr:.0%} | {fmt_it(c['astra_iterations'], reg['methods']['astra']['iterations'])} "
                     f"| {fmt_it(c['sni_iterations'], reg['methods']['sni']['iterations'])} | "
                     f"{fmt_ratio(c['ratio_astra_over_sni'])} | {fb} |")
    L.append("")
    L.append("| model | SNI's final rel. err (last 10 of N, best lr) | N | ASTRA iterations to reach it | ratio |")
    L.append("|---|---:|---:|---:|---:|")
    for name, res in results.items():
        mm = res["regimes"][key].get("astra_to_match_sni_final")
        if mm:
            ratio = "-" if mm["ratio"] is None else f"{mm['ratio']:.3g}"
            L.append(f"| {name} | {mm['sni_final_relerr']:.4g} | {mm['sni_iterations']} | "
                     f"{fmt_it(mm['astra_iterations'], res['regimes'][key]['methods']['astra']['iterations'])} | "
                     f"{ratio} |")
    L.append("")
    L.append("Exact objective gap (h − h*)/|h*| of the best lr (mean over seeds and queries) at iteration k:\n")
    L.append("| model | method | iteration k: gap |")
    L.append("|---|---|---|")
    for name, res in results.items():
        for method in ("astra", "sni"):
            curve = res["regimes"][key]["methods"][method]["best_h_gap_curve"]
            if curve:
                L.append(f"| {name} | {method.upper()} | "
                         + ", ".join(f"{k}: {g:.2g}" for k, g in curve.items()) + " |")
    mlp_lr = results["mlp"]["regimes"][key]["methods"]["astra"]["best_lr"]
    gpt_lr = results["gpt2"]["regimes"][key]["methods"]["astra"]["best_lr"]
    L.append("")
    L.append(f"ASTRA's best lr is {'the same' if mlp_lr == gpt_lr else 'NOT the same'} on both models (MLP {mlp_lr}, "
             f"GPT-2 {gpt_lr}); SNI's: MLP {results['mlp']['regimes'][key]['methods']['sni']['best_lr']}, GPT-2 "
             f"{results['gpt2']['regimes'][key]['methods']['sni']['best_lr']}.\n")
    L.append(f"### Full sweep [{key}]\n")
    L.append("| model | method | lr | α₀ | diverged | seeds | last-10 rel. err (± seed std) | final (h − h*)/\\|h*\\| | "
             "iters to " + " / ".join(f"{t:.0%}" for t in THRESHOLDS) + " |")
    L.append("|---|---|---:|---:|---|---:|---:|---:|---|")
    for name, res in results.items():
        for method in ("astra", "sni"):
            for row in res["regimes"][key]["methods"][method]["sweep"]:
                a0 = "-" if row["alpha0"] is None else f"{row['alpha0']:.3g}"
                if row["diverged"]:
                    L.append(f"| {name} | {method.upper()} | {row['lr']:g} | {a0} | yes | {row['seeds']} | - | - | - |")
                    continue
                its = " / ".join(fmt_it(row["iterations_to"][f"{t:g}"], "N") for t in THRESHOLDS)
                L.append(f"| {name} | {method.upper()} | {row['lr']:g} | {a0} | no | {row['seeds']} | "
                         f"{row['last10_relerr']:.4g} (± {row['last10_relerr_seed_std']:.2g}) | "
                         f"{row['final_h_gap']:.3g} | {its} |")
    L.append("")
    return L


def write_markdown(path: Path, results: dict, cost: dict, meta: dict, args) -> None:
    old_analysis = ""
    if path.exists():
        text = path.read_text()
        if ANALYSIS_MARKER in text:
            old_analysis = text.split(ANALYSIS_MARKER, 1)[1]
    m, g = results["mlp"], results["gpt2"]
    L = []
    L.append("# ASTRA vs SNI: convergence to the exact iHVP (ASTRA Fig 3, small scale)\n")
    L.append(f"Generated by `python benchmarks/bench_convergence.py` on {meta['date']}; wall time "
             f"**{meta['wall_s']:.0f} s** for the whole script.\n")
    L.append(f"Machine: {meta['machine']}. Load average before/after: {meta['load_before']} / {meta['load_after']} "
             "(shared with other experiments, so timings swing).\n")
    L.append("## Setup\n")
    L.append("Two regimes, both through the package's `solve()` with the exact minibatch `GGNProduct` "
             "(`MinibatchSampler`, with replacement); SNI starts at v = ∇f, ASTRA at the EK-FAC solution "
             "(P + λI)⁻¹v with λ̃ = λ; the SAME optimiser settings for both methods in each regime:\n")
    L.append(f"- `fig3`, the paper's Fig 3 sweep convention: absolute α = lr (`lr_mode=absolute`), momentum 0, no "
             f"decay, ℬ = {m['setup']['minibatch_size']['fig3']} (MLP) / {g['setup']['minibatch_size']['fig3']} "
             "(GPT-2).")
    t3m, t3g = m["regimes"]["table3"]["regime"], g["regimes"]["table3"]["regime"]
    L.append(f"- `table3`, the paper's Table 3 optimiser: heavy-ball momentum 0.9, step decay ×{t3m['lr_decay']:g} "
             f"every {t3m['lr_decay_every']} iterations (MLP) / ×{t3g['lr_decay']:g} every {t3g['lr_decay_every']} "
             f"(GPT-2), ℬ = {t3m['minibatch_size']} / {t3g['minibatch_size']} (Table 3: 256 for MLPs, 16 for GPT-2 "
             "IF), α = lr / μ̂ (`lr_mode=auto`, the package default): μ̂ = the largest eigenvalue of each method's "
             "minibatch operator ((P + λI)⁻¹(G̃ + λI) for ASTRA, G̃ + λI for SNI) by the solver's power iteration, "
             "so lr is a scale-free multiplier. (Table 3 itself writes α = c·λ; lr_mode=auto replaces c by a "
             "quantity that does not depend on the scale of G.)\n")
    L.append(f"lr ∈ {{{', '.join(f'{lr:g}' for lr in LRS)}}} in both. Seeds (minibatch order): every lr runs seed "
             f"0; the {args.screen_top} lrs with the lowest seed-0 error run all {args.seeds} seeds; best lr = lowest "
             "mean relative error over the last 10 iterations (mean over seeds) among those, ignoring an lr with a "
             "diverged seed (error > 100 × max(1, e₀) or non-finite). The iterates are read by a wrapper around "
             "the product (no change to the solver). The exact x* = (G + λI)⁻¹v comes from a dense float64 G "
             "assembled from full-curvature-set GGN products of unit vectors and `torch.linalg.solve`. Relative "
             "error = ‖x_k − x*‖/‖x*‖, mean over queries. Objective gap = (h(x) − h*)/|h*| with the exact G, "
             "h* = −½vᵀx* (0 = optimal, 1 = as bad as x = 0). 'best lr by minibatch h' is the paper's tuning "
             "criterion (mean over the last 10 iterations of the monitor's h on the minibatch G̃, seed 0). "
             "λ: the ASTRA paper's Table 3 values for the matching settings (the package's `default_damping` "
             "is listed for reference).\n")
    L.append("| | MLP (digits) | tiny GPT-2 |")
    L.append("|---|---|---|")
    for label, k in (("model", "model"), ("data", "data"), ("queries", "queries")):
        L.append(f"| {label} | {m['setup'][k]} | {g['setup'][k]} |")
    L.append(f"| quality | train acc {m['setup']['train_accuracy']}, test acc {m['setup']['test_accuracy']} | "
             f"train loss {g['setup']['train_loss_last50']}, held-out {g['setup']['held_out_loss_per_token']} "
             "nats/byte |")
    L.append(f"| tracked | {', '.join(m['setup']['tracked'])} | {', '.join(g['setup']['tracked'])} |")
    L.append(f"| tracked parameters D | {m['tracked_parameters']} | {g['tracked_parameters']} |")
    L.append(f"| curvature set N | {m['setup']['curvature_sequences']} | {g['setup']['curvature_sequences']} |")
    L.append(f"| λ used | {m['damping']:.4g} ({m['damping_source']}) | {g['damping']:.4g} ({g['damping_source']}) |")
    L.append(f"| package default_damping (0.1 × mean Λ), for reference | {m['default_damping']:.4g} | "
             f"{g['default_damping']:.4g} |")
    for label, key in (("σ_max(G)", "sigma_max"), ("median σ(G)", "sigma_median"),
                       ("κ(G + λI)", "condition_number_G_plus_lambda"),
                       ("SNI full-batch stability (no momentum): α < 2/(σ_max + λ)", "sni_stable_lr_below"),
                       ("μ_max of (P + λI)⁻¹(G + λI)", "preconditioned_mu_max"),
                       ("μ_min of (P + λI)⁻¹(G + λI)", "preconditioned_mu_min"),
                       ("κ of (P + λI)^{-1/2}(G + λI)(P + λI)^{-1/2}", "preconditioned_condition_number"),
                       ("eigenvalues μ < 0.1 / μ > 10 (count)", None),
                       ("μ quantiles 1% / 50% / 99%", None),
                       ("ASTRA full-batch stability (no momentum): α < 2/μ_max", "astra_stable_lr_below"),
                       ("μ_min / μ_max with the exact per-module blocks B of G as preconditioner", None),
                       ("κ of (B + λI)^{-1/2}(G + λI)(B + λI)^{-1/2} (best block-diagonal)",
                        "block_exact_condition_number")):
        if label.startswith("eigenvalues"):
            L.append(f"| {label} | {m['spectrum']['preconditioned_count_mu_below_0.1']} / "
                     f"{m['spectrum']['preconditioned_count_mu_above_10']} | "
                     f"{g['spectrum']['preconditioned_count_mu_below_0.1']} / "
                     f"{g['spectrum']['preconditioned_count_mu_above_10']} |")
        elif label.startswith("μ_min / μ_max with"):
            L.append(f"| {label} | {m['spectrum']['block_exact_mu_min']:.4g} / {m['spectrum']['block_exact_mu_max']:.4g} "
                     f"| {g['spectrum']['block_exact_mu_min']:.4g} / {g['spectrum']['block_exact_mu_max']:.4g} |")
        elif label.startswith("μ quantiles"):
            L.append(f"| {label} | {' / '.join(f'{x:.3g}' for x in m['spectrum']['preconditioned_mu_q01_median_q99'])} "
                     f"| {' / '.join(f'{x:.3g}' for x in g['spectrum']['preconditioned_mu_q01_median_q99'])} |")
        else:
            L.append(f"| {label} | {m['spectrum'][key]:.4g} | {g['spectrum'][key]:.4g} |")
    for key in m["regimes"]:
        L.append(f"| [{key}] ℬ, iterations ASTRA / SNI | {m['regimes'][key]['regime']['minibatch_size']}, "
                 f"{m['regimes'][key]['methods']['astra']['iterations']} / "
                 f"{m['regimes'][key]['methods']['sni']['iterations']} | "
                 f"{g['regimes'][key]['regime']['minibatch_size']}, "
                 f"{g['regimes'][key]['methods']['astra']['iterations']} / "
                 f"{g['regimes'][key]['methods']['sni']['iterations']} |")
    L.append(f"| rel. error of ∇f (SNI x₀) | {statistics.mean(m['gradient_relative_error']):.4g} | "
             f"{statistics.mean(g['gradient_relative_error']):.4g} |")
    L.append(f"| rel. error of EK-FAC (ASTRA x₀) | {statistics.mean(m['ekfac_relative_error']):.4g} | "
             f"{statistics.mean(g['ekfac_relative_error']):.4g} |")
    L.append(f"| (h − h*)/\\|h*\\| of ∇f / of EK-FAC (exact G) | {statistics.mean(m['gradient_h_gap_full_G']):.3g} / "
             f"{statistics.mean(m['ekfac_h_gap_full_G']):.3g} | {statistics.mean(g['gradient_h_gap_full_G']):.3g} / "
             f"{statistics.mean(g['ekfac_h_gap_full_G']):.3g} |")
    L.append(f"| time: fit / dense G / spectrum / sweeps {' + '.join(m['regimes'])} (s) | {m['fit_s']} / "
             f"{m['dense_s']} / {m['spectrum_s']} / {' + '.join(str(r['sweep_s']) for r in m['regimes'].values())} | "
             f"{g['fit_s']} / {g['dense_s']} / {g['spectrum_s']} / "
             f"{' + '.join(str(r['sweep_s']) for r in g['regimes'].values())} |")
    L.append("")
    L.append("![convergence](convergence.png)\n")
    L.append("Per regime, top: best lr of each method, mean ± std over seeds; dashed blue: the same ASTRA update "
             "(same α₀, momentum, decay) with the full G (no minibatch noise); dotted: EK-FAC (ASTRA's x₀); dashed "
             "grey: 50%, 25%, 10%, 5%, 1%. Bottom: every non-diverged lr (mean over the seeds it ran). Symlog x "
             "axis (linear below 10). Iterations to a threshold: first k at which the mean-over-seeds (and queries) "
             "relative error of the best lr is at or below it (per-seed first hits are in the JSON file). "
             "'ASTRA with full G' separates the preconditioner's slow modes (what remains there) from minibatch "
             "noise (the rest of the gap to the minibatch curve).\n")
    for key in m["regimes"]:
        L.extend(regime_markdown(results, key))
    L.append("## Cost of one ASTRA iteration (tiny GPT-2)\n")
    L.append("One iteration = what `solve()` does per step: GGN product G̃_k x_k on the minibatch, EK-FAC apply "
             "(P + λI)⁻¹, the monitor and the update. It is timed inside a real `solve()` run on one fixed minibatch "
             f"of {cost['float64']['minibatch'][0]} sequences × {cost['float64']['minibatch'][1]} tokens, as the "
             "interval between consecutive `on_iteration` callbacks, against a plain forward + `loss.backward()` of "
             "the summed loss (parameters requiring grad) on the same minibatch, timed call by call. Medians over "
             f"{cost['float64']['samples_per_median']} samples each ({args.cost_repeats} interleaved rounds of "
             f"{args.cost_iters}), so that load spikes of the shared machine fall out. 'Overhead' = iteration − "
             "product − EK-FAC apply: the solver's own bookkeeping (h, residual norms, monitor, vec_take/vec_put).\n")
    L.append("| model dtype | Q | fwd+bwd ms | ASTRA iteration ms | ratio (medians) | ratio (minimums) | "
             "GGN product ms | EK-FAC apply ms | overhead ms |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dt, res in cost.items():
        for q in (1, 8):
            r = res[f"q{q}"]
            L.append(f"| {dt} | {q} | {res['fwd_bwd_ms']:.2f} | {r['astra_iteration_ms']:.2f} | "
                     f"{r['ratio_to_fwd_bwd']:.2f} | {r['ratio_of_minimums']:.2f} | {r['ggn_product_ms']:.2f} | "
                     f"{r['ekfac_apply_ms']:.2f} | {r['solver_overhead_ms']:.2f} |")
    L.append("")
    L.append("## Command\n")
    L.append("```\n. .venv/bin/activate\npython benchmarks/bench_convergence.py\n```\n")
    L.append("The sizes above are the script's defaults, chosen so that the whole run stays under 10 minutes on an "
             "idle machine of this kind (see `--help` for every size).\n")
    L.append(ANALYSIS_MARKER)
    L.append(old_analysis.lstrip("\n") if old_analysis.strip() else "\n## Analysis\n\n(to be written)\n")
    path.write_text("\n".join(L))


def jsonable(obj):
    """The results without the private (`_`-prefixed) tensors, for the JSON file."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_"))}
    return obj


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--mlp-train", type=int, default=1000)
    p.add_argument("--mlp-widths", type=int, nargs="+", default=[32, 32])
    p.add_argument("--mlp-epochs", type=int, default=20)
    p.add_argument("--mlp-queries", type=int, default=8)
    p.add_argument("--mlp-minibatch", type=int, default=32)
    p.add_argument("--mlp-fit-repeats", type=int, default=10)
    p.add_argument("--mlp-damping", default="0.0052", help="a number, or 'auto' for default_damping")
    p.add_argument("--mlp-astra-iters", type=int, default=600)
    p.add_argument("--mlp-sni-iters", type=int, default=1000)
    p.add_argument("--gpt2-embd", type=int, default=64)
    p.add_argument("--gpt2-inner", type=int, default=32)
    p.add_argument("--gpt2-seq-len", type=int, default=32)
    p.add_argument("--gpt2-train-seqs", type=int, default=4000)
    p.add_argument("--gpt2-steps", type=int, default=600)
    p.add_argument("--gpt2-curv-seqs", type=int, default=48)
    p.add_argument("--gpt2-queries", type=int, default=4)
    p.add_argument("--gpt2-minibatch", type=int, default=8)
    p.add_argument("--gpt2-fit-repeats", type=int, default=10)
    p.add_argument("--gpt2-damping", default="0.011", help="a number, or 'auto' for default_damping")
    p.add_argument("--gpt2-astra-iters", type=int, default=300)
    p.add_argument("--gpt2-sni-iters", type=int, default=500)
    p.add_argument("--mlp-t3-minibatch", type=int, default=256)
    p.add_argument("--mlp-t3-iters", type=int, default=300)
    p.add_argument("--gpt2-t3-minibatch", type=int, default=16)
    p.add_argument("--gpt2-t3-iters", type=int, default=300)
    p.add_argument("--screen-top", type=int, default=2, help="lrs (best on seed 0) that run every seed")
    p.add_argument("--cost-iters", type=int, default=10)
    p.add_argument("--cost-repeats", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="tiny smoke run, writes to /tmp/convergence_quick")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--json-out", type=Path, default=Path("/tmp/bench_convergence.json"),
                   help="every number of the run (per-seed hits, full sweep), for inspection")
    args = p.parse_args()
    if args.quick:
        args.seeds = 2
        args.mlp_astra_iters, args.mlp_sni_iters = 40, 80
        args.gpt2_astra_iters, args.gpt2_sni_iters = 30, 60
        args.mlp_t3_iters, args.gpt2_t3_iters = 40, 30
        args.gpt2_steps, args.gpt2_curv_seqs, args.gpt2_train_seqs = 100, 16, 1000
        args.cost_repeats = 3
        args.out_dir = Path("/tmp/convergence_quick")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)
    start = time.perf_counter()
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    results = {}
    setups = {}
    for name, make in (("mlp", setup_mlp), ("gpt2", setup_gpt2)):
        setups[name] = make(args)
        results[name] = experiment(setups[name], args)
    cost = measure_cost(setups["gpt2"], args)
    plot(results, args.out_dir / "convergence.png")
    wall = time.perf_counter() - start
    meta = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "wall_s": wall,
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, torch "
        f"{torch.__version__} with torch.set_num_threads(1), Python {platform.python_version()}",
        "load_before": load_before,
        "load_after": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    write_markdown(args.out_dir / "convergence.md", results, cost, meta, args)
    per_regime = {}
    for key in results["mlp"]["regimes"]:
        per_regime[key] = {
            "models": {
                name: {
                    "best_lr": {m: res["regimes"][key]["methods"][m]["best_lr"] for m in ("astra", "sni")},
                    "best_lr_by_minibatch_h": {
                        m: res["regimes"][key]["methods"][m]["best_lr_by_h"] for m in ("astra", "sni")},
                    "iterations_to": res["regimes"][key]["comparison"],
                    "final_h_gap_best_lr": {
                        m: next((r["final_h_gap"] for r in res["regimes"][key]["methods"][m]["sweep"]
                                 if r["lr"] == res["regimes"][key]["methods"][m]["best_lr"]), None)
                        for m in ("astra", "sni")},
                    "astra_to_match_sni_final": res["regimes"][key]["astra_to_match_sni_final"],
                    "full_batch_astra": res["regimes"][key]["full_batch_astra"],
                }
                for name, res in results.items()
            },
            "astra_best_lr_same_on_both": results["mlp"]["regimes"][key]["methods"]["astra"]["best_lr"]
            == results["gpt2"]["regimes"][key]["methods"]["astra"]["best_lr"],
        }
    summary = {
        "wall_s": round(wall, 1),
        "load_before_after": [load_before, meta["load_after"]],
        "models": {
            name: {
                "damping": res["damping"],
                "tracked_parameters": res["tracked_parameters"],
                "ekfac_relative_error": statistics.mean(res["ekfac_relative_error"]),
                "preconditioned_mu_min_max": [res["spectrum"]["preconditioned_mu_min"],
                                              res["spectrum"]["preconditioned_mu_max"]],
                "preconditioned_condition_number": res["spectrum"]["preconditioned_condition_number"],
                "block_exact_condition_number": res["spectrum"]["block_exact_condition_number"],
                "condition_number_G_plus_lambda": res["spectrum"]["condition_number_G_plus_lambda"],
            }
            for name, res in results.items()
        },
        "regimes": per_regime,
        "cost_astra_iteration_over_fwd_bwd": {
            dt: {f"q{q}": r[f"q{q}"]["ratio_to_fwd_bwd"] for q in (1, 8)} for dt, r in cost.items()
        },
        "cost_ratio_of_minimums": {
            dt: {f"q{q}": r[f"q{q}"]["ratio_of_minimums"] for q in (1, 8)} for dt, r in cost.items()
        },
    }
    args.json_out.write_text(json.dumps({"summary": summary, "results": jsonable(results),
                                                              "cost": cost}, indent=1, default=str))
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
