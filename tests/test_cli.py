"""The ``routereplay`` command line itself: version, help, pipes, non-trace files and exit statuses.

``check`` end to end is in test_check.py, ``inspect``'s summaries in test_cli_inspect.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from routereplay.cli.main import EXIT_BROKEN_PIPE, main
from routereplay.core import io
from routereplay.core.trace import RoutingTrace

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _trace(experts, cu=(0, 3)):
    return RoutingTrace(experts=torch.tensor(experts), cu_seqlens=torch.tensor(cu), layer_ids=(1, 3), num_experts=8)


# Two sequences of 2 tokens; the traces differ only on row 1 (sequence 0's second token), layer 3.
A = [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[1, 2], [3, 0]], [[5, 6], [7, 4]]]
B = [[[1, 0], [2, 3]], [[4, 5], [6, 1]], [[1, 2], [3, 0]], [[5, 6], [4, 7]]]


@pytest.fixture
def traces(tmp_path):
    a, b = tmp_path / "a.rrt", tmp_path / "b.rrt"
    io.save(_trace(A, cu=(0, 2, 4)), a)
    io.save(_trace(B, cu=(0, 2, 4)), b)
    return str(a), str(b)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert capsys.readouterr().out == f"routereplay {version}\n"


@pytest.mark.parametrize("argv", [[], ["check"], ["inspect"], ["compare"]])
def test_help_has_no_rst_markup(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: routereplay")
    assert "`" not in out, out


def test_compare_exit_status_says_whether_routes_differ(traces, capsys):
    a, b = traces
    assert main(["compare", a, a]) == 0
    assert main(["compare", a, b]) == 1
    out = capsys.readouterr().out
    assert "tokens compared: 4   top-k: 2" in out
    # Row 0 and row 3 hold the same sets in another order: the same routes for replay.
    assert "router-level disagreement  mean_{t,l} 1[A != B as sets]  0.1250" in out


def test_compare_response_tokens_only(traces, capsys):
    a, b = traces
    # Prompts of 2 and 1 rows: only sequence 1's second token is compared, and it agrees.
    assert main(["compare", a, b, "--prompt-lens", "2,1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["num_tokens"], result["tokens"], result["disagreement"]) == (1, "response", 0.0)
    # One length for every sequence: row 1 and row 3 are compared, row 1 differs.
    assert main(["compare", a, b, "--prompt-lens", "1"]) == 1
    out = capsys.readouterr().out
    assert "tokens compared: 2 (response only)   top-k: 2" in out
    assert "router-level disagreement  mean_{t,l} 1[A != B as sets]  0.2500" in out


@pytest.mark.parametrize(
    ("lens", "message"),
    [
        ("1,1,1", "--prompt-lens: 3 lengths for 2 sequences; pass one N for all or one per sequence"),
        ("3", "--prompt-lens: sequence 0 has 2 rows, fewer than its prompt length 3"),
    ],
)
def test_compare_prompt_lens_that_do_not_fit(traces, capsys, lens, message):
    assert main(["compare", *traces, "--prompt-lens", lens]) == 2
    assert capsys.readouterr().err == f"routereplay compare: error: {message}\n"


def test_compare_prompt_lens_usage_error(traces, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", *traces, "--prompt-lens", "2,x"])
    assert e.value.code == 2
    assert (
        "argument --prompt-lens: expected N or N,N,... (non-negative integers), found '2,x'" in capsys.readouterr().err
    )


@pytest.mark.parametrize("command", ["inspect", "compare"])
@pytest.mark.parametrize(("content", "found"), [(b"", "is empty"), (b"# my notes\n", "starts with b'# my note'")])
def test_a_file_that_is_no_trace_is_named_so(tmp_path, capsys, traces, command, content, found):
    path = tmp_path / "notes.md"
    path.write_bytes(content)
    argv = [command, str(path)] if command == "inspect" else [command, traces[0], str(path)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"routereplay {command}: error: {path}: not a .rrt file: a trace file starts with an 8-byte header length "
        f"and a JSON header, this file {found}; pass a file written by routereplay.save\n"
    )


def test_output_into_a_closed_pipe_ends_quietly(traces):
    # The reader is gone before the command writes (as `| head` after its lines): no traceback.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "routereplay.cli", "compare", "--json", *traces],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    proc.stdout.close()
    err = proc.stderr.read()
    assert (proc.wait(), err) == (EXIT_BROKEN_PIPE, b"")


def test_logprob_mismatch_of_trainer_logprobs_that_require_grad():
    # What the README's DispatchTap snippet does: metrics of log-probs still in the graph.
    from routereplay.rl.metrics import logprob_mismatch

    logp_train = torch.log_softmax(torch.randn(2, 5, requires_grad=True), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = logprob_mismatch(logp_train, logp_train.detach() - 0.1, torch.ones(2, 5, dtype=torch.bool))
    assert result.k3 == pytest.approx(float(torch.expm1(torch.tensor(0.1)) - 0.1), rel=1e-5)  # float32 delta
