"""Which rows and layers of a global trace each rank sees (``slicing``: DP, TP, SP, CP, EP, PP, VPP),
and the collectives that move traces between ranks (``collectives``).
``from routereplay.parallel import slice_for_rank`` (the slicing API is re-exported here).
"""

from routereplay.parallel import slicing
from routereplay.parallel.slicing import *  # the public names of slicing, listed in its __all__

__all__ = list(slicing.__all__)
