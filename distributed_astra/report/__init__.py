"""The HTML report a person reads after a run: top documents per query with per-token shading, score distribution,
solver convergence and EK-FAC eigen-spectra (`dastra report`, written at the end of `dastra run`)."""
