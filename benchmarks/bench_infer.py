"""What router-spec inference adds to ``attach``, per distinct router class (CPU).

    .venv/bin/python benchmarks/bench_infer.py [--repeat 3]

For each router class that only inference knows (ergo, minicpm5_moe, kolibri1_1) and, with the
hand table bypassed, two hand-written ones (qwen3_moe, deepseek_v3): the router module alone is
built at the tiny test size (hidden 64, 16 experts, top-4) and at a production size (hidden 7168,
256 experts, top-8; groups 8 / top-4 where the family has them), and ``hf_infer.infer`` is timed
cold (cache cleared) and warm (a cache hit: what every further layer of the class costs). The
baseline beside it is one forward of the router on a [4096, hidden] batch (a micro-batch's worth of
rows). Prints median (min-max) of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FAMILIES = ("ergo", "minicpm5_moe", "kolibri1_1", "qwen3_moe", "deepseek_v3")


def _router(family: str, hidden: int, experts: int, top_k: int):
    import hf_zoo
    import transformers

    from routereplay.adapters import hf

    config_cls = getattr(transformers, hf_zoo.model_class_name(family)).config_class
    if family in hf_zoo._CONFIG_CLASS:
        config_cls = getattr(transformers, hf_zoo._CONFIG_CLASS[family])
    base = dict(hf_zoo._sized(hf_zoo._TINY, experts, top_k), hidden_size=hidden, n_group=8, topk_group=4)
    base["num_expert_group"] = 8
    overrides = {k: v for k, v in hf_zoo._FAMILY[family][1].items() if k not in ("num_hidden_layers",)}
    config = hf_zoo._tiny_config(config_cls, {**overrides, "num_hidden_layers": 2}, base=base)
    model_cls = getattr(transformers, hf_zoo.model_class_name(family))
    # only the router: find its class in a 2-layer meta model, then build one on the CPU
    with torch.device("meta"):
        meta = model_cls(config)
    _path, meta_router = next((p, r) for p, r in hf.find_routers(meta))
    router_cls = type(meta_router)
    router = router_cls(hf._text_config(config, meta_router)).float()
    with torch.no_grad():
        for t in [*router.parameters(), *router.buffers()]:
            if t.is_floating_point():
                t.normal_(0, 0.02)
    return router, hf._text_config(config, meta_router)


def _median(xs):
    return f"{statistics.median(xs) * 1e3:8.1f} ms ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    from routereplay.adapters import hf_infer

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'family':14s} {'size':>22s} {'cold infer':>28s} {'warm (cache hit)':>28s} {'router fwd [4096,H]':>28s}")
    for family in FAMILIES:
        for hidden, experts, top_k in ((64, 16, 4), (7168, 256, 8)):
            router, config = _router(family, hidden, experts, top_k)
            cold, warm, fwd = [], [], []
            x = torch.randn(4096, hidden)
            for _ in range(args.repeat):
                hf_infer.cache_clear()
                t = time.perf_counter()
                inferred = hf_infer.infer(router, config)
                cold.append(time.perf_counter() - t)
                t = time.perf_counter()
                hf_infer.infer(router, config)
                warm.append(time.perf_counter() - t)
                with torch.no_grad():
                    t = time.perf_counter()
                    router(x)
                    fwd.append(time.perf_counter() - t)
            size = f"H{hidden} E{experts} K{top_k}"
            print(f"{family:14s} {size:>22s} {_median(cold):>28s} {_median(warm):>28s} {_median(fwd):>28s}")
            del inferred
    return 0


if __name__ == "__main__":
    sys.exit(main())
