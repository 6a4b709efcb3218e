"""Which rows and layers of a global trace each rank sees (``slicing``: DP, TP, SP, CP, EP, PP, VPP),
and the collectives that move traces between ranks (``collectives``).
``from routereplay.parallel import slice_for_rank`` (the slicing API is re-exported here).
"""

from routereplay.parallel.slicing import (
    ParallelLayout,
    RankCoords,
    load_for_rank,
    micro_batch_sequences,
    pipeline_layer_ids,
    router_rows,
    slice_for_rank,
    unslice,
)

__all__ = [
    "ParallelLayout",
    "RankCoords",
    "load_for_rank",
    "micro_batch_sequences",
    "pipeline_layer_ids",
    "router_rows",
    "slice_for_rank",
    "unslice",
]
