"""One driver per stage (docs/architecture.md): each module holds a stage's rank functions and the driver that runs
them on the run context's executor (execution.py) and writes the stage's artifacts.

    fit      EK-FAC factors (seeds §3)                          stages/fit.py
    query    query gradients ∇f(z_q)                            stages/query.py
    solve    iHVP directions (seeds §3-5)                       stages/solve.py
    source   SOURCE / ASTRA-SOURCE directions (seeds §6-7)      stages/source.py
    score    top-k documents per query (seeds §1, Eq 2)         stages/score.py

One process is the one-rank case of the same code (`InProcessExecutor`); modules import downward only.
"""
