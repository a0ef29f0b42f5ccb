"""SOURCE and ASTRA-SOURCE over saved training checkpoints (seeds §6-7).

- `trajectory`: checkpoints, applied learning rates, optimizer settings; record, save, load.
- `segments`: L segments of a trajectory, their mean / effective learning rates and implied damping.
- `averaging`: EK-FAC averaged over a segment's checkpoints; averaged parameters (Fast-SOURCE).
- `directions`: EK-FAC-SOURCE (exp-form or damped) and ASTRA-SOURCE query directions, and scores.
- `stages`: `dastra solve|score --method source|astra-source` on the pipeline's model and corpus.
"""

from distributed_astra.source.averaging import average_ekfac, average_states, fit_segment_ekfac
from distributed_astra.source.directions import (
    VARIANTS,
    astra_segment_direction,
    astra_source_directions,
    forgetting,
    propagated_queries,
    response,
    source_directions,
    source_scores,
)
from distributed_astra.source.segments import Segment, if_damping, segment_trajectory
from distributed_astra.source.trajectory import (
    CheckpointRecord,
    OptimizerSettings,
    Trajectory,
    TrajectoryRecorder,
    adam_preconditioner_rms,
    load_trajectory,
    save_trajectory,
)

__all__ = [
    "VARIANTS",
    "CheckpointRecord",
    "OptimizerSettings",
    "Segment",
    "Trajectory",
    "TrajectoryRecorder",
    "adam_preconditioner_rms",
    "astra_segment_direction",
    "astra_source_directions",
    "average_ekfac",
    "average_states",
    "fit_segment_ekfac",
    "forgetting",
    "if_damping",
    "load_trajectory",
    "propagated_queries",
    "response",
    "save_trajectory",
    "segment_trajectory",
    "source_directions",
    "source_scores",
]
