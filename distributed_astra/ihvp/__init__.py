"""Inverse-Hessian(GGN)-vector products. `ekfac`: the EK-FAC / KFAC damped inverse and matrix functions."""

from distributed_astra.ihvp.ekfac import default_damping, ekfac_inverse, ekfac_matrix_function

__all__ = ["default_damping", "ekfac_inverse", "ekfac_matrix_function"]
