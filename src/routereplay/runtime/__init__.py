"""The runtime over one attached model: ``attach`` picks an adapter through the ``seam``, the
``session``'s handle owns the scoped ``record`` / ``replay`` modes, and ``recompute`` binds each
forward's routes to its checkpointed regions. Engine-neutral: adapters plug in through the seam.
"""
