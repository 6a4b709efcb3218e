"""``routereplay inspect``: the summary of a .rrt file, as text and JSON, and its errors.

Legend: T tokens, L MoE layers, K top-k slots, E experts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import routereplay.core.io as rio
from routereplay import RoutingTrace
from routereplay.cli import inspect as cli_inspect
from routereplay.cli.main import main

GOLDEN = Path(__file__).parent / "data" / "golden_v1.rrt"

GOLDEN_TEXT = """\
file         {path}
size         473 bytes (8 + header 416 + data 49)
format       routereplay.trace version 1, crc32 3310664a verified
sequences    2 (length min 2, mean 2.5, max 3)
tokens       3 valid / 5 total
layers       2: [1, 3]
top-k        2
experts      8
dtype        uint8
gates        none
bytes/token  5 (ids 4, valid mask 1, gates 0)
meta         model=tiny-moe
             source=routereplay tests

expert load per layer (share of assignments; uniform = 12.5%)
layer  assignments  min share  max share  entropy
    1            6         0%      16.7%    0.862
    3            6         0%      16.7%    0.862
"""


def inspect(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_text_summary_of_the_golden_file(capsys):
    code, out, err = inspect(capsys, GOLDEN)
    assert (code, err) == (0, "")
    assert out == GOLDEN_TEXT.format(path=GOLDEN)


def test_a_1_2_file_says_its_writer_checked_the_rows(capsys):
    golden_1_2 = GOLDEN.with_name("golden_v1_2.rrt")
    code, out, _ = inspect(capsys, golden_1_2)
    assert code == 0
    assert "format       routereplay.trace version 1.2, crc32 45de96fe verified, rows checked by its writer\n" in out
    assert json.loads(inspect(capsys, golden_1_2, "--json")[1])["rows_checked"] is True
    assert json.loads(inspect(capsys, GOLDEN, "--json")[1])["rows_checked"] is False


def test_json_summary_of_the_golden_file(capsys):
    code, out, _ = inspect(capsys, GOLDEN, "--json")
    assert code == 0
    s = json.loads(out)
    assert {k: s[k] for k in ("file_size", "header_size", "data_size", "version", "checksum")} == {
        "file_size": 473,
        "header_size": 416,
        "data_size": 49,
        "version": "1",
        "checksum": "3310664a",
    }
    assert (s["num_seqs"], s["num_tokens"], s["num_valid_tokens"], s["layer_ids"]) == (2, 5, 3, [1, 3])
    assert (s["top_k"], s["num_experts"], s["dtype"], s["gates_dtype"], s["bytes_per_token"]) == (
        2,
        8,
        "uint8",
        None,
        5,
    )
    assert s["meta"] == {"model": "tiny-moe", "source": "routereplay tests"}
    # layer 1 routes valid rows to experts {0,1}, {7,6}, {3,5}: six experts once each
    layer = s["layers"][0]
    assert (layer["layer_id"], layer["assignments"], layer["min_share"]) == (1, 6, 0.0)
    assert layer["max_share"] == pytest.approx(1 / 6)
    assert layer["entropy"] == pytest.approx(math.log(6) / math.log(8))


def save(tmp_path: Path, trace: RoutingTrace) -> Path:
    path = tmp_path / "t.rrt"
    rio.save(trace, path, fsync=False)
    return path


def test_skewed_load_and_empty_layers(tmp_path, capsys):
    # 4 experts, top-1: expert 2 gets 3 of 4 tokens, expert 0 one, experts 1 and 3 none.
    trace = RoutingTrace(
        experts=torch.tensor([[[2]], [[2]], [[0]], [[2]]]),
        cu_seqlens=torch.tensor([0, 4]),
        layer_ids=[5],
        num_experts=4,
        gates=torch.ones(4, 1, 1, dtype=torch.bfloat16),
    )
    s = json.loads(inspect(capsys, save(tmp_path, trace), "--json")[1])
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert s["layers"] == [
        {
            "layer_id": 5,
            "assignments": 4,
            "min_share": 0.0,
            "max_share": 0.75,
            "entropy": pytest.approx(float(-(p * p.log()).sum()) / math.log(4)),
        },
    ]
    assert (s["gates_dtype"], s["bytes_per_token"]) == ("bfloat16", 1 + 2)

    # no valid row at all: shares are undefined, shown as null / "-"
    none_valid = RoutingTrace(
        experts=torch.zeros(2, 1, 1, dtype=torch.long),
        cu_seqlens=torch.tensor([0, 2]),
        layer_ids=[0],
        num_experts=4,
        valid=torch.zeros(2, dtype=torch.bool),
    )
    path = save(tmp_path, none_valid)
    s = json.loads(inspect(capsys, path, "--json")[1])
    assert s["layers"] == [{"layer_id": 0, "assignments": 0, "min_share": None, "max_share": None, "entropy": None}]
    assert s["num_valid_tokens"] == 0
    out = inspect(capsys, path)[1]
    assert out.endswith("    0            0          -          -        -\n")


def test_single_expert_and_empty_trace(tmp_path, capsys):
    one = RoutingTrace(
        experts=torch.zeros(3, 2, 1, dtype=torch.long), cu_seqlens=torch.tensor([0, 3]), layer_ids=[0, 1], num_experts=1
    )
    s = json.loads(inspect(capsys, save(tmp_path, one), "--json")[1])
    assert [layer["entropy"] for layer in s["layers"]] == [1.0, 1.0]  # one expert: uniform by convention
    empty = RoutingTrace(
        experts=torch.zeros(0, 1, 2, dtype=torch.long), cu_seqlens=torch.tensor([0]), layer_ids=[3], num_experts=8
    )
    code, out, _ = inspect(capsys, save(tmp_path, empty))
    assert code == 0 and "sequences    0\n" in out and "tokens       0 valid / 0 total" in out


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    T=st.integers(0, 9),
    L=st.integers(1, 3),
    E=st.integers(2, 6),
    chunk=st.integers(1, 4),
    masked=st.booleans(),
)
def test_expert_counts_match_one_hot_sum(seed, T, L, E, chunk, masked):
    g = torch.Generator().manual_seed(seed)
    K = min(2, E)
    experts_TLK = torch.rand(T, L, E, generator=g).argsort(-1)[..., :K]
    valid_T = torch.rand(T, generator=g) < 0.6 if masked else None
    trace = RoutingTrace(
        experts=experts_TLK, cu_seqlens=torch.tensor([0, T]), layer_ids=range(L), num_experts=E, valid=valid_T
    )
    expected_LE = torch.nn.functional.one_hot(trace.experts.long(), E)[trace.valid_mask].sum((0, 2))
    old = cli_inspect._CHUNK_ROWS
    cli_inspect._CHUNK_ROWS = chunk  # exercise the chunk boundaries
    try:
        counts_LE = cli_inspect.expert_counts(trace)
    finally:
        cli_inspect._CHUNK_ROWS = old
    assert torch.equal(counts_LE, expected_LE.reshape(L, E))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    T=st.integers(0, 9),
    L=st.integers(1, 3),
    E=st.sampled_from([2, 5, 40, 300]),
    chunk=st.integers(1, 4),
    masked=st.booleans(),
)
def test_sparse_counts_give_the_dense_summary(seed, T, L, E, chunk, masked):
    # Above a size, inspect counts only the experts that occur; both ways give the same summary.
    g = torch.Generator().manual_seed(seed)
    K = min(2, E)
    experts_TLK = torch.rand(T, L, E, generator=g).argsort(-1)[..., :K]
    valid_T = torch.rand(T, generator=g) < 0.6 if masked else None
    trace = RoutingTrace(
        experts=experts_TLK, cu_seqlens=torch.tensor([0, T]), layer_ids=range(L), num_experts=E, valid=valid_T
    )
    dense = cli_inspect.summarize(trace)
    old = cli_inspect._CHUNK_ROWS, cli_inspect._DENSE_COUNTS
    cli_inspect._CHUNK_ROWS, cli_inspect._DENSE_COUNTS = chunk, 0
    try:
        if L * E > trace.experts.numel():
            used = cli_inspect._used_counts(trace)
            assert sum(u.numel() for u in used) <= trace.experts.numel()  # sized by the ids, not by E
        sparse = cli_inspect.summarize(trace)
    finally:
        cli_inspect._CHUNK_ROWS, cli_inspect._DENSE_COUNTS = old
    assert sparse == dense


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from Linux /proc/self/status")
def test_file_declaring_2_31_experts_is_inspected_in_bounded_memory(tmp_path):
    # A valid file of a few hundred bytes with num_experts=2**31: dense [L, E] counts would be
    # 17 GB. Run inspect under an address-space limit of 1 GiB above what the process holds.
    top = 2**31 - 1
    trace = RoutingTrace(
        experts=torch.tensor([[[top, 0]], [[5, 0]], [[7, 6]]]),
        cu_seqlens=torch.tensor([0, 3]),
        layer_ids=[2],
        num_experts=2**31,
    )
    path = save(tmp_path, trace)
    assert path.stat().st_size < 400
    script = textwrap.dedent(
        f"""
        import re, resource, sys
        import routereplay.cli
        vm = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        sys.exit(routereplay.cli.main(["inspect", {str(path)!r}, "--json"]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    s = json.loads(done.stdout)
    assert (s["num_experts"], s["file_size"]) == (2**31, path.stat().st_size)
    # 6 assignments over 5 experts out of 2**31: minimum share 0, maximum 2/6 (expert 0).
    assert s["layers"] == [
        {
            "layer_id": 2,
            "assignments": 6,
            "min_share": 0.0,
            "max_share": pytest.approx(2 / 6),
            "entropy": pytest.approx((math.log(6) - 2 / 6 * math.log(2)) / math.log(2**31)),
        }
    ]


def test_corrupt_file_exits_2(tmp_path, capsys):
    data = bytearray(GOLDEN.read_bytes())
    data[-3] ^= 0x10
    path = tmp_path / "bad.rrt"
    path.write_bytes(bytes(data))
    code, out, err = inspect(capsys, path)
    assert (code, out) == (2, "")
    assert err.startswith(f"routereplay inspect: error: {path}: checksum mismatch: the header records crc32 3310664a")

    path.write_bytes(GOLDEN.read_bytes()[:100])
    code, out, err = inspect(capsys, path, "--json")
    assert (code, out) == (2, "")
    assert f"{path}: file is truncated or its header length is corrupt" in err


def test_missing_file_exits_2(tmp_path, capsys):
    code, out, err = inspect(capsys, tmp_path / "absent.rrt")
    assert (code, out) == (2, "")
    assert err.startswith("routereplay inspect: error: [Errno 2] No such file or directory") and "absent.rrt" in err


def test_bad_ids_without_validation(tmp_path, capsys):
    # save() trusts its RoutingTrace; a trace assembled without validation can hold id 9 of 8.
    bad = RoutingTrace.unchecked(
        experts=torch.tensor([[[0, 9]], [[1, 2]]], dtype=torch.uint8),
        cu_seqlens=torch.tensor([0, 2]),
        layer_ids=(0,),
        num_experts=8,
    )
    path = save(tmp_path, bad)
    code, _, err = inspect(capsys, path)
    assert code == 2 and "expert id 9 at row 0 (sequence 0, position 0), layer 0, slot 1 is outside [0, 8)" in err
    code, _, err = inspect(capsys, path, "--no-validate")
    assert code == 2 and "rows 0 to 1 hold expert ids in [0, 9], outside [0, 8); load the trace with validation" in err
