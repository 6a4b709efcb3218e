"""GPU tier of the distributed HF contract: NCCL, bf16, deterministic algorithms (run by torchrun).

    torchrun --standalone --nproc-per-node 2 tests/gpu_distributed.py   # every case
    torchrun --standalone --nproc-per-node 1 tests/gpu_distributed.py   # one GPU: the FSDP2 cases
    RR_TRANSPORT=gloo1gpu torchrun --standalone --nproc-per-node 2 tests/gpu_distributed.py  # 2 ranks, 1 GPU

``RR_TRANSPORT=gloo1gpu`` (issue 19) puts every rank on ``cuda:LOCAL_RANK % device_count`` with one
gloo group (NCCL refuses two ranks on one GPU), so the 2-rank cases run on one lent GPU; the
transport, rank and GPU counts go into the report. ``RR_CASES=a,b`` runs only those cases (one
launch per case isolates a crash), ``RR_REPORT`` names the report file, ``RR_CKPT`` the checkpoint
folder (default under ``$OUT``). ``faulthandler`` is on: a segfault prints every thread's Python stack.

Runs the cases of tests/test_distributed_hf.py (the same code as the gloo CI suite) with one GPU
per rank, the checkpoints and reference in bf16, under ``torch.use_deterministic_algorithms``.
DistributedConfig cases need 2 ranks (their meshes are 2-way) and accelerate; at world size 1
they are reported as skipped with that reason, never silently. FSDP2 over a 1-rank mesh still
runs FSDP2's all-gather / reduce-scatter path (of one rank).

Writes ``$OUT/gpu_distributed.json`` (every rank's measurements, the verdicts, device, versions,
commit) and prints one line per check; exits 1 if any check fails.

Verdicts: routes (record, gather) must be equal, except under TP where bf16 all-reduce order may
flip up to ``TP_ROUTE_FLIPS`` of them (reported); gradients are compared with one process replaying
the routes the sharded model used (R2: its recorded ones, gathered); logits and gradients within ``BF16_RTOL`` of the
largest entry. bf16 has 8 mantissa bits (eps 7.8e-3); sharding changes the order of the bf16
sums (reduce-scatter vs accumulation in one process), which moves an entry by a few eps of the
largest one. A wrong route moves gradients by O(1).
"""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
from datetime import timedelta

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_distributed_hf as contract

BF16_RTOL = 3e-2
TP_ROUTE_FLIPS = 0.02  # share of routes a bf16 TP all-reduce may flip against one process


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _verdicts(name: str, res: dict) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) of one case on one rank."""
    if "error" in res:
        return [(f"{name}", False, res["error"])]
    tp = contract.CASES[name][1].get("tp_size", 1) > 1

    def routes(equal: bool, disagreement: float) -> tuple[bool, str]:
        # Under TP the row-wise all-reduce sums in another order than one process; in bf16 that
        # moves router inputs by an ulp and flips near-tie routes (the sharded model's own routing,
        # which R2 then replays: the gradient checks below use the routes it recorded).
        if equal:
            return True, ""
        return tp and disagreement <= TP_ROUTE_FLIPS, f"{disagreement:.2%} of (token, layer) routes differ"

    out = [
        (f"{name} record", *routes(res["record_equal"], res["record_disagreement"])),
        (
            f"{name} forced routes",
            res["forced_logits_rel_err"] <= BF16_RTOL,
            f"rel err {res['forced_logits_rel_err']:.2e}",
        ),
    ]
    for key, val in res.items():
        if key.startswith("grad_"):
            detail = f"max rel err {val['max_rel_err']:.2e} ({val['worst']})"
            if val["upstream_excluded"]:
                detail += f"; left out (transformers TP bug): {len(val['upstream_excluded'])} params"
            out.append((f"{name} {key[5:]}", val["max_rel_err"] <= BF16_RTOL, detail))
    if "r2_gather_equal" in res:
        out.append((f"{name} R2 gather", *routes(res["r2_gather_equal"], res["r2_routes_disagreement"])))
    if "pp_loss_is_none" in res:
        out.append((f"{name} PP inference only", res["pp_loss_is_none"], "loss None: transformers' PP cannot train"))
    return out


def _cases(env: str | None) -> list[str]:
    """The cases to run: every one, or the comma-separated ``RR_CASES``."""
    if not env:
        return list(contract.CASES)
    names = [n.strip() for n in env.split(",") if n.strip()]
    unknown = [n for n in names if n not in contract.CASES]
    if unknown:
        raise SystemExit(f"RR_CASES: unknown case(s) {unknown}; the cases are {list(contract.CASES)}")
    return names


def main() -> int:
    faulthandler.enable(all_threads=True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    mode = os.environ.get("RR_TRANSPORT", "nccl")
    if mode not in ("nccl", "gloo1gpu"):
        raise SystemExit(f"RR_TRANSPORT={mode!r}: expected 'nccl' or 'gloo1gpu'")
    wanted = _cases(os.environ.get("RR_CASES"))
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local % torch.cuda.device_count() if mode == "gloo1gpu" else local)
        device = torch.device("cuda", torch.cuda.current_device())
        if mode == "gloo1gpu":  # no device_id: that binds the group to one device per rank (NCCL's model)
            dist.init_process_group("gloo", timeout=timedelta(minutes=10))
        else:
            dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=10))
    else:  # a dry run of this runner on the CPU (gloo, still bf16)
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    torch.use_deterministic_algorithms(True)
    out_dir = os.environ.get("OUT", "/tmp/routereplay-gpu")
    ckpt = os.environ.get("RR_CKPT") or os.path.join(out_dir, "gpu_distributed_ckpt")
    try:
        contract.transformers.logging.set_verbosity_error()
        if rank == 0:
            contract.save_checkpoints(ckpt, dtype=torch.bfloat16)
        dist.barrier()
        has_accelerate = __import__("importlib").util.find_spec("accelerate") is not None
        names, skipped = [], {}
        for name in wanted:
            kind = contract.CASES[name][0]
            if kind == "dc" and world != 2:
                skipped[name] = f"DistributedConfig cases are 2-way meshes; world size is {world}"
            elif kind == "dc" and not has_accelerate:
                skipped[name] = "DistributedConfig needs accelerate (pip install 'routereplay[distributed]')"
            else:
                names.append(name)
        results = contract.run_cases(names, rank, world, ckpt, device, torch.bfloat16)
        gathered: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, results)
        if rank != 0:
            return 0
        verdicts = [(r, *v) for r, res in enumerate(gathered) for name in names for v in _verdicts(name, res[name])]
        for r, check, ok, detail in verdicts:
            print(f"rank {r}  {'PASS' if ok else 'FAIL'}  {check}  {detail}")
        for name, why in skipped.items():
            print(f"         SKIP  {name}: {why}")
        report = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
            "world_size": world,
            "transport": mode if device.type == "cuda" else "gloo (cpu dry run)",
            "ranks": world,
            "gpus": (world if mode == "nccl" else min(world, torch.cuda.device_count()))
            if device.type == "cuda"
            else 0,
            "torch": torch.__version__,
            "transformers": contract.transformers.__version__,
            "commit": _commit(),
            "deterministic": True,
            "dtype": "bfloat16",
            "bf16_rtol": BF16_RTOL,
            "skipped": skipped,
            "verdicts": [{"rank": r, "check": c, "passed": ok, "detail": d} for r, c, ok, d in verdicts],
            "results": gathered,
        }
        os.makedirs(out_dir, exist_ok=True)
        report_path = os.path.join(out_dir, os.environ.get("RR_REPORT", "gpu_distributed.json"))
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)
        failed = sum(not ok for _, _, ok, _ in verdicts)
        print(f"{len(verdicts) - failed} passed, {failed} failed, {len(skipped)} skipped -> {report_path}")
        return 1 if failed else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
