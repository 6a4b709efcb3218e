"""Built-in data: the addition task and its character tokenizer (``routereplay.data.addition``), and
the small trained MoE checkpoint ``routereplay check`` uses by default (``data/small_moe/``, package
data written by ``scripts/train_small_moe.py``; absent from a source tree until it is trained)."""
