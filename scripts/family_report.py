"""Which MoE families of the installed transformers are new to the zoo, which work, which are refused.

    make test-latest                                # the pinned env with the newest transformers, then this
    .venv/bin/python scripts/family_report.py       # against whatever transformers is installed

For every MoE model type the config registry declares (``hf_zoo.discover_moe_model_types``):
families in ``tests/hf_zoo.py`` are built from their zoo entry, new ones from a generic tiny config
(``hf_zoo``'s sizes over the family's own config class, its text CausalLM from the auto mapping).
Each is attached (hand-written spec or inference), recorded and replayed: "works" means replaying
the recorded routes gives bit-identical logits and another batch's routes change them; "refused"
carries routereplay's reason; "cannot build" carries the build error. Exit 1 if a zoo family that
the pins support fails (a regression), 0 otherwise: new families are reported, not judged.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from gen_models_md import replay_check


def _build_new(model_type: str):
    """A tiny model of a family the zoo does not know: its config class with the zoo's sizes."""
    import hf_zoo
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    config_cls = CONFIG_MAPPING[model_type]
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or MODEL_MAPPING_NAMES.get(model_type)
    if class_name is None:
        raise LookupError(f"no CausalLM or base model class is mapped for {model_type}")
    config = hf_zoo._tiny_config(config_cls, {})
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).float().eval()
    hf_zoo._perturb_routing(model, 0)
    return model


def check(model) -> tuple[str, str]:
    from routereplay import attach
    from routereplay.core.errors import RouteReplayError

    try:
        handle = attach(model)
    except RouteReplayError as e:
        return "refused", str(e)
    spec = "inferred" if any(_inferred(model, m) for m in handle.layers) else "hand-written"
    try:
        same, changed = replay_check(model, handle)
    finally:
        handle.detach()
    if same and changed:
        return "works", f"{spec} spec, layers {list(handle.layer_ids)}"
    return "FAILED", f"record->replay bit-identical: {same}; other routes change the output: {changed}"


def _inferred(model, layer) -> bool:
    from routereplay.adapters import hf_specs

    return not hf_specs.is_supported_router(model.get_submodule(layer.path))


def main() -> int:
    import hf_zoo
    import transformers

    warnings.simplefilter("ignore")
    discovered = {hf_zoo.FAMILY_OF.get(t, t) for t in hf_zoo.discover_moe_model_types()} - set(hf_zoo.NOT_FAMILIES)
    new = sorted(discovered - set(hf_zoo.FAMILIES))
    print(f"transformers {transformers.__version__}: {len(discovered)} MoE families, {len(new)} new to the zoo")
    regressions = 0
    for family in sorted(discovered | set(hf_zoo.FAMILIES)):
        is_new = family in new
        try:
            model = _build_new(family) if is_new else hf_zoo.build(family)[0]
        except Exception as e:  # noqa: BLE001 (a build failure is a row of the report)
            status, detail = "cannot build", f"{type(e).__name__}: {str(e)[:160]}"
        else:
            status, detail = check(model)
        regressions += status == "FAILED" and not is_new
        print(f"{'NEW ' if is_new else '    '}{family:28s} {status:12s} {detail[:200]}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
