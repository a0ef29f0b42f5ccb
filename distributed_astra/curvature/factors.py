"""EK-FAC factors of the tracked modules: fitting (two passes), a model fingerprint, and atomic save/load.

Per module (seeds §3), in the statistics dtype (float64 by default):
    q_a [in+1, in+1], eigval_a [in+1]   eigenbasis of A = E_tokens[ā āᵀ]
    q_s [out, out],   eigval_s [out]    eigenbasis of S = E_tokens[Ds Dsᵀ]
    lambda_ [out, in+1]                  Λ[b, a] = E_sequences[(q_S,bᵀ DW̄_n q_A,a)²]

G_EKFAC = (Q_A ⊗ Q_S) diag(vec Λ) (Q_A ⊗ Q_S)ᵀ (column-major vec of the [out, in+1] layout) approximates the GGN
of the MEAN over sequences of the summed-token loss. The KFAC eigenvalues are put on the same scale (see
`EkfacFactors.kfac_eigenvalues`), so one damping λ means the same thing for both strategies.

On disk a factors folder holds one `factors-<rank>.safetensors` shard per rank that owns modules (tensors named
`<module>/<field>`; each module's owner writes it, ownership.py) and `meta.json` (the caller's metadata plus an
`ekfac` section with counts, dtype, module shapes and the shard of every module), so a stage can load only the
modules it owns (`load_factors(names=...)`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from distributed_astra.artifacts import (
    atomic_path,
    check_meta,
    names_by_file,
    open_tensors,
    rank_file,
    read_meta,
    save_tensors,
    write_json,
)
from distributed_astra.curvature.covariance import CovarianceStats, collect_covariances, model_device
from distributed_astra.curvature.eigen import KroneckerEigen, LambdaStats, collect_eigenvalue_correction, eigendecompose
from distributed_astra.errors import DastraError
from distributed_astra.models.modules import TrackedModule

META_FILE = "meta.json"
FORMAT_VERSION = 2
_FIELDS = ("q_a", "eigval_a", "q_s", "eigval_s", "lambda_")
_RESERVED_META_KEY = "ekfac"


@dataclass
class ModuleFactors:
    """One module's Kronecker eigenbases and corrected eigenvalues (see the module docstring for shapes)."""

    q_a: torch.Tensor
    eigval_a: torch.Tensor
    q_s: torch.Tensor
    eigval_s: torch.Tensor
    lambda_: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in+1): the gradient layout these factors act on."""
        return (self.q_s.shape[0], self.q_a.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModuleFactors:
        return ModuleFactors(*(getattr(self, f).to(device=device, dtype=dtype) for f in _FIELDS))

    @property
    def nbytes(self) -> int:
        """Bytes of the five tensors (what the module's owner holds)."""
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in _FIELDS)


@dataclass
class EkfacFactors:
    """EK-FAC factors of every tracked module, in the model's module order.

    num_tokens / num_sequences: tokens and loss-carrying sequences of the covariance pass (A and S).
    num_lambda_sequences: sequences of the eigenvalue-correction pass (Λ).
    """

    modules: dict[str, ModuleFactors]
    num_tokens: int
    num_sequences: int
    num_lambda_sequences: int

    def __getitem__(self, name: str) -> ModuleFactors:
        try:
            return self.modules[name]
        except KeyError:
            raise DastraError(
                f"no EK-FAC factors for module '{name}' (factors cover {list(self.modules)}): re-run `dastra fit`"
            ) from None

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).lambda_.dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.modules.values())).lambda_.device

    @property
    def tokens_per_sequence(self) -> float:
        """Mean number of tokens per sequence in the covariance pass."""
        return self.num_tokens / max(1, self.num_sequences)

    def kfac_eigenvalues(self, name: str) -> torch.Tensor:
        """KFAC's eigenvalues [out, in+1] in the basis Q_A ⊗ Q_S: tokens_per_sequence · d_S d_Aᵀ, clamped at 0.

        A and S are per-token averages, while G is the GGN of the mean over SEQUENCES of a loss summed over tokens.
        Dropping cross-token terms, G ≈ (1/N_seq) Σ_{n,t} ā ā ᵀ ⊗ Ds Dsᵀ ≈ (N_tok/N_seq) A ⊗ S (KFAC-expand), hence the
        factor tokens_per_sequence (1 when every sequence has one token, as for an MLP). Tiny negative eigenvalues
        from round-off are clamped so that the KFAC curvature stays PSD.
        """
        f = self[name]
        return (self.tokens_per_sequence * torch.outer(f.eigval_s, f.eigval_a)).clamp_min(0)

    def eigenvalues(self, name: str, strategy: str = "ekfac") -> torch.Tensor:
        """The diagonal [out, in+1] of G in the basis Q_A ⊗ Q_S: Λ ("ekfac") or KFAC's ("kfac")."""
        if strategy == "ekfac":
            return self[name].lambda_
        if strategy == "kfac":
            return self.kfac_eigenvalues(name)
        raise DastraError(f"factors.strategy '{strategy}' is not one of: ekfac, kfac")

    def eigenvalue_sum(self, strategy: str = "ekfac") -> tuple[float, int]:
        """(Σ of the eigenvalues, their number) over the modules held here: the parts of the mean eigenvalue
        (`mean_from_sums`) that the owners of disjoint module sets add up."""
        total, count = 0.0, 0
        for name in self.names:
            eig = self.eigenvalues(name, strategy)
            total += float(eig.sum())
            count += eig.numel()
        return total, count

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EkfacFactors:
        return EkfacFactors(
            {n: f.to(device, dtype) for n, f in self.modules.items()},
            self.num_tokens,
            self.num_sequences,
            self.num_lambda_sequences,
        )


def mean_from_sums(total: float, count: int) -> float:
    """The mean eigenvalue from `EkfacFactors.eigenvalue_sum`'s parts (summed over the owners)."""
    if count == 0 or not total > 0.0:
        raise DastraError("cannot derive a damping from all-zero curvature: set solver.damping to a number")
    return total / count


def build_factors(cov: CovarianceStats, eigens: dict[str, KroneckerEigen], lam: LambdaStats) -> EkfacFactors:
    """Assemble the factors from the two passes' (already merged) statistics."""
    modules = {}
    for name, eig in eigens.items():
        modules[name] = ModuleFactors(eig.q_a, eig.eigval_a, eig.q_s, eig.eigval_s, lam.corrected_eigenvalues(name))
    return EkfacFactors(modules, cov.num_tokens, cov.num_sequences, lam.num_sequences)


def fit_ekfac(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    make_batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    on_batch: Callable[[str, int], None] | None = None,
) -> EkfacFactors:
    """Single-process EK-FAC fit: covariance pass, eigendecompositions, eigenvalue-correction pass.

    `make_batches()` is called twice (once per pass) and must yield the same data each time. Labels are sampled
    from one generator seeded with `seed`, so the two passes use independent label draws.
    `on_batch(stage, rows)` reports progress, stage being "covariance" or "lambda".
    """
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)

    def progress(stage: str):
        return None if on_batch is None else (lambda rows: on_batch(stage, rows))

    cov = collect_covariances(model, tracked, make_batches(), dtype, generator, progress("covariance"))
    eigens = eigendecompose(cov)
    lam = collect_eigenvalue_correction(model, tracked, eigens, make_batches(), dtype, generator, progress("lambda"))
    return build_factors(cov, eigens, lam)


# --------------------------------------------------------------------------------------------- fingerprint
def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def model_fingerprint(model: nn.Module, tracked: dict[str, TrackedModule], max_elements: int = 1 << 20) -> str:
    """sha256 (hex) over the tracked modules (names, [out, in+1] shapes, Conv1D or not) and the model's parameters.

    Every parameter's name, shape and dtype is hashed. Its values are hashed in full when it has at most
    `max_elements` elements (so every parameter of a tiny model); a larger tensor contributes a strided sample of
    about `max_elements` elements (every k-th element of its flattened values), which keeps the fingerprint cheap
    for billion-parameter models but can miss a change confined to unsampled entries. Parameters must be whole on
    this process (gather ZeRO-3 partitions first). Values are hashed as raw bytes, so the dtype matters.
    """
    h = hashlib.sha256()
    for name, tm in tracked.items():
        h.update(f"tracked {name} {tm.out_features}x{tm.in_dim} conv1d={tm.is_conv1d}\n".encode())
    for name, p in model.named_parameters():
        h.update(f"param {name} {tuple(p.shape)} {p.dtype}\n".encode())
        flat = p.detach().reshape(-1)
        if flat.numel() > max_elements:
            flat = flat[:: math.ceil(flat.numel() / max_elements)]
        h.update(_tensor_bytes(flat))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- save / load
def shard_file(rank: int) -> str:
    """The file a rank writes its modules' factors into."""
    return rank_file("factors", rank)


def save_factor_shard(modules: dict[str, ModuleFactors], folder: str | os.PathLike, rank: int) -> dict[str, str]:
    """Write one rank's modules into `folder`/shard_file(rank) (the folder being assembled by `write_factors_meta`);
    returns {module: file}. A rank that owns no module writes nothing."""
    if not modules:
        return {}
    tensors = {
        f"{name}/{field}": getattr(mf, field).detach().to("cpu").contiguous()
        for name, mf in modules.items()
        for field in _FIELDS
    }
    save_tensors(tensors, Path(folder) / shard_file(rank))
    return {name: shard_file(rank) for name in modules}


def write_factors_meta(
    folder: str | os.PathLike, meta: dict, files: dict[str, str], shapes: dict[str, tuple[int, int]],
    dtype: torch.dtype, num_tokens: int, num_sequences: int, num_lambda_sequences: int,
    lambda_sum: tuple[float, int],
) -> None:
    """`meta.json` of a factors folder whose shards are written: the caller's `meta` and the `ekfac` description
    (modules in model order, each with its shape and shard; the mean of Λ over every entry,
    `ihvp.ekfac.mean_eigenvalue`, so that λ = auto needs no factor on the driver). `meta`'s key "ekfac" is
    reserved."""
    if _RESERVED_META_KEY in meta:
        raise DastraError(f"meta key '{_RESERVED_META_KEY}' is reserved for the factors' own description")
    missing = [n for n in shapes if n not in files]
    if missing:
        raise DastraError(f"internal: no rank wrote the factors of module(s) {missing}")
    description = {
        "format": FORMAT_VERSION,
        "dtype": str(dtype).removeprefix("torch."),
        "num_tokens": num_tokens,
        "num_sequences": num_sequences,
        "num_lambda_sequences": num_lambda_sequences,
        "modules": {name: list(shape) for name, shape in shapes.items()},
        "files": {name: files[name] for name in shapes},
        "mean_lambda": mean_from_sums(*lambda_sum),
    }
    write_json(Path(folder) / META_FILE, {**meta, _RESERVED_META_KEY: description})


def save_factors(factors: EkfacFactors, out_dir: str | os.PathLike, meta: dict) -> Path:
    """Write all modules as one shard + `meta.json` into `out_dir`, atomically (`artifacts.atomic_path`).

    `meta` must be JSON-serialisable; its key "ekfac" is reserved for the factors' own description.
    """
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        files = save_factor_shard(factors.modules, tmp, 0)
        write_factors_meta(
            tmp, meta, files, {n: mf.shape for n, mf in factors.modules.items()}, factors.dtype,
            factors.num_tokens, factors.num_sequences, factors.num_lambda_sequences, factors.eigenvalue_sum(),
        )
    return out_dir


def load_factors_meta(out_dir: str | os.PathLike) -> dict:
    """The `meta.json` of a factors folder; `DastraError` when the folder, its format or a shard is missing."""
    out_dir = Path(out_dir)
    meta = read_meta(out_dir, "EK-FAC factors", "fit")
    info = meta.get(_RESERVED_META_KEY)
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        raise DastraError(f"factors at '{out_dir}' have an unknown format: re-run `dastra fit`")
    for file in sorted(set(info["files"].values())):
        if not (out_dir / file).is_file():
            raise DastraError(f"factors folder '{out_dir}' is incomplete (no {file}): re-run `dastra fit`")
    return meta


def factor_shards(out_dir: str | os.PathLike) -> list[Path]:
    """The shard files of a factors folder (checked to exist)."""
    info = load_factors_meta(out_dir)[_RESERVED_META_KEY]
    return [Path(out_dir) / f for f in sorted(set(info["files"].values()))]


def stored_mean_lambda(out_dir: str | os.PathLike) -> float:
    """The mean of Λ recorded by the fit (`write_factors_meta`)."""
    return float(load_factors_meta(out_dir)[_RESERVED_META_KEY]["mean_lambda"])


def factor_fields(out_dir: str | os.PathLike, fields: Iterable[str]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(module, {field: tensor}) of every module in model order, read from its shard one module at a time (the
    rest stays on disk): the spectra of the report and of W&B."""
    out_dir = Path(out_dir)
    info = load_factors_meta(out_dir)[_RESERVED_META_KEY]
    fields = list(fields)
    with ExitStack() as stack:  # each shard opened once
        handles = {file: stack.enter_context(open_tensors(out_dir / file, "EK-FAC factors", "fit"))
                   for file in dict.fromkeys(info["files"].values())}
        for name in info["modules"]:
            handle = handles[info["files"][name]]
            yield name, {f: handle.get_tensor(f"{name}/{f}") for f in fields}


def load_factor_shard(
    path: str | os.PathLike, names: Iterable[str] | None = None, device: torch.device | str = "cpu"
) -> dict[str, ModuleFactors]:
    """The modules `names` (default: every module in it) of one shard file, read one tensor at a time."""
    path = Path(path)
    with open_tensors(path, "EK-FAC factors", "fit") as handle:
        stored = list(dict.fromkeys(key.rsplit("/", 1)[0] for key in handle.keys()))
        modules = {}
        for name in stored if names is None else names:
            try:
                modules[name] = ModuleFactors(*(handle.get_tensor(f"{name}/{f}").to(device) for f in _FIELDS))
            except SafetensorError as exc:
                raise DastraError(f"factors shard '{path}' lacks tensor {exc}: re-run `dastra fit`") from None
    return modules


def load_factors(
    out_dir: str | os.PathLike, expected: dict | None = None, device: torch.device | str = "cpu",
    names: Iterable[str] | None = None,
) -> EkfacFactors:
    """Load the modules `names` (default: all) of a factors folder, after checking that every key of `expected`
    equals the stored meta value; only the shards holding them are opened, one tensor at a time.

    A differing or absent key raises `DastraError` naming the field and telling to re-run `dastra fit`.
    """
    out_dir = Path(out_dir)
    meta = load_factors_meta(out_dir)
    check_meta(meta, expected or {}, f"factors at '{out_dir}'", "fit")
    info = meta[_RESERVED_META_KEY]
    wanted = list(info["modules"]) if names is None else list(names)
    unknown = [n for n in wanted if n not in info["modules"]]
    if unknown:
        raise DastraError(f"factors at '{out_dir}' have no module(s) {unknown}: re-run `dastra fit` for this model")
    loaded: dict[str, ModuleFactors] = {}
    for file, members in names_by_file(info["files"], wanted).items():
        loaded.update(load_factor_shard(out_dir / file, members, device))
    for name, mf in loaded.items():
        shape = info["modules"][name]
        if list(mf.shape) != list(shape) or tuple(mf.lambda_.shape) != tuple(shape):
            raise DastraError(f"factors at '{out_dir}' are corrupt (module '{name}' shape): re-run `dastra fit`")
    modules = {name: loaded[name] for name in wanted}
    return EkfacFactors(modules, info["num_tokens"], info["num_sequences"], info["num_lambda_sequences"])
