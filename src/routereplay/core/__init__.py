"""The engine-neutral core: the trace and its file, its layouts, the routing math, the errors.

Nothing here knows a model: ``trace`` (``RoutingTrace``), ``io`` (the ``.rrt`` file), ``layout``
(padded, packed, engine and context-parallel rows), ``index`` (row arithmetic), ``routing``
(``RouterSpec``, ``route``), ``errors``, ``version``. Every other layer builds on these.
"""
