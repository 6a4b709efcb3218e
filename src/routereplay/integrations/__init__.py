"""Trainer integrations. Each is a leaf module that imports its framework; importing it is the opt-in.

* ``routereplay.integrations.trl``: ``GRPOTrainer``, TRL's GRPO trainer with R3 / R2 routing
  replay (``pip install 'routereplay[trl]'``).

Nothing in the routereplay core imports this package.
"""
