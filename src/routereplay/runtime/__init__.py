"""The runtime over one attached model: ``attach`` picks an adapter through the ``seam``, the
``session``'s handle owns the scoped ``record`` / ``replay`` modes, ``recompute`` binds each
forward's routes to its checkpointed regions, and ``rollout`` captures routes in ``generate``.
Engine-neutral: adapters plug in through the seam.
"""
