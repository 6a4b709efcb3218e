"""Write a randomly initialised Qwen3-MoE checkpoint of any size, for `routereplay check --model DIR`.

    python scripts/make_random_moe.py OUT_DIR --layers 8 --hidden 1024 --experts 64 --topk 8

It uses the same config recipe and init as the built-in model of `routereplay check`, so the two
differ only in size. No model hub is needed.
"""

from __future__ import annotations

import argparse
import math

from routereplay.cli.check import ModelSize, build_default_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init-std", type=float, default=None,
        help="weight init std (default 0.1 * sqrt(128 / hidden): the built-in model's 0.1 at hidden 128, "
        "scaled so activations keep the same size at larger widths)",
    )
    a = p.parse_args()
    size = ModelSize(
        layers=a.layers, hidden=a.hidden, experts=a.experts, top_k=a.topk, vocab=a.vocab,
        heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, moe_intermediate=a.moe_intermediate,
    )
    init_std = a.init_std if a.init_std is not None else 0.1 * math.sqrt(128 / a.hidden)
    model = build_default_model(size, seed=a.seed, init_std=init_std)
    model.save_pretrained(a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out}: {n / 1e6:.1f} M parameters, init std {init_std:.4f}, {size}")


if __name__ == "__main__":
    main()
