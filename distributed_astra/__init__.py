"""distributed_astra: training-data attribution for LLMs with EK-FAC and ASTRA inverse-Hessian-vector products."""

__version__ = "0.1.0"
