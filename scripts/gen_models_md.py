"""Generate docs/MODELS.md: which transformers MoE families routereplay supports, and why not.

    .venv/bin/python scripts/gen_models_md.py            # writes docs/MODELS.md
    .venv/bin/python scripts/gen_models_md.py --check    # exit 1 if docs/MODELS.md is stale

For every family of ``tests/hf_zoo.py`` it builds the tiny model, attaches, and for supported
families checks on the spot that recording then replaying a batch gives bit-identical logits
and that replaying another batch's routes changes them. The table lists the model class, router
path, router class, the MoE layer ids of the tiny model, and the status with its reason.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _logits(model, batch):
    out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def replay_check(model, handle) -> tuple[bool, bool]:
    """Record two batches and replay: (replaying a batch's own routes gives bit-identical logits,
    replaying the other batch's routes changes them)."""
    g = torch.Generator().manual_seed(0)
    b1 = {"input_ids": torch.randint(3, 120, (2, 6), generator=g)}
    b2 = {"input_ids": torch.randint(3, 120, (2, 6), generator=g)}
    with torch.no_grad():
        with handle.record() as r1:
            out = _logits(model, b1)
        with handle.record() as r2:
            _logits(model, b2)
        with handle.replay(r1.trace()):
            same = torch.equal(_logits(model, b1), out)
        with handle.replay(r2.trace()):
            changed = not torch.equal(_logits(model, b1), out)
    return same, changed


def survey(family: str) -> dict:
    import hf_zoo

    from routereplay import attach
    from routereplay.adapters import hf
    from routereplay.core.errors import RouteReplayError

    row = {
        "family": family,
        "model_class": hf_zoo.model_class_name(family),
        "path": "",
        "router": "",
        "layers": "",
        "status": "",
        "note": "",
        "spec": "",
        "inference": "",
    }
    reason = hf_zoo.reason_skipped(family)
    if reason:
        row.update(status="not tested", note=f"cannot build a tiny model here: {reason}")
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = hf_zoo.build(family)
    except Exception as e:  # noqa: BLE001 (a build failure is reported in the table, not hidden)
        row.update(status="not tested", note=f"tiny model failed to build: {type(e).__name__}: {str(e)[:120]}")
        return row
    routers = hf.find_routers(model)
    row["path"] = ", ".join(sorted({re.sub(r"\.\d+(?=\.|$)", ".{i}", p) for p, _ in routers}))
    row["router"] = ", ".join(sorted({type(m).__name__ for _, m in routers}))
    try:
        handle = attach(model)
    except RouteReplayError as e:
        msg = str(e)
        row.update(status="refused", note=msg.split(" is not supported: ", 1)[-1])
        return row
    row["layers"] = ", ".join(map(str, handle.layer_ids))
    replayed = [type(m).__name__ for _, m in routers if type(m).__name__ not in hf._HASH_ROUTERS]
    row["spec"] = "inferred" if any(name not in _hand_table() for name in replayed) else "hand-written"
    notes = (
        [f"hash-routed layers left out of traces: {', '.join(p for p, _ in handle.skipped)}"] if handle.skipped else []
    )
    attention = [m for m in handle.layers if m.layer_id != hf.layer_id_of(m.path)]
    if attention:
        paths = sorted({re.sub(r"\.\d+(?=\.|$)", ".{i}", m.path) for m in attention})
        notes.append(
            f"every router replayed; attention routers `{', '.join(paths)}` have layer id "
            "num_hidden_layers + i (the MLP router of layer i keeps id i)"
        )
    try:
        same, changed = replay_check(model, handle)
    except Exception as e:  # noqa: BLE001 (any failure is a FAILED row, shown in the table)
        row.update(status="FAILED", note=f"{type(e).__name__}: {str(e)[:160]}")
        return row
    finally:
        handle.detach()
    if same and changed:
        row["status"] = "supported"
    else:
        row["status"] = "FAILED"
        notes.append(f"record->replay bit-identical: {same}; other routes change output: {changed}")
    row["note"] = "; ".join(notes)
    return row


def _hand_table() -> frozenset[str]:
    from routereplay.adapters import hf_specs

    return frozenset(hf_specs._BUILDERS)


def inference_verdict(family: str) -> tuple[str, str]:
    """Inference alone on the family's first router with a hand-written spec (16 experts, top-4,
    where sorted and unsorted top-k differ on the CPU): ``hf_specs.check_override``'s verdict."""
    import hf_zoo

    from routereplay.adapters import hf, hf_specs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = hf_zoo.build(family, num_experts=16, top_k=4)
    for _path, router in hf.find_routers(model):
        if type(router).__name__ in hf_specs._BUILDERS:
            return hf_specs.check_override(router, hf._text_config(model.config, router))
    return "", ""


def render(rows: list[dict]) -> str:
    import transformers

    supported = sum(r["status"] == "supported" for r in rows)
    lines = [
        "# Supported MoE models (HuggingFace transformers)",
        "",
        (
            f"Generated by `scripts/gen_models_md.py` against transformers {transformers.__version__}; "
            "do not edit by hand."
        ),
        "",
        f'**{supported} of {len(rows)} families supported.** "supported" means: the adapter attached to a tiny',
        "random model of the family, replaying the recorded routes of a batch gave bit-identical logits, and",
        "replaying another batch's routes changed them (the full contract is `tests/test_hf_contract.py`).",
        '"refused" families raise `UnsupportedRouterError` at `attach` with the reason below.',
        "Layer ids are the global decoder-layer numbers of the MoE layers of the tiny test model (dense",
        "layers keep their numbers and are not part of a trace). A router inside attention (JetMoE's mixture of",
        "attention heads) of decoder layer i has id num_hidden_layers + i.",
        "",
        "The spec column says where the router's RouterSpec comes from: the hand table of",
        "`routereplay/adapters/hf_specs.py`, or inference (see below).",
        "",
        "| family | model class | router path | router class | MoE layers (tiny) | status | spec | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        path = f"`{r['path']}`" if r["path"] else ""
        note = r["note"].replace("|", "\\|")
        lines.append(
            f"| {r['family']} | {r['model_class']} | {path} | {r['router']} | {r['layers']} | {r['status']} "
            f"| {r['spec']} | {note} |"
        )
    lines += _inference_section(rows)
    return "\n".join(lines) + "\n"


def _inference_section(rows: list[dict]) -> list[str]:
    checked = [r for r in rows if r["inference"]]
    counts = {
        v: sum(r["inference"][0] == v for r in checked) for v in ("same", "equivalent", "seam", "refused", "differs")
    }
    reproduced = counts["same"] + counts["equivalent"]
    lines = [
        "",
        "## Router specs inferred by probing",
        "",
        "A router class with no entry in the hand table of `routereplay/adapters/hf_specs.py` is probed at",
        "`attach` (`routereplay/adapters/hf_infer.py`): its own `forward` runs on a battery of inputs (random,",
        "x100, x1e-3, all zeros, repeated rows, a negative ramp) with its own weights and with seeded random copies",
        "in fp32, bf16, fp32 weights with bf16 inputs, and positive weights; a RouterSpec (score function and where it",
        "runs, selection bias read from the module's buffers or its forward argument, groups read from the router or",
        "config, renormalisation and its epsilon, scaling, dtype casts, zero-computation experts) is accepted only",
        "when `routing.route` reproduces the router's ids and weights bit for bit on every probe. Otherwise `attach`",
        "raises `UnsupportedRouterError` naming the closest spec and the first probe and row where it differs.",
        "Results are cached per router class, its scalar attributes and tensor shapes. What it adds to `attach`",
        "(once per distinct router class and config; 0.1 ms for each further layer) is measured by",
        "`benchmarks/bench_infer.py`, at the test size and at a DeepSeek-V3-like size: see BENCHMARKS.md,",
        "\"Router-spec inference at `attach`\".",
        "",
        "**Adding an override**: write a builder `(router, config) -> RouterSpec` in `hf_specs.py` and list the",
        "router class in `_BUILDERS` (with its bias in `selection_bias` when it is a forward argument). The",
        "hand table wins over inference, and `tests/test_hf_infer.py` holds every override against inference.",
        "",
        (
            f"With the hand table out of the way, inference alone reproduces **{reproduced} of {len(checked)}** "
            f"hand-written specs ({100 * reproduced / max(len(checked), 1):.0f} %): {counts['same']} field for field, "
            f"{counts['equivalent']} differing only in fields the battery shows to be unobservable for that router "
            "(the hand"
        ),
        f"spec passes every probe too). {counts['seam']} families keep a seam of their own in `adapters/hf.py` (their",
        "router does not return `(logits, weights, ids)`); inference does not apply to them.",
        "",
        "| family | router class | inference alone | detail |",
        "|---|---|---|---|",
    ]
    for r in checked:
        verdict, detail = r["inference"]
        lines.append(f"| {r['family']} | {r['router']} | {verdict} | {detail.replace('|', chr(92) + '|')} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "MODELS.md"))
    p.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    p.add_argument("families", nargs="*", help="only these families (default: all)")
    args = p.parse_args()
    import hf_zoo

    families = args.families or hf_zoo.FAMILIES
    rows = []
    for f in families:
        row = survey(f)
        verdict = inference_verdict(f) if row["status"] == "supported" and row["spec"] == "hand-written" else ("", "")
        row["inference"] = verdict if verdict[0] else ""
        print(f"{f:28s} {row['status']:10s} {row['note'][:90]}", file=sys.stderr)
        rows.append(row)
    text = render(rows)
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale; run scripts/gen_models_md.py", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
