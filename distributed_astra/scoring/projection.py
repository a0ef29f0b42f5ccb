"""Kronecker-factored random projection of per-module gradients (LoGra-style; seeds §8, "Gradient projection").

A tracked module's gradient is a matrix G = Σ_t Ds_t ā_tᵀ of shape [O, I] (docs/design.md, "Gradient capture").
Its projection is

    φ(G) = P_out G P_inᵀ = Σ_t (P_out Ds_t)(P_in ā_t)ᵀ        [k_out, k_in]

with P_out [k_out, O] and P_in [k_in, I] Gaussian, entries N(0, 1/k). The right-hand form projects each token
before summing over tokens, so no [O, I] matrix is ever formed for a training document. In row-major vec form
φ(G) = (P_out ⊗ P_in) vec(G), and E[(P_out ⊗ P_in)ᵀ(P_out ⊗ P_in)] = E[P_outᵀP_out] ⊗ E[P_inᵀP_in] = I, so
⟨φ(G), φ(X)⟩ is an unbiased estimate of ⟨G, X⟩ (Johnson-Lindenstrauss): a query direction X [O, I] (a solved
iHVP) is projected the same way, P_out X P_inᵀ (not its transpose), and the projected inner product approximates
the score τ = ⟨X, G⟩. When k ≥ the side it projects, that side is the identity (exact, nothing to gain from a
random matrix of that size).

The matrices are drawn from a CPU generator seeded by (projection.seed, module name, side): the same seed gives the
same matrices on every machine, whatever the module order.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass

import torch

from distributed_astra.curvature.hooks import sequence_gradients
from distributed_astra.errors import DastraError


def _side_seed(seed: int, module: str, side: str) -> int:
    digest = hashlib.sha256(f"{seed}/{module}/{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def orthogonal_projection(rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, cols]: `rows` orthonormal random directions scaled by sqrt(cols / rows), so E[PᵀP] = I.

    Orthonormal rows (QR of a Gaussian matrix) give a lower variance than i.i.d. Gaussian entries (by a factor
    1 - rows/cols) and become exact as rows -> cols; rows ≥ cols gives the identity.
    """
    if rows >= cols:
        return torch.eye(cols, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(cols, rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # the Haar-distributed choice of signs
    return (q.t() * (cols / rows) ** 0.5).to(torch.float32)


@dataclass(frozen=True)
class ModuleProjection:
    name: str
    out_matrix: torch.Tensor  # P_out [k_out, O]
    in_matrix: torch.Tensor  # P_in [k_in, I]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_matrix.shape[0], self.in_matrix.shape[0])

    @property
    def dim(self) -> int:
        return self.shape[0] * self.shape[1]


def module_dims(
    name: str, default: tuple[int, int], per_module: dict[str, tuple[int, int]]
) -> tuple[int, int]:
    """(k_out, k_in) of a module: the first glob of `per_module` that matches its name, else `default`."""
    for pattern, dims in per_module.items():
        if fnmatch.fnmatchcase(name, pattern):
            return (int(dims[0]), int(dims[1]))
    return default


class KroneckerProjection:
    """One (P_out, P_in) pair per tracked module; projected vectors concatenate the modules in the given order."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        dims: dict[str, tuple[int, int]],
        seed: int,
    ) -> None:
        self.seed = int(seed)
        self.modules: dict[str, ModuleProjection] = {}
        for name, (out_dim, in_dim) in shapes.items():
            k_out, k_in = dims[name]
            if k_out <= 0 or k_in <= 0:
                raise DastraError(f"projection dims of module {name} must be positive (got {k_out}, {k_in})")
            self.modules[name] = ModuleProjection(
                name,
                orthogonal_projection(k_out, out_dim, _side_seed(seed, name, "out")),
                orthogonal_projection(k_in, in_dim, _side_seed(seed, name, "in")),
            )

    @classmethod
    def for_modules(
        cls,
        shapes: dict[str, tuple[int, int]],
        out_dim: int,
        in_dim: int,
        per_module: dict[str, tuple[int, int]] | None,
        seed: int,
    ) -> KroneckerProjection:
        """Dimensions from the `projection` config section: a default (k_out, k_in) and per-module globs."""
        dims = {name: module_dims(name, (out_dim, in_dim), per_module or {}) for name in shapes}
        return cls(shapes, dims, seed)

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.modules.values())

    def describe(self) -> dict[str, object]:
        """What the store and the index record: a store built with other matrices cannot be searched."""
        return {
            "projection_seed": self.seed,
            "projection_dims": {name: list(p.shape) for name, p in self.modules.items()},
            "projection_total_dim": self.dim,
            "whitening": None,  # WhitenedProjection: its damping and strategy
        }

    def project_tokens(self, output_grads: dict[str, torch.Tensor], activations: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, D]: Σ_t (P_out Ds_t)(P_in ā_t)ᵀ per sequence and module, flattened and concatenated (float32).

        Ds [B, T, O] and ā [B, T, I] as `GradientCapture` gives them (zero at padding).
        """
        parts = []
        for name, projection in self.modules.items():
            out_matrix = projection.out_matrix.to(output_grads[name].device)
            in_matrix = projection.in_matrix.to(activations[name].device)
            ds = output_grads[name].float() @ out_matrix.t()  # [B, T, k_out]
            a = activations[name].float() @ in_matrix.t()  # [B, T, k_in]
            parts.append(sequence_gradients(ds, a).flatten(1))
        return torch.cat(parts, dim=1)

    def project_matrices(self, matrices: dict[str, torch.Tensor]) -> torch.Tensor:
        """[Q, D]: P_out X P_inᵀ for stacked matrices X [Q, O, I] per module (query directions), float32."""
        parts = []
        for name, projection in self.modules.items():
            x = matrices[name].float()
            if tuple(x.shape[1:]) != (projection.out_matrix.shape[1], projection.in_matrix.shape[1]):
                raise DastraError(
                    f"module {name}: matrices of shape {tuple(x.shape[1:])} do not match the projection's "
                    f"[{projection.out_matrix.shape[1]}, {projection.in_matrix.shape[1]}] ([out, in+1] layout)"
                )
            parts.append((projection.out_matrix @ x @ projection.in_matrix.t()).flatten(1))
        return torch.cat(parts, dim=1)


class WhitenedProjection(KroneckerProjection):
    """The same random matrices applied in the EK-FAC eigenbasis, whitened on both sides (issue 18):

        training side  φ_W(G) = P_out [(Q_Sᵀ G Q_A) ⊘ sqrt(Λ + λ)] P_inᵀ
        query side     ψ_W(X) = P_out [sqrt(Λ + λ) ⊙ (Q_Sᵀ X Q_A)] P_inᵀ

    Q_S, Q_A the Kronecker eigenbases and Λ the corrected eigenvalues of EK-FAC (seeds §3, Eqs 26-28), λ the
    damping. The rotation is orthogonal, so ⟨(Q_Sᵀ G Q_A) ⊘ s, s ⊙ (Q_Sᵀ X Q_A)⟩ = ⟨G, X⟩ for any direction X
    (EK-FAC's, ASTRA's): the score is unchanged and at full dimension exact, while the JL error of the sketch,
    ≈ ‖U‖‖V‖/√k, is that of the whitened pair. For X = (G_EKFAC + λI)⁻¹∇f the two sides are the same map of the two
    gradients, (Λ+λ)^(-1/2) in the eigenbasis, which no longer lets large-curvature directions of the training
    gradient crowd out the low-curvature ones the query direction weights. Cost: the training side forms each
    sequence's [O, I] gradient in the eigenbasis (the ⊘ breaks the per-token rank-one form), O(T O I) per module,
    like one exact score.
    """

    def __init__(self, base: KroneckerProjection, bases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 damping: float, strategy: str) -> None:
        self.seed, self.modules = base.seed, base.modules
        missing = sorted(set(self.modules) - set(bases))
        if missing:
            raise DastraError(f"whitened projection: no EK-FAC factors for modules {missing}; re-run `dastra fit`")
        # name -> (Q_S [O, O], Q_A [I, I], sqrt(Λ + λ) [O, I]), float32
        self.bases = {name: (q_s.float(), q_a.float(), scale.float()) for name, (q_s, q_a, scale) in bases.items()}
        self.damping, self.strategy = float(damping), strategy

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "whitening": {"damping": self.damping, "strategy": self.strategy}}

    def project_tokens(self, output_grads: dict[str, torch.Tensor], activations: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, D]: φ_W of each sequence's gradient Σ_t Ds_t ā_tᵀ (rotated per token, whitened per sequence)."""
        parts = []
        for name, projection in self.modules.items():
            device = output_grads[name].device
            q_s, q_a, scale = (t.to(device) for t in self.bases[name])
            rotated = torch.einsum("bto,bti->boi", output_grads[name].float() @ q_s, activations[name].float() @ q_a)
            whitened = rotated / scale
            parts.append((projection.out_matrix.to(device) @ whitened @ projection.in_matrix.to(device).t()).flatten(1))
        return torch.cat(parts, dim=1)

    def project_matrices(self, matrices: dict[str, torch.Tensor]) -> torch.Tensor:
        """[Q, D]: ψ_W(X) for stacked query directions X [Q, O, I] per module."""
        scaled = {}
        for name, x in matrices.items():
            if name in self.bases:
                q_s, q_a, scale = self.bases[name]
                if tuple(x.shape[1:]) != tuple(scale.shape):
                    raise DastraError(f"module {name}: matrices of shape {tuple(x.shape[1:])} do not match the "
                                      f"EK-FAC factors' {tuple(scale.shape)} ([out, in+1] layout)")
                scaled[name] = scale * (q_s.t() @ x.float() @ q_a)
        return super().project_matrices(scaled)
