"""Issue 12 on the CPU: the addition task, ``scripts/train_small_moe.py --smoke``, check's model
selection (trained / random / --model), and ``examples/grpo_r3.py --smoke`` with its merge step.

The GPU runs themselves (``scripts/run_evidence_gpu.sh``) are recorded in docs/EVIDENCE.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the small MoE is a transformers model (pip install 'routereplay[hf]')")
pytest.importorskip("matplotlib", reason="grpo_r3.py and check plot with matplotlib (pip install 'routereplay[plot]')")
pytest.importorskip("tqdm", reason="routereplay check shows progress with tqdm (pip install 'routereplay[cli]')")

from routereplay.cli import check
from routereplay.cli.main import main as cli_main
from routereplay.core.errors import RouteReplayError
from routereplay.data import addition

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the task ---------------------------------------------------------------------------------------
def test_addition_task_round_trip_and_reward():
    task = addition.AdditionTask(max_digits=3)
    tok = task.tokenizer
    ids, prompt_len = task.sample_ids(123, 45)
    assert tok.decode(ids[prompt_len:]) == "168" and ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:prompt_len]) == "123+45="
    assert task.reward(123, 45, ids[prompt_len:]) == 1.0
    assert task.reward(123, 45, ids[prompt_len:-1]) == 0.0  # no EOS
    assert task.reward(123, 45, [*ids[prompt_len:], tok.eos_token_id]) == 0.0
    problems = task.problems(2000, generator=torch.Generator().manual_seed(0))
    digits = {len(str(x)) for pair in problems for x in pair}
    assert digits == {1, 2, 3}
    assert task.prompts(4, seed=1) == task.prompts(4, seed=1) != task.prompts(4, seed=2)


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(RouteReplayError, match="char_tokenizer.json: cannot read the char tokenizer"):
        addition.load_tokenizer(tmp_path)
    (tmp_path / "char_tokenizer.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(RouteReplayError, match="expected format 'routereplay-char-tokenizer' version 1, found 'other'"):
        addition.load_tokenizer(tmp_path)
    with pytest.raises(RouteReplayError, match=r"\['x'\] not in the alphabet"):
        addition.CharTokenizer().encode("1x")


def test_package_data_ships_the_checkpoint_directory():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'routereplay = ["py.typed", "data/small_moe/*"]' in text


# --- training (smoke) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("small_moe")
    log = _load("scripts/train_small_moe.py").main(["--smoke", "--out", str(out), "--device", "cpu"])
    return out, log


def test_train_smoke_writes_a_loadable_bf16_checkpoint(smoke_checkpoint):
    from transformers import AutoModelForCausalLM

    out, log = smoke_checkpoint
    assert set(addition.TRAINED_FILES) <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["steps"] == log["steps"] == 12 and saved["settings"]["smoke"] is True
    for when in ("router_stats_before", "router_stats_after"):
        for key in ("load_entropy", "token_entropy", "margin"):
            values = saved[when][key]
            assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values), (when, key, values)
    assert saved["curve"][0]["step"] == 1 and math.isfinite(saved["curve"][-1]["loss"])
    assert saved["curve"][-1]["aux"] > 0  # the load-balancing loss is on
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 8
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tok, task = addition.load_tokenizer(out)
    assert tok == addition.CharTokenizer() and task.max_digits == 3


# --- check's model selection -----------------------------------------------------------------------
def _args(**kw) -> argparse.Namespace:
    base = {"model": None, "random": False, "trained": False, "tiny": False, "seed": 0}
    return argparse.Namespace(**{**base, **kw})


def test_check_runs_the_trained_model_when_installed(smoke_checkpoint, monkeypatch, tmp_path):
    out, _ = smoke_checkpoint
    monkeypatch.setattr(addition, "trained_model_dir", lambda: str(out))
    code = cli_main(["check", "--trained", "--samples", "2", "--max-new-tokens", "4", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["model_kind"] == "trained"
    assert report["settings"]["model"] == (
        "built-in trained Qwen3-MoE (2 layers, hidden 32, 8 experts, top-2, vocab 15; addition, up to 3 digits)"
    )
    assert report["with_replay"]["routing"]["disagreement"] == 0.0


def test_check_default_is_the_random_model_and_trained_needs_weights(smoke_checkpoint, monkeypatch):
    out, _ = smoke_checkpoint
    monkeypatch.setattr(addition, "trained_model_dir", lambda: str(out))
    for args in (_args(), _args(random=True)):  # installed trained weights or not, the default is random
        chosen = check._choose_model(args)
        assert chosen.kind == "random" and chosen.description.startswith("built-in random Qwen3-MoE (6 layers")
    assert check._choose_model(_args(trained=True)).kind == "trained"
    monkeypatch.setattr(addition, "trained_model_dir", lambda: None)
    with pytest.raises(check._UsageError) as e:
        check._choose_model(_args(trained=True))
    assert str(e.value) == (
        "--trained: the trained model is not installed (no weights in routereplay/data/small_moe); "
        "reinstall routereplay, or run without --trained on the built-in random model"
    )
    local = check._choose_model(_args(model=str(out)))
    assert local.kind == "local" and local.description == f"{out} (addition prompts, up to 3 digits)"


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--random", "--model", "."], "--model and --random"), (["--trained", "--random"], "--random and --trained")],
)
def test_check_model_choices_exclude_each_other(capsys, tmp_path, flags, named):
    assert cli_main(["check", *flags, "--out", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"routereplay check: error: {named} exclude each other; pass one of --model DIR, --random, --trained\n"
    )


def test_packaged_weights_are_not_faked():
    """The package holds either the real trained files (all of them, with their log) or none."""
    directory = ROOT / "src" / "routereplay" / "data" / "small_moe"
    present = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    if "model.safetensors" in present:
        assert set(addition.TRAINED_FILES) <= present
        log = json.loads((directory / "train_log.json").read_text())
        assert log["settings"]["smoke"] is False and log["steps"] > 0
        assert (directory / "model.safetensors").stat().st_size < 16 * 2**20
    else:
        assert addition.trained_model_dir() is None


# --- GRPO example (smoke) ---------------------------------------------------------------------------
def test_grpo_smoke_runs_and_r3_has_zero_disagreement(tmp_path):
    grpo = _load("examples/grpo_r3.py")
    runs_dir, merged_dir = tmp_path / "runs", tmp_path / "merged"
    grpo.main(["--smoke", "--arms", "R0,R2,R3", "--mini-steps", "2", "--out", str(runs_dir), "--no-combine",
               "--device", "cpu"])
    assert sorted(p.name for p in runs_dir.iterdir()) == [
        "run_R0_m2_fp32_s0.json", "run_R2_m2_fp32_s0.json", "run_R3_m2_fp32_s0.json"
    ]
    merged = grpo.main(["--combine", str(runs_dir), "--out", str(merged_dir)])
    assert json.loads((merged_dir / "grpo.json").read_text())["summary"] == merged["summary"]
    data = (merged_dir / "grpo_m2.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    by_arm = {r["config"]["arm"]: r for r in merged["runs"]}
    for arm, run in by_arm.items():
        assert len(run["steps"]) == 2, arm
        for step in run["steps"]:
            assert 0.0 <= step["reward"] <= 1.0 and step["response_tokens"] > 0
            assert step["k3"] >= 0.0 and math.isfinite(step["max_abs_delta"]) and 0.0 <= step["F(2)"] <= 1.0
            assert len(step["updates"]) == 2
            for u in step["updates"]:
                assert 0.0 <= u["clip_frac"] <= 1.0 and math.isfinite(u["grad_norm"]) and u["grad_norm"] > 0
                assert (u["live_route_change"] is None) == (arm == "R0")
    r3 = by_arm["R3"]["summary"]
    assert r3["disagreement_max"] == 0.0 and r3["update_disagreement_max"] == 0.0
    # R0 and R2 route the old-policy pass live: the same routes at the same weights and batch.
    r0_first, r2_first = ([s["disagreement"] for s in by_arm[arm]["steps"]][:1] for arm in ("R0", "R2"))
    assert r0_first == r2_first
    assert set(merged["k3_ratio_R0_over_R3"]) == {"m2_fp32_s0"}
