"""``routereplay check`` end to end at a tiny size, and ``routereplay compare``.

The check runs the whole pipeline (bf16 rollout with capture, fp32 trainer with and without R3
replay, noise floor, one optimizer step) on a 2-layer model: a few seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="routereplay check needs transformers (pip install 'routereplay[hf]')")
pytest.importorskip(
    "matplotlib", reason="routereplay check writes plots with matplotlib (pip install 'routereplay[plot]')"
)
pytest.importorskip("tqdm", reason="routereplay check shows progress with tqdm (pip install 'routereplay[cli]')")

from routereplay.cli import check
from routereplay.cli.main import main
from routereplay.core import io
from routereplay.core.trace import RoutingTrace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--samples", "2", "--max-new-tokens", "4", "--tiny"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    code = main(["check", *TINY, "--out", str(out)])
    return code, out


def test_check_passes_and_writes_report_and_plots(tiny_report, capsys):
    code, out = tiny_report
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for part, metric in [
        ("without_replay", "routing"), ("without_replay", "mismatch"), ("with_replay", "routing"),
        ("with_replay", "mismatch"), ("r2_drift", "routing"), ("noise_floor", "mismatch"),
    ]:
        value = report[part][metric]["disagreement" if metric == "routing" else "k3"]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (part, metric, value)
    assert report["with_replay"]["routing"]["disagreement"] == 0.0
    assert report["with_replay"]["routing_all_tokens"]["ordered_match"] == 1.0
    assert report["replay_exact"] is True
    # bf16 rollout vs fp32 trainer: the sampled tokens' log-probs differ without replay.
    assert report["without_replay"]["mismatch"]["k3"] > 0
    assert report["without_replay"]["mismatch"]["num_tokens"] == report["settings"]["response_tokens"] > 0
    assert set(report["with_replay"]["replayed_rows"].values()) == {report["with_replay"]["expected_replayed_rows"]}
    s = report["settings"]
    assert (s["rollout_dtype"], s["train_dtype"], s["samples"], s["max_new_tokens"]) == ("bf16", "fp32", 2, 4)
    for name in ("per_layer_disagreement.png", "delta_hist.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, name


def test_check_prints_table():
    report = {
        "settings": {"model": "m", "rollout_dtype": "bf16", "train_dtype": "fp32", "samples": 2, "response_tokens": 8,
                     "layer_ids": [0, 1], "top_k": 2, "num_experts": 8},
        "with_replay": {"replayed_rows": {"0": 19, "1": 19}, "expected_replayed_rows": 19,
                        "routes_observed_at": ["experts input"]},
        "replay_exact": False,
    }
    part = {
        "routing": {"disagreement": 0.25, "token_disagreement": 0.5, "mean_disagreeing_layers": 0.5, "num_tokens": 6},
        "mismatch": {"k3": 1.5e-3, "extreme": {"F(2)": 0.125}, "max_abs_delta": 0.7, "num_tokens": 8},
    }
    for name in ("without_replay", "noise_floor", "r2_drift"):
        report[name] = part
    report["with_replay"].update(part)
    text = check.format_report(report, "out")
    assert "without replay                    0.2500      0.5000       0.50   1.50e-03    0.125      0.700" in text
    assert "8 response tokens, 6 of them with a rollout route to compare (a sample's last token has none)" in text
    assert "replayed rows per layer: [19] of 19 routed rows (routes observed at the experts input)" in text
    assert "FAIL: with R3 replay the trainer's routes still differ from the rollout's" in text


def test_check_exits_1_when_replay_does_not_reproduce_routes(tmp_path, monkeypatch):
    # Replay a wrong routing (every id shifted by one): the tapped routes then differ from the rollout's.
    def shifted(rollout):
        rows = rollout.training_trace()
        return rows.replace(check=False, experts=(rows.experts + 1) % rows.num_experts)

    monkeypatch.setattr(check, "_replay_trace", shifted)
    code = main(["check", "--samples", "1", "--max-new-tokens", "2", "--tiny", "--out", str(tmp_path)])
    assert code == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["replay_exact"] is False and report["with_replay"]["routing_all_tokens"]["disagreement"] == 1.0


def test_check_missing_dependency_names_the_pip_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(check, "_missing_deps", lambda: ["matplotlib"])
    assert main(["check", "--out", str(tmp_path)]) == 2
    assert "routereplay check needs matplotlib: pip install 'routereplay[hf,plot,cli]'" in capsys.readouterr().err


def test_check_rejects_bad_sizes(capsys, tmp_path):
    assert _usage_error(capsys, "--samples", "0", "--out", str(tmp_path)) == (
        "routereplay check: error: --samples and --max-new-tokens must be at least 1\n"
    )


# --- usage errors: one line on stderr, exit 2 (exit 1 means only "replay did not reproduce") --
def _usage_error(capsys, *argv: str) -> str:
    assert main(["check", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("nonsense", "--device 'nonsense' is not a torch device; use cpu, cuda, cuda:N, mps or xpu"),
        ("meta", "--device meta holds no data and cannot run a model; use cpu, cuda, cuda:N, mps or xpu"),
        ("cuda:0", None),
        ("cuda:64", None),
    ],
)
def test_check_device_errors(capsys, tmp_path, device, message):
    if message is None:
        if device == "cuda:0" and torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device 0, so --device cuda:0 is usable")
        message = f"--device {device}: this torch cannot use it ("
    err = _usage_error(capsys, "--device", device, "--out", str(tmp_path / "out"))
    assert err.startswith(f"routereplay check: error: {message}")
    if "this torch cannot use it" in message:
        assert err.endswith("); use --device cpu or an available device\n")
    assert not (tmp_path / "out").exists()  # refused before doing anything


def test_check_model_path_errors(capsys, tmp_path):
    missing, a_file, empty = tmp_path / "absent", tmp_path / "weights.bin", tmp_path / "empty"
    a_file.write_bytes(b"")
    empty.mkdir()
    prefix = "routereplay check: error: --model"
    assert _usage_error(capsys, "--model", str(missing)) == (
        f"{prefix} {missing}: no such directory; pass a local Hugging Face MoE checkpoint directory\n"
    )
    assert _usage_error(capsys, "--model", str(a_file)) == (
        f"{prefix} {a_file}: is a file, expected a local Hugging Face MoE checkpoint directory\n"
    )
    assert _usage_error(capsys, "--model", str(empty)) == (
        f"{prefix} {empty}: not a Hugging Face model directory (it has no config.json); "
        "pass a local MoE checkpoint directory\n"
    )


def test_check_model_that_transformers_cannot_load(capsys, tmp_path):
    unknown, no_weights = tmp_path / "unknown", tmp_path / "no_weights"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no-such-architecture"}')
    from transformers import Qwen3MoeConfig

    Qwen3MoeConfig(**_TINY_CONFIG).save_pretrained(no_weights)
    for path, cause in [(unknown, "ValueError: "), (no_weights, "OSError: ")]:
        err = _usage_error(capsys, "--model", str(path), "--out", str(tmp_path / "out"))
        assert err.startswith(
            f"routereplay check: error: --model {path}: transformers could not load a causal LM from it ({cause}"
        )
        assert err.endswith("); pass a local Hugging Face MoE checkpoint directory\n")


def test_check_model_without_moe_layers(capsys, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(**_TINY_CONFIG)).save_pretrained(dense)
    capsys.readouterr()
    assert main(["check", "--model", str(dense), *TINY, "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    # Above it, transformers' own "Loading weights" progress bar on stderr.
    last = err.rsplit("\r", 1)[-1].splitlines()[-1]
    assert out == "" and last.startswith("routereplay check: error: ")


_TINY_CONFIG = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 64,
}


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", "--samples", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "routereplay check: error: argument --samples: invalid int value: 'many' (see routereplay check --help)\n"
    )
    with pytest.raises(SystemExit) as e:
        main(["nonsense"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("routereplay: error: argument ") and err.count("\n") == 1


def test_check_internal_error_is_not_exit_1(monkeypatch, capsys, tmp_path):
    # Exit 1 means only "replay did not reproduce the routes"; a bug exits 3 with its traceback.
    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(check, "_run", broken)
    assert main(["check", *TINY, "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "ZeroDivisionError: a bug" in err
    assert "\nroutereplay check: internal error (the traceback above); please report it\n" in err


def test_check_model_failing_inside_transformers_is_a_model_error(monkeypatch, capsys, tmp_path):
    # A checkpoint that loads but whose transformers code raises while it runs: exit 2 with the
    # place, not "internal error ... please report it".
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    def rotary_of_a_broken_checkpoint(*args, **kwargs):
        raise RuntimeError("shape '[2, 4, 16]' is invalid for input of size 99")

    monkeypatch.setattr(modeling_qwen3_moe, "apply_rotary_pos_emb", rotary_of_a_broken_checkpoint)
    assert main(["check", *TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # the progress bar closed first, on a line of its own
    assert err.startswith(
        "routereplay check: error: the built-in model failed inside transformers at modeling_qwen3_moe.py:"
    )
    assert err.endswith(
        "(RuntimeError: shape '[2, 4, 16]' is invalid for input of size 99); check that it runs generate() with "
        "transformers alone, or pass another --model"
    )


def test_check_error_raised_by_routereplay_under_transformers_is_internal(monkeypatch, capsys, tmp_path):
    # The innermost frame of the two packages decides: routereplay's code (here a function whose
    # code object belongs to routereplay/replay.py) raising inside a transformers forward is ours.
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    from routereplay.runtime import replay

    scope: dict = {}
    exec(compile("def hook(*args, **kwargs):\n    raise ZeroDivisionError('a bug')\n", replay.__file__, "exec"), scope)  # noqa: S102
    monkeypatch.setattr(modeling_qwen3_moe, "apply_rotary_pos_emb", scope["hook"])
    assert main(["check", *TINY, "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "ZeroDivisionError: a bug" in err
    assert "\nroutereplay check: internal error (the traceback above); please report it\n" in err


# --- compare --------------------------------------------------------------------------------
def _trace(experts, cu=(0, 3)):
    return RoutingTrace(experts=torch.tensor(experts), cu_seqlens=torch.tensor(cu), layer_ids=(1, 3), num_experts=8)


A = [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[1, 2], [3, 0]]]
B = [[[0, 1], [3, 2]], [[4, 6], [6, 7]], [[5, 7], [0, 3]]]


def test_compare_table_and_json(tmp_path, capsys):
    a, b = tmp_path / "a.rrt", tmp_path / "b.rrt"
    io.save(_trace(A), a)
    io.save(_trace(B), b)
    assert main(["compare", str(a), str(b)]) == 1  # the traces differ
    text = capsys.readouterr().out
    assert "tokens compared: 3   top-k: 2" in text
    assert "      1        0.6667     0.5000" in text and "      3        0.0000     1.0000" in text
    assert "router-level disagreement  mean_{t,l} 1[A != B as sets]  0.3333" in text
    assert main(["compare", str(a), str(b), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["layer_ids"] == [1, 3] and result["token_disagreement"] == pytest.approx(2 / 3)


def test_compare_errors(tmp_path, capsys):
    a, b = tmp_path / "a.rrt", tmp_path / "b.rrt"
    io.save(_trace(A), a)
    io.save(_trace(B, cu=(0, 1, 3)), b)
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "a has sequence lengths [3], b has [1, 2]; the rows would be compared on the wrong tokens" in err
    assert main(["compare", str(a), str(tmp_path / "missing.rrt")]) == 2
    assert "missing.rrt" in capsys.readouterr().err


def test_header_counts_are_the_metrics_counts(tiny_report):
    # The log-prob columns cover every response token, the route columns those with a rollout route.
    _, out = tiny_report
    report = json.loads((out / "report.json").read_text())
    n_logp = report["without_replay"]["mismatch"]["num_tokens"]
    n_routes = report["without_replay"]["routing"]["num_tokens"]
    assert n_logp == report["settings"]["response_tokens"] and n_routes == n_logp - report["settings"]["samples"]
    assert report["with_replay"]["routing"]["num_tokens"] == n_routes
    header = check.format_report(report, str(out)).splitlines()[2]
    assert header == (
        f"{n_logp} response tokens, {n_routes} of them with a rollout route to compare (a sample's last token has none)"
    )
