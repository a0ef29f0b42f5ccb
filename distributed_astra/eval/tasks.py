"""LDS tasks: a train/query split, a reproducible training recipe, the measurement f, and what attribution needs.

Every LDS setting names the core `task.Task` its model is attributed with (`attribution_task`), so that the
package's EK-FAC fit, GGN products and solvers run on it unchanged:

* tabular tasks (digits, diabetes, ridge): an MLP over a table of inputs held by the model as a buffer (rows 0..N-1
  the training set, then the queries); a batch is {"example": rows [B], "targets": [B]} and the model maps the rows
  to outputs [B, C] (`TableClassification`, `TableRegression`: `task.ClassificationTask` and `task.RegressionTask`
  with that calling convention and the setting's measurement).
* gpt2: sequences of at most 32 tokens cut from the demo corpus (Python stdlib text, `data/demo_corpus.py`), in the
  batch layout of `models/lm.py` (`task.CAUSAL_LM`).

Measurements (seeds §9.1, ASTRA App. F.1), all "loss-like" so that a positive IF score (seeds Eq 2) is helpful:
    classification   f = −margin = −z_t + log Σ_{i≠t} exp z_i
    regression       f = |g(x) − t|              (absolute error, on standardised targets)
    language model   f = Σ_t CE of the query sequence (every token predicted)

Recipes are frozen dataclasses; `recipe_hash` keys the retraining cache, so any change retrains.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from distributed_astra.artifacts import atomic_path
from distributed_astra.data.demo_corpus import build_demo_corpus
from distributed_astra.data.sequences import collate_sequences, iter_document_sequences
from distributed_astra.data.tokenizer import train_bpe_tokenizer
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.solvers import MinibatchSampler
from distributed_astra.models.lm import IGNORE_INDEX
from distributed_astra.models.load import prepare_for_attribution
from distributed_astra.models.tiny import build_tiny_gpt2, train_tiny_gpt2
from distributed_astra.task import (
    CAUSAL_LM,
    ClassificationTask,
    RegressionTask,
    negative_margin,
)
from distributed_astra.task import Task as AttributionTask

Kind = Literal["classification", "regression", "language_model"]
State = dict[str, torch.Tensor]


@dataclass
class TrainedModel:
    """States along one training run: `checkpoints[-1]` is θ^s; `learning_rates[c]` is η_c for TracIn."""

    checkpoints: list[State]
    learning_rates: list[float]
    final_loss: float

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.final_loss)


def _clone_state(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load_sklearn(name: str):
    try:
        import sklearn.datasets
    except ImportError:
        raise DastraError(
            f"task needs scikit-learn's bundled '{name}' data: install the eval extra (pip install -e '.[eval]')"
        ) from None
    return getattr(sklearn.datasets, name)()


class Task(ABC):
    """One LDS setting. Instances are cheap to build (Ray workers rebuild them from the name and data folder)."""

    name: str
    kind: Kind
    description: str
    tracked_modules: list[str]
    # λ at which the influence function is exact (ridge: the ridge coefficient); None: λ from eval.damping_scale
    exact_damping: float | None = None

    def __init__(self, data_dir: Path, overrides: dict | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.overrides = dict(overrides or {})

    def _override(self, spec):
        """The recipe dataclass `spec` with `eval.recipe` overrides applied (unknown fields raise, listing them)."""
        valid = [f.name for f in fields(spec)]
        for key in self.overrides:
            if key not in valid:
                raise DastraError(f"eval.recipe.{key}: task {self.name} has no such recipe field; valid: {', '.join(valid)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.overrides.items()}
        return replace(spec, **values)

    def prepare(self) -> None:
        """Build whatever the workers read (once, in the driver). Nothing for the tabular tasks."""

    @property
    @abstractmethod
    def recipe(self) -> dict:
        """Everything that determines a training run besides the subset and the seed (JSON-serialisable)."""

    def recipe_hash(self) -> str:
        text = json.dumps({"task": self.name, **self.recipe}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    @abstractmethod
    def num_train(self) -> int: ...

    @property
    @abstractmethod
    def num_queries(self) -> int: ...

    @abstractmethod
    def train(self, train_index: torch.Tensor, seed: int) -> TrainedModel:
        """Train from scratch on the training examples `train_index` with `seed` (init and batch order)."""

    @abstractmethod
    def measure(self, state: State) -> torch.Tensor:
        """f on every query for the model with weights `state`: float64 [Q]."""

    @abstractmethod
    def attribution_model(self, state: State) -> nn.Module:
        """The model with weights `state`, in eval mode, parameters frozen, ready for the hooks."""

    @property
    @abstractmethod
    def attribution_task(self) -> AttributionTask:
        """The core task: the training loss L(z_m), the measurement f(z_q) and the output Hessian (`task.Task`)."""

    @abstractmethod
    def train_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Every training example once, in index order, in the layout `attribution_task` reads."""

    @abstractmethod
    def query_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]: ...

    @abstractmethod
    def curvature_sampler(
        self, batches: list[dict[str, torch.Tensor]], minibatch_size: int, generator: torch.Generator
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Endless minibatches of `minibatch_size` examples of `batches` drawn with replacement by `generator`,
        with `full_batch()` (every example once)."""

    @abstractmethod
    def model_output(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """TRAK's model-output function per example [B] of the model output: margin, regression output, or
        sequence loss."""


# ==================================================================================================== tabular
class TableMLP(nn.Module):
    """rows -> MLP(inputs[rows]) (ReLU) over a table of inputs held as a buffer (module docstring)."""

    def __init__(self, inputs: torch.Tensor, widths: list[int], out_dim: int, seed: int) -> None:
        super().__init__()
        self.register_buffer("inputs", inputs)
        dims = [inputs.shape[1], *widths, out_dim]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.to(inputs.dtype)

    def net(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        x = self.inputs[rows]
        if torch.is_grad_enabled():
            x.requires_grad_(True)  # attribution: parameters frozen, gradients flow through activations
        return self.net(x)


Pointwise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _TableOutputs:
    """A `TableMLP` on {"example": rows, "targets": t}, with the LDS setting's pointwise measurement f(z, t)."""

    def __init__(self, measurement: Pointwise) -> None:
        self._measurement = measurement

    def output(self, model: nn.Module, batch) -> torch.Tensor:
        return model(batch["example"])

    def measurement(self, output: torch.Tensor, batch) -> torch.Tensor:
        return self._measurement(output, batch["targets"])


class TableClassification(_TableOutputs, ClassificationTask):
    """Softmax cross-entropy over the table's rows (`task.ClassificationTask`)."""


class TableRegression(_TableOutputs, RegressionTask):
    """Squared error over the table's rows (`task.RegressionTask`)."""


class ExampleSampler:
    """Minibatches of `minibatch_size` examples drawn uniformly WITH replacement from the rows of `batches`: the
    tabular counterpart of `ihvp.solvers.MinibatchSampler` (whose rows are LM sequences), with the same draws."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], minibatch_size: int, generator: torch.Generator) -> None:
        self.rows = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        self.num_sequences = int(self.rows["targets"].shape[0])
        self.minibatch_size = int(minibatch_size)
        self.generator = generator

    def full_batch(self) -> dict[str, torch.Tensor]:
        return dict(self.rows)

    def __iter__(self) -> ExampleSampler:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        index = torch.randint(self.num_sequences, (self.minibatch_size,), generator=self.generator)
        return {k: t.index_select(0, index) for k, t in self.rows.items()}


@dataclass(frozen=True)
class TabularRecipe:
    """SGD with momentum on the mean loss (the ASTRA paper's MLP recipes, seeds §10.1, scaled down)."""

    widths: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    num_checkpoints: int  # TracIn: states after every epochs/num_checkpoints epochs (the last is θ^s)
    num_train: int
    num_queries: int
    split_seed: int = 0


class TabularTask(Task):
    recipe_spec: TabularRecipe

    def __init__(self, data_dir: Path, overrides: dict | None = None) -> None:
        super().__init__(data_dir, overrides)
        self.recipe_spec = spec = self._override(type(self).recipe_spec)
        x, y = self.load_arrays()
        if spec.num_train + spec.num_queries > len(y):
            raise DastraError(f"task {self.name}: {spec.num_train} + {spec.num_queries} examples exceed {len(y)}")
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(spec.split_seed))
        x, y = x[perm], y[perm]
        train = slice(0, spec.num_train)
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1.0 if self.kind == "classification" else 1e-8)
        self.inputs = ((x - mean) / std)[: spec.num_train + spec.num_queries].to(torch.float64)
        self.targets = y[: spec.num_train + spec.num_queries]

    @abstractmethod
    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    @property
    def out_dim(self) -> int:
        return 1

    @property
    def recipe(self) -> dict:
        return asdict(self.recipe_spec)

    @property
    def num_train(self) -> int:
        return self.recipe_spec.num_train

    @property
    def num_queries(self) -> int:
        return self.recipe_spec.num_queries

    @property
    def tracked_modules(self) -> list[str]:
        return ["layers.*"]

    def build(self, seed: int) -> TableMLP:
        return TableMLP(self.inputs, list(self.recipe_spec.widths), self.out_dim, seed)

    def mean_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.pointwise_loss(outputs, targets).mean()

    @cached_property
    def attribution_task(self) -> AttributionTask:
        table = TableClassification if self.kind == "classification" else TableRegression
        return table(self.pointwise_measurement)

    def pointwise_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss L(z, t) per row: the attribution task's (cross-entropy or ½(z − t)²)."""
        return self.attribution_task.loss(outputs, {"targets": targets})

    @abstractmethod
    def pointwise_measurement(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def train(self, train_index: torch.Tensor, seed: int) -> TrainedModel:
        spec = self.recipe_spec
        model = self.build(seed)
        x, y = self.inputs[train_index], self.targets[train_index]
        opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        every = max(1, spec.epochs // spec.num_checkpoints)
        checkpoints: list[State] = []
        loss = torch.tensor(0.0)
        for epoch in range(spec.epochs):
            order = torch.randperm(len(train_index), generator=generator)
            for start in range(0, len(order), spec.batch_size):
                rows = order[start : start + spec.batch_size]
                loss = self.mean_loss(model.net(x[rows]), y[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if not math.isfinite(float(loss.detach())):
                return TrainedModel([], [], float("nan"))
            if (epoch + 1) % every == 0 or epoch + 1 == spec.epochs:
                checkpoints.append(_clone_state(model))
        checkpoints = checkpoints[-spec.num_checkpoints :]
        with torch.no_grad():
            final = float(self.mean_loss(model.net(x), y))
        return TrainedModel(checkpoints, [spec.lr] * len(checkpoints), final)

    def measure(self, state: State) -> torch.Tensor:
        model = self.build(0)
        model.load_state_dict(state)
        queries = slice(self.num_train, self.num_train + self.num_queries)
        with torch.no_grad():
            return self.pointwise_measurement(model.net(self.inputs[queries]), self.targets[queries]).double()

    def attribution_model(self, state: State) -> nn.Module:
        model = self.build(0)
        model.load_state_dict(state)
        return model.eval().requires_grad_(False)

    def _batches(self, rows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
        return [{"example": index, "targets": self.targets[index]} for index in rows.split(batch_size)]

    def train_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        return self._batches(torch.arange(self.num_train), batch_size)

    def query_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        return self._batches(torch.arange(self.num_train, self.num_train + self.num_queries), batch_size)

    def curvature_sampler(self, batches, minibatch_size, generator):
        return ExampleSampler(batches, minibatch_size, generator)


class DigitsTask(TabularTask):
    name = "digits"
    kind = "classification"
    description = "scikit-learn load_digits, MLP 64-32-10 (ReLU), SGD-momentum, f = −margin"
    recipe_spec = TabularRecipe(
        widths=(32,), epochs=20, batch_size=64, lr=0.03, momentum=0.9, weight_decay=1e-3, num_checkpoints=4,
        num_train=800, num_queries=100,
    )

    def load_arrays(self):
        data = _load_sklearn("load_digits")
        return torch.tensor(data.data, dtype=torch.float64), torch.tensor(data.target, dtype=torch.long)

    @property
    def out_dim(self) -> int:
        return 10

    def pointwise_measurement(self, outputs, targets):
        return negative_margin(outputs, targets)

    def model_output(self, output, batch):
        return -negative_margin(output, batch["targets"])


class RegressionTask(TabularTask):
    kind = "regression"

    def load_arrays(self):
        data = _load_sklearn("load_diabetes")
        y = torch.tensor(data.target, dtype=torch.float64)
        return torch.tensor(data.data, dtype=torch.float64), (y - y.mean()) / y.std()

    def pointwise_measurement(self, outputs, targets):
        return (outputs[..., 0] - targets).abs()

    def model_output(self, output, batch):
        return output[:, 0]


class DiabetesTask(RegressionTask):
    name = "diabetes"
    description = "scikit-learn load_diabetes (standardised target), MLP 10-32-32-1 (ReLU), SGD-momentum, f = |g − t|"
    recipe_spec = TabularRecipe(
        widths=(32, 32), epochs=40, batch_size=32, lr=0.01, momentum=0.9, weight_decay=1e-3, num_checkpoints=4,
        num_train=342, num_queries=100,
    )


class DigitsShortTask(DigitsTask):
    """SOURCE's non-converged regime (FashionMNIST-N / Concrete-N: 3 epochs, a checkpoint per epoch; seeds §10.5)."""

    name = "digits-short"
    description = "load_digits MLP 64-32-10, SGD-momentum, 3 epochs (non-converged), checkpoint per epoch"
    recipe_spec = replace(DigitsTask.recipe_spec, epochs=3, num_checkpoints=3)


class DiabetesShortTask(DiabetesTask):
    """The diabetes MLP in SOURCE's non-converged regime (3 epochs, a checkpoint per epoch; seeds §10.5)."""

    name = "diabetes-short"
    description = "load_diabetes MLP 10-32-32-1, SGD-momentum, 3 epochs (non-converged), checkpoint per epoch"
    recipe_spec = replace(DiabetesTask.recipe_spec, epochs=3, num_checkpoints=3)


class RidgeTask(RegressionTask):
    """Ridge regression solved in closed form: the IF at λ = ridge is the exact Newton step (the harness check).

    Loss (1/n) Σ ½(θᵀā − t)² + (ridge/2)‖θ‖² over the kept examples (ā = [x; 1], the bias is penalised too), so
    the Hessian is G + ridge·I with G = E[ā āᵀ] = EK-FAC's G exactly (one module, scalar output). The measurement
    is the signed residual f = g(x_q) − t_q, linear in θ: the IF's only error is then the second-order effect of
    removing half the data (|g − t| would add its kink at 0, which breaks the ranking of queries fit almost exactly).
    """

    name = "ridge"
    description = "load_diabetes, linear model, ridge in closed form, f = g − t (the IF is exact at λ = ridge)"
    ridge = 0.05
    recipe_spec = TabularRecipe(
        widths=(), epochs=1, batch_size=1, lr=1.0, momentum=0.0, weight_decay=0.0, num_checkpoints=1,
        num_train=342, num_queries=100,
    )

    @property
    def exact_damping(self) -> float:
        return self.ridge

    @property
    def recipe(self) -> dict:
        return {**super().recipe, "ridge": self.ridge}

    def pointwise_measurement(self, outputs, targets):
        return outputs[..., 0] - targets

    def train(self, train_index: torch.Tensor, seed: int) -> TrainedModel:
        x = self.inputs[train_index]
        abar = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        t = self.targets[train_index]
        n = len(train_index)
        theta = torch.linalg.solve(abar.T @ abar / n + self.ridge * torch.eye(abar.shape[1], dtype=x.dtype), abar.T @ t / n)
        model = self.build(seed)
        with torch.no_grad():
            model.layers[0].weight.copy_(theta[None, :-1])
            model.layers[0].bias.copy_(theta[-1:])
            residual = abar @ theta - t
            final = float(0.5 * (residual**2).mean() + 0.5 * self.ridge * theta.square().sum())
        return TrainedModel([_clone_state(model)], [1.0], final)


# ==================================================================================================== tiny GPT-2
@dataclass(frozen=True)
class LanguageModelRecipe:
    num_stdlib_docs: int = 150
    vocab_size: int = 512
    max_length: int = 32
    num_train: int = 256
    num_queries: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    epochs: int = 20
    batch_size: int = 16
    lr: float = 3e-3
    num_checkpoints: int = 4
    data_seed: int = 0


class TinyGPT2Task(Task):
    """The tiny GPT-2 of `models/tiny.py`, trained from scratch on sequences of the demo corpus (AdamW, cosine)."""

    name = "gpt2"
    kind = "language_model"
    attribution_task = CAUSAL_LM
    tracked_modules = ["transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj"]
    def __init__(self, data_dir: Path, overrides: dict | None = None) -> None:
        super().__init__(data_dir, overrides)
        self.spec = self._override(LanguageModelRecipe())

    @property
    def description(self) -> str:
        s = self.spec
        return (
            f"tiny GPT-2 ({s.n_layer} layers, n_embd {s.n_embd}, BPE vocab {s.vocab_size}) trained from scratch on "
            f"{s.num_train} demo-corpus sequences of ≤ {s.max_length} tokens; f = summed CE of a held-out sequence"
        )

    @property
    def recipe(self) -> dict:
        return asdict(self.spec)

    @property
    def num_train(self) -> int:
        return self.spec.num_train

    @property
    def num_queries(self) -> int:
        return self.spec.num_queries

    @property
    def _sequences_file(self) -> Path:
        return self.data_dir / f"gpt2-{self.recipe_hash()}" / "sequences.pt"

    def prepare(self) -> None:
        if self._sequences_file.is_file():
            return
        s = self.spec
        folder = self._sequences_file.parent
        corpus, _ = build_demo_corpus(folder / "corpus", s.num_stdlib_docs, 1, s.data_seed)
        import pyarrow.parquet as pq

        texts = pq.read_table(corpus, columns=["text"]).column(0).to_pylist()
        tokenizer = train_bpe_tokenizer(texts, s.vocab_size, folder / "tokenizer")
        sequences = [q for q in iter_document_sequences(corpus, tokenizer, s.max_length) if len(q[0]) >= 8]
        need = s.num_train + s.num_queries
        if len(sequences) < need:
            raise DastraError(f"task gpt2: the demo corpus gave {len(sequences)} sequences, {need} needed")
        random.Random(s.data_seed).shuffle(sequences)
        batch = collate_sequences(sequences[:need], int(tokenizer.pad_token_id))
        with atomic_path(self._sequences_file) as tmp:
            torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                        "vocab_size": len(tokenizer)}, tmp)

    def _data(self) -> dict:
        if not hasattr(self, "_cached"):
            if not self._sequences_file.is_file():
                raise DastraError(f"task gpt2: '{self._sequences_file}' missing: call Task.prepare() first")
            self._cached = torch.load(self._sequences_file)
        return self._cached

    def _rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        data = self._data()
        ids, mask = data["input_ids"][index], data["attention_mask"][index]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX),
                "example": index}

    def build(self, seed: int):
        s = self.spec
        return build_tiny_gpt2(self._data()["vocab_size"], s.n_layer, s.n_head, s.n_embd, s.max_length, seed)

    def _lr_at(self, step: int, steps: int) -> float:
        """The step size `train_tiny_gpt2` uses at `step` (its linear warm-up over steps // 20, then cosine)."""
        warmup = max(1, steps // 20)
        if step < warmup:
            return self.spec.lr * (step + 1) / warmup
        return self.spec.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    def train(self, train_index: torch.Tensor, seed: int) -> TrainedModel:
        s = self.spec
        model = self.build(seed)
        per_epoch = math.ceil(len(train_index) / s.batch_size)
        steps = s.epochs * per_epoch
        marks = {round(steps * (c + 1) / s.num_checkpoints) - 1 for c in range(s.num_checkpoints)}
        checkpoints: list[State] = []
        rates: list[float] = []

        def epoch_batches(epoch: int):
            order = train_index[torch.randperm(len(train_index), generator=torch.Generator().manual_seed(seed * 7919 + epoch))]
            return [self._rows(order[i : i + s.batch_size]) for i in range(0, len(order), s.batch_size)]

        def on_step(step: int, loss: float) -> None:
            if step in marks:
                checkpoints.append(_clone_state(model))
                rates.append(self._lr_at(step, steps))

        losses = train_tiny_gpt2(model, epoch_batches, steps, s.lr, seed, on_step)
        final = sum(losses[-per_epoch:]) / per_epoch
        return TrainedModel(checkpoints, rates, final) if math.isfinite(final) else TrainedModel([], [], final)

    def measure(self, state: State) -> torch.Tensor:
        model = self.attribution_model(state)
        batch = self._rows(torch.arange(self.num_train, self.num_train + self.num_queries))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return CAUSAL_LM.measurement(logits.float(), batch).double()

    def attribution_model(self, state: State) -> nn.Module:
        model = self.build(0)
        model.load_state_dict(state)
        return prepare_for_attribution(model)

    def train_batches(self, batch_size: int):
        rows = torch.arange(self.num_train)
        return [self._rows(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]

    def query_batches(self, batch_size: int):
        rows = torch.arange(self.num_train, self.num_train + self.num_queries)
        return [self._rows(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]

    def curvature_sampler(self, batches, minibatch_size, generator):
        return MinibatchSampler(batches, minibatch_size, generator)

    def model_output(self, output, batch):
        return CAUSAL_LM.loss(output, batch)


# ==================================================================================================== registry
TASKS: dict[str, type[Task]] = {
    t.name: t for t in (DigitsTask, DiabetesTask, TinyGPT2Task, RidgeTask, DigitsShortTask, DiabetesShortTask)
}


def build_task(name: str, data_dir: Path, overrides: dict | None = None) -> Task:
    """The task called `name` with recipe `overrides`; an unknown name raises `DastraError` listing the valid ones."""
    if name not in TASKS:
        raise DastraError(f"eval task '{name}' is unknown; valid tasks: {', '.join(TASKS)}")
    return TASKS[name](data_dir, overrides)

