"""`import routereplay` stays framework-free: integrations are leaf modules imported on demand."""

import subprocess
import sys

# (tqdm is left out: `import torch` itself imports it.)
FRAMEWORKS = ["transformers", "megatron", "trl", "vllm", "sglang", "verl", "matplotlib"]


def test_import_routereplay_imports_no_framework():
    code = (
        "import sys, routereplay, routereplay.layout, routereplay.io, routereplay.formats, "
        "routereplay.routing, routereplay.session, routereplay.metrics, routereplay.cli\n"
        f"loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import routereplay pulled in: {out.stdout.strip()}"


def test_public_api():
    import routereplay

    for name in ("RoutingTrace", "save", "load", "attach", "RouterSpec", "route", "errors"):
        assert hasattr(routereplay, name), name
