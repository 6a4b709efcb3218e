"""``routereplay check``: measure rollout-vs-trainer routing mismatch and show that replay closes it.

On the built-in randomly initialised Qwen3-MoE-style model (the default), the built-in small
Qwen3-MoE trained on multi-digit addition (``--trained``: ``routereplay/data/small_moe``, written by
``scripts/train_small_moe.py``), or ``--model DIR``, a local HF MoE checkpoint. The report's
``model`` line says which one ran.

Decision: the default is the random model because it is the one whose run shows both halves of
what replay fixes. bf16-vs-fp32 arithmetic flips 6-10 % of its routes and replay cuts k3 10-25x
(seeds 0-2). The trained model answers its own prompts near-certainly, so a flipped route leaves
the sampled token's log-prob where it was (k3 ~1e-12 with and without replay); on prompts longer
than it was trained on it is unsure, but then the dense layers' bf16 error on a few tokens
dominates k3, and replay divided it by anything from 0.84 (up) to 350 from seed to seed (docs/CHECK.md).

1. **rollout**: sample completions with ``generate`` in ``--rollout-dtype`` (bf16), capturing
   routes the way inference engines return them, and the sampled tokens' log-probs;
2. **without replay**: a trainer forward in ``--train-dtype`` (fp32) over the same tokens, right
   padded: routing agreement and log-prob mismatch against the rollout (response tokens);
3. **with R3 replay**: the same forward replaying the rollout's routes; the routes the experts
   actually received are tapped and compared: disagreement must be exactly 0;
4. **noise floor**: the trainer forward of each sample alone vs the batched forward (no
   replay): the mismatch that batch composition alone causes, which no routing fix removes;
5. **R2 drift**: one AdamW step on ``-mean logp(response)``, then old vs new policy routing.

Writes ``report.json``, ``per_layer_disagreement.png`` and ``delta_hist.png`` to ``--out`` and
prints a table. Exit status 0 when replay reproduces the rollout's routes exactly, 1 when it
does not, 2 on a usage / environment error (one line on stderr), 3 on an internal error.
``delta = logp_train - logp_infer`` throughout.

Legend (shape suffixes used in this file):
    B  samples;  P  padded prompt length;  G  generated positions;  S  padded sample length
    T  packed tokens of all samples;  V  vocabulary;  L  MoE layers;  K  top-k
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from routereplay.core.errors import RouteReplayError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
INSTALL = "pip install 'routereplay[hf,plot,cli]'"


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSize:
    """Shape of the built-in model."""

    layers: int
    hidden: int
    experts: int
    top_k: int
    vocab: int
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    moe_intermediate: int = 64


DEFAULT_SIZE = ModelSize(layers=6, hidden=128, experts=32, top_k=4, vocab=1024)
TINY_SIZE = ModelSize(
    layers=2, hidden=32, experts=8, top_k=2, vocab=64, heads=2, kv_heads=1, head_dim=16, moe_intermediate=16
)
# Weight init std. HF's default 0.02 gives a near-uniform next-token distribution on a random
# model. With 0.1 the bf16-rollout vs fp32-trainer mismatch lands where the R3 paper measured
# real MoE models (k3 about 2e-3, several % of routes differ); 0.2 exaggerates it (k3 about 7e-2).
INIT_STD = 0.1
EOS_ID, PAD_ID = 1, 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="DIR", help="local HF MoE checkpoint directory (default: the built-in random model)"
    )
    parser.add_argument(
        "--trained", action="store_true",
        help="use the built-in model trained on multi-digit addition (near-certain answers: k3 stays ~1e-12)",
    )
    parser.add_argument("--random", action="store_true", help="use the built-in random model (the default)")
    parser.add_argument(
        "--rollout-dtype", choices=DTYPES, default="bf16", help="dtype of the generating model (default bf16)"
    )
    parser.add_argument(
        "--train-dtype", choices=DTYPES, default="fp32", help="dtype of the training model (default fp32)"
    )
    parser.add_argument("--samples", type=int, default=8, help="prompts to sample (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per sample (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in model, prompts and sampling")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", default="./routereplay-check", help="output directory (default ./routereplay-check)")
    parser.add_argument(
        "--lr", type=float, default=1e-4, help="AdamW learning rate of the R2 drift step (default 1e-4)"
    )
    # Test-size model; not part of the documented interface.
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def _missing_deps() -> list[str]:
    return [name for name in ("transformers", "matplotlib", "tqdm") if importlib.util.find_spec(name) is None]


def build_default_model(size: ModelSize = DEFAULT_SIZE, *, seed: int = 0, init_std: float = INIT_STD) -> Any:
    """The built-in Qwen3-MoE-style model: random weights from a fixed seed, fp32, eval mode."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=2 * size.hidden,
        moe_intermediate_size=size.moe_intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim,
        num_experts=size.experts,
        num_experts_per_tok=size.top_k,
        norm_topk_prob=True,
        initializer_range=init_std,
        max_position_embeddings=1024,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config).eval()


class _UsageError(Exception):
    """An argument ``check`` cannot run with: one line on stderr, exit status 2 (never 1)."""


def _load_model(path: str, *, what: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        # Config without a known model_type, missing weights, a tokenizer-only folder, ...
        fix = "pass a local Hugging Face MoE checkpoint directory"
        if what is not None:
            fix = "reinstall routereplay, or run with --random"
        raise _UsageError(
            f"{what or '--model ' + path}: transformers could not load a causal LM from it "
            f"({type(e).__name__}: {_first_line(e)}); {fix}"
        ) from None
    return model.eval()


@dataclass(frozen=True, kw_only=True, slots=True)
class _Chosen:
    """The model ``check`` runs on and what goes with it."""

    model: Any
    kind: str  # "trained" (built-in), "random" (built-in) or "local" (--model)
    description: str
    eos: Any
    pad: int
    task: Any  # routereplay.data.addition.AdditionTask when the model has a char tokenizer, else None


def _shape(config: Any) -> str:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    parts = [
        f"{getattr(c, 'num_hidden_layers', '?')} layers", f"hidden {getattr(c, 'hidden_size', '?')}",
        f"{getattr(c, 'num_experts', getattr(c, 'num_local_experts', '?'))} experts",
        f"top-{getattr(c, 'num_experts_per_tok', '?')}", f"vocab {getattr(c, 'vocab_size', '?')}",
    ]
    return ", ".join(parts)


def _choose_model(args: argparse.Namespace) -> _Chosen:
    """``--model DIR``; else the packaged trained model with ``--trained``; else the random model (the
    test-size one with ``--tiny``). Never a silent swap: the description says which.

    Raises:
        _UsageError: ``--trained`` and the package holds no trained weights.
    """
    from routereplay.data import addition

    trained = addition.trained_model_dir() if args.trained else None
    if args.trained and trained is None:
        raise _UsageError(
            "--trained: the trained model is not installed (no weights in routereplay/data/small_moe); "
            "reinstall routereplay, or run without --trained on the built-in random model"
        )
    path = args.model or trained
    if path is None:
        size = TINY_SIZE if args.tiny else DEFAULT_SIZE
        desc = (
            f"built-in random Qwen3-MoE ({size.layers} layers, hidden {size.hidden}, {size.experts} experts, "
            f"top-{size.top_k}, vocab {size.vocab}, seed {args.seed})"
        )
        return _Chosen(model=build_default_model(size, seed=args.seed), kind="random", description=desc,
                       eos=EOS_ID, pad=PAD_ID, task=None)
    model = _load_model(path, what=None if args.model else f"the built-in trained model ({path})")
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    pad = pad if pad is not None else (eos if isinstance(eos, int) else (eos or [0])[0])
    task = None
    if os.path.isfile(os.path.join(path, addition.TOKENIZER_FILE)):
        _, task = addition.load_tokenizer(path)
    if trained:
        desc = f"built-in trained Qwen3-MoE ({_shape(model.config)}; addition, up to {task.max_digits} digits)"
    else:
        desc = path + (f" (addition prompts, up to {task.max_digits} digits)" if task is not None else "")
    return _Chosen(model=model, kind="trained" if trained else "local", description=desc, eos=eos, pad=pad, task=task)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What makes the arguments unusable, in one line, or None. Checked before any model is built."""
    if args.samples < 1 or args.max_new_tokens < 1:
        return "--samples and --max-new-tokens must be at least 1"
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        return f"--device {args.device!r} is not a torch device; use cpu, cuda, cuda:N, mps or xpu"
    if device.type == "meta":
        return "--device meta holds no data and cannot run a model; use cpu, cuda, cuda:N, mps or xpu"
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        # AssertionError: "Torch not compiled with CUDA enabled"; RuntimeError: no driver, bad ordinal.
        return (
            f"--device {args.device}: this torch cannot use it ({_first_line(e)}); "
            "use --device cpu or an available device"
        )
    chosen = [flag for flag, on in (("--model", args.model is not None), ("--random", args.random),
                                    ("--trained", args.trained)) if on]
    if len(chosen) > 1:
        return f"{' and '.join(chosen)} exclude each other; pass one of --model DIR, --random, --trained"
    if args.model is not None:
        if not os.path.exists(args.model):
            return f"--model {args.model}: no such directory; pass a local Hugging Face MoE checkpoint directory"
        if not os.path.isdir(args.model):
            return f"--model {args.model}: is a file, expected a local Hugging Face MoE checkpoint directory"
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            return (
                f"--model {args.model}: not a Hugging Face model directory (it has no config.json); "
                "pass a local MoE checkpoint directory"
            )
    return None


def builtin_prompts(num: int, vocab: int, *, seed: int) -> list[list[int]]:
    """``num`` prompts of token ids with distinct lengths (so the batch is really left-padded)."""
    g = torch.Generator().manual_seed(seed + 1)
    hi = min(vocab, 32000)
    return [torch.randint(3, hi, (5 + (3 * i) % 11,), generator=g).tolist() for i in range(num)]


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), P), pad, dtype=torch.int64)
    mask_BP = torch.zeros((len(prompts), P), dtype=torch.int64)
    for b, p in enumerate(prompts):  # one row per prompt: a loop over sequences, not tokens
        ids_BP[b, P - len(p):] = torch.tensor(p)
        mask_BP[b, P - len(p):] = 1
    return ids_BP, mask_BP


def _replay_trace(rollout: Any) -> Any:
    """The routes R3 replays in the trainer: the rollout's, as training rows (a seam for tests)."""
    return rollout.training_trace()


def _train_forward(model: Any, batch: dict, device: str) -> torch.Tensor:
    """Log-probs ``[B, S]`` of a padded batch (position ids given: HF does not derive them from the mask)."""
    from routereplay.rl.store import token_logprobs

    ids = batch["input_ids"].to(device)
    logits = model(
        input_ids=ids, attention_mask=batch["attention_mask"].to(device), position_ids=batch["position_ids"].to(device)
    ).logits
    return token_logprobs(logits, ids)


def run(args: argparse.Namespace) -> int:
    """Run the check. Returns 0 (replay exact), 1 (replay did not reproduce the routes), 2 (a
    usage or environment error, reported in one line on stderr) or 3 (an internal error)."""
    problem = _argument_problem(args)
    if problem is not None:
        print(f"routereplay check: error: {problem}", file=sys.stderr)
        return 2
    missing = _missing_deps()
    if missing:
        print(f"routereplay check needs {', '.join(missing)}: {INSTALL}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except _UsageError as e:
        print(f"routereplay check: error: {e}", file=sys.stderr)
        return 2
    except (RouteReplayError, OSError) as e:
        print(f"routereplay check: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (reported with its traceback; only the exit status changes)
        where = _raised_in_transformers(e)
        if where is not None:
            # The model's own code failed (a checkpoint transformers loads but cannot run):
            # an environment error about the model, not a routereplay bug.
            print(
                f"routereplay check: error: {_model_name(args)} failed inside transformers at {where} "
                f"({type(e).__name__}: {_first_line(e)}); check that it runs generate() with transformers alone, "
                "or pass another --model",
                file=sys.stderr,
            )
            return 2
        # A bug, not a finding: Python's own exit status for it (1) would read as "replay did
        # not reproduce the routes".
        traceback.print_exc()
        print("routereplay check: internal error (the traceback above); please report it", file=sys.stderr)
        return 3


def _package_of(filename: str) -> str | None:
    """``"transformers"`` or ``"routereplay"`` when ``filename`` is a module of that package, else None."""
    for name in ("transformers", "routereplay"):
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec is not None else []:
            if os.path.abspath(filename).startswith(os.path.join(os.path.abspath(root), "")):
                return name
    return None


def _raised_in_transformers(e: BaseException) -> str | None:
    """``file:line`` of the innermost transformers frame when that is the innermost frame of
    transformers or routereplay in ``e``'s traceback (the model's code raised, perhaps through
    torch), else None (routereplay raised, or neither package is on the stack)."""
    found = None
    for frame, lineno in traceback.walk_tb(e.__traceback__):
        package = _package_of(frame.f_code.co_filename)
        if package is not None:
            found = (package, f"{os.path.basename(frame.f_code.co_filename)}:{lineno} in {frame.f_code.co_name}")
    return found[1] if found is not None and found[0] == "transformers" else None


def _model_name(args: argparse.Namespace) -> str:
    return f"--model {args.model}" if args.model else "the built-in model"


def _run(args: argparse.Namespace) -> int:
    """The check itself (stages as in the module docstring): build the models, run the stages, write the
    report and plots, print the table. Returns 0 when replay reproduced the rollout's routes exactly, else 1."""
    from tqdm import tqdm

    from routereplay import attach

    t0 = time.perf_counter()
    device = args.device
    os.makedirs(args.out, exist_ok=True)

    # --- models -----------------------------------------------------------------------------
    chosen = _choose_model(args)
    train_model, rollout_model = _trainer_and_rollout_models(chosen.model, args, device)
    h_roll, h_train = attach(rollout_model), attach(train_model)
    vocab = _vocab_size(train_model.config)

    # The bar starts once the models are built, so that a model that cannot be loaded or
    # attached is reported on a line of its own.
    with tqdm(total=5, desc="routereplay check", unit="stage", file=sys.stderr, leave=False) as bar:
        # closed on an exception too, so that the error line is not printed into the bar's line
        # --- (a) rollout: sampled generation with route capture ---------------------------------
        bar.set_postfix_str("rollout")
        rollout, out, P = _sample(args, chosen, rollout_model, h_roll, vocab, device)
        h_roll.detach()
        del rollout_model
        resp_T = rollout.response_mask()
        logp_infer_T = _sampled_logprobs(out, P, rollout, resp_T)
        bar.update()

        # --- (b) trainer forward without replay -----------------------------------------------------
        bar.set_postfix_str("trainer forward")
        batch = rollout.padded(padding_side="right", pad_token_id=chosen.pad)
        train_trace, logp_train_T = _recorded_forward(train_model, h_train, batch, device)
        rollout_rows = rollout.training_trace()
        without = _against_rollout(rollout_rows, train_trace, logp_train_T, logp_infer_T, resp_T)
        bar.update()

        # --- (c) trainer forward with R3 replay, routes tapped independently -------------------------
        bar.set_postfix_str("R3 replay")
        with_replay, logp_r3_T = _replayed_forward(
            train_model, h_train, rollout, batch, device, rollout_rows, resp_T, logp_infer_T
        )
        bar.update()

        # --- (e) noise floor: each sample alone vs batched, no replay ------------------------------
        bar.set_postfix_str("noise floor")
        noise = _noise_floor(train_model, h_train, rollout, device, train_trace, logp_train_T, resp_T)
        bar.update()

        # --- (d) R2 drift: one optimizer step, then old vs new policy routing -----------------------
        bar.set_postfix_str("R2 drift")
        drift = _r2_drift(train_model, h_train, batch, device, args.lr, train_trace, logp_train_T, resp_T)
        h_train.detach()
        bar.update()

    # --- verdict, report, plots ---------------------------------------------------------------
    replay_exact = _replay_exact(with_replay)
    report = {
        "settings": _settings(args, chosen, device, train_trace, rollout, resp_T, t0),
        "without_replay": without,
        "with_replay": with_replay,
        "noise_floor": noise,
        "r2_drift": drift,
        "replay_exact": replay_exact,
        "delta": "logp_train - logp_infer",
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    deltas = {
        "without replay": (logp_train_T - logp_infer_T)[resp_T].numpy(),
        "with R3 replay": (logp_r3_T - logp_infer_T)[resp_T].numpy(),
    }
    _plot(args.out, list(train_trace.layer_ids), report, deltas)
    print(format_report(report, args.out))
    return 0 if replay_exact else 1


def _trainer_and_rollout_models(model: Any, args: argparse.Namespace, device: str) -> tuple[Any, Any]:
    """The trainer's model (``model`` itself, moved to ``device`` in ``--train-dtype``) and a deep copy
    of it in ``--rollout-dtype`` for the rollout."""
    train_dtype, rollout_dtype = DTYPES[args.train_dtype], DTYPES[args.rollout_dtype]
    if torch.float64 in (train_dtype, rollout_dtype) and hasattr(model, "set_experts_implementation"):
        # transformers' default grouped_mm experts kernel has no float64 path.
        model.set_experts_implementation("eager")
    train_model = model.to(device=device, dtype=train_dtype)
    rollout_model = copy.deepcopy(train_model).to(dtype=rollout_dtype)
    return train_model, rollout_model


def _vocab_size(config: Any) -> int:
    """The vocabulary size of a model's config (of its text config for a multimodal one)."""
    return config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size


def _sample(
    args: argparse.Namespace, chosen: _Chosen, model: Any, handle: Any, vocab: int, device: str
) -> tuple[Any, Any, int]:
    """(a) Sample completions with ``generate`` (seeded by ``--seed``), capturing the routes the way
    inference engines return them. Returns the rollout, ``generate``'s output (with its raw decode
    logits) and the padded prompt length P."""
    eos, pad = chosen.eos, chosen.pad
    if chosen.task is not None:
        prompts = chosen.task.prompts(args.samples, seed=args.seed + 1)
    else:
        prompts = builtin_prompts(args.samples, vocab, seed=args.seed)
    ids_BP, mask_BP = _left_pad(prompts, pad)
    torch.manual_seed(args.seed)
    with torch.no_grad(), handle.capture_generation() as cap:
        out = model.generate(
            ids_BP.to(device), attention_mask=mask_BP.to(device), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
            max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
            return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    rollout = cap.rollout(out, prompt_attention_mask=mask_BP, eos_token_id=eos, pad_token_id=pad)
    return rollout, out, ids_BP.shape[1]


def _sampled_logprobs(out: Any, P: int, rollout: Any, resp_T: torch.Tensor) -> torch.Tensor:
    """The engine's log-prob of each sampled token, from the raw (unprocessed) decode logits: packed
    ``[T]`` float64, 0 off the response."""
    logits_BGV = torch.stack(out.logits, 1).float()
    comp_BG = out.sequences[:, P:]
    logp_infer_BG = torch.log_softmax(logits_BGV, -1).gather(-1, comp_BG[..., None]).squeeze(-1).cpu()
    keep_BG = torch.arange(comp_BG.shape[1]) < rollout.completion_lens[:, None]
    logp_infer_T = torch.zeros(rollout.input_ids.numel(), dtype=torch.float64)
    logp_infer_T[resp_T] = logp_infer_BG[keep_BG].double()
    return logp_infer_T


def _real_tokens(logp_BS: torch.Tensor, batch: dict) -> torch.Tensor:
    """The log-probs of a padded batch's real tokens (its attention mask), packed ``[T]`` float64."""
    return logp_BS.cpu()[batch["attention_mask"].bool()].double()


def _recorded_forward(model: Any, handle: Any, batch: dict, device: str) -> tuple[Any, torch.Tensor]:
    """A trainer forward without replay, its routes recorded: the trace and the real tokens' log-probs."""
    with torch.no_grad(), handle.record() as rec:
        logp_BS = _train_forward(model, batch, device)
    return rec.trace(attention_mask=batch["attention_mask"]), _real_tokens(logp_BS, batch)


def _against_rollout(
    rollout_rows: Any, trace: Any, logp_T: torch.Tensor, logp_infer_T: torch.Tensor, resp_T: torch.Tensor
) -> dict:
    """A trainer forward's routing against the rollout's (response tokens, then all tokens) and its
    log-prob mismatch against the rollout's on the response."""
    from routereplay.rl.metrics import logprob_mismatch, routing_agreement

    return {
        "routing": routing_agreement(rollout_rows, trace, mask=resp_T).to_dict(),
        "routing_all_tokens": routing_agreement(rollout_rows, trace).to_dict(),
        "mismatch": logprob_mismatch(logp_T, logp_infer_T, resp_T).to_dict(),
    }


def _replayed_forward(
    model: Any, handle: Any, rollout: Any, batch: dict, device: str, rollout_rows: Any, resp_T: torch.Tensor,
    logp_infer_T: torch.Tensor,
) -> tuple[dict, torch.Tensor]:  # fmt: skip
    """(c) The trainer forward replaying the rollout's routes (R3), with the routes the experts
    received tapped. Returns the report's ``with_replay`` section and the real tokens' log-probs."""
    from routereplay.rl.store import DispatchTap, RouteStore

    store = RouteStore(handle, _replay_trace(rollout))
    # the tap sees what the experts received, independent of the replay's bookkeeping
    mask_BS_train = batch["attention_mask"]
    with (
        torch.no_grad(),
        store.replay(range(rollout.num_seqs), attention_mask=mask_BS_train) as rep,
        DispatchTap(handle) as tap,
    ):
        logp_r3_BS = _train_forward(model, batch, device)
    used_trace = tap.trace(batch["attention_mask"])
    stats = rep.stats
    logp_r3_T = _real_tokens(logp_r3_BS, batch)
    expected_rows = int(rollout_rows.valid_mask.sum())
    with_replay = {
        **_against_rollout(rollout_rows, used_trace, logp_r3_T, logp_infer_T, resp_T),
        "replayed_rows": {str(k): s.replayed for k, s in stats.items()},
        "expected_replayed_rows": expected_rows,
        "routes_observed_at": sorted(set(tap.observed_at)),
    }
    return with_replay, logp_r3_T


def _noise_floor(
    model: Any, handle: Any, rollout: Any, device: str, train_trace: Any, logp_train_T: torch.Tensor,
    resp_T: torch.Tensor,
) -> dict:  # fmt: skip
    """(e) Each sample's trainer forward alone vs the batched one (no replay): the report's ``noise_floor``."""
    from routereplay.rl.metrics import logprob_mismatch, routing_agreement

    alone = []
    with torch.no_grad(), handle.record() as rec_alone:
        for b in range(rollout.num_seqs):  # one forward per sample: the point is batch size 1
            one = rollout.padded([b])
            alone.append(_train_forward(model, one, device).cpu()[0])
    alone_trace = rec_alone.trace()
    logp_alone_T = torch.cat(alone).double()
    return {
        "routing": routing_agreement(train_trace, alone_trace, mask=resp_T).to_dict(),
        "mismatch": logprob_mismatch(logp_train_T, logp_alone_T, resp_T).to_dict(),
        "compared": "trainer forward, batched (right-padded) vs each sample alone",
    }


def _r2_drift(
    model: Any, handle: Any, batch: dict, device: str, lr: float, train_trace: Any, logp_train_T: torch.Tensor,
    resp_T: torch.Tensor,
) -> dict:  # fmt: skip
    """(d) One AdamW step on ``-mean logp(response)``, then old vs new policy: the report's ``r2_drift``."""
    from routereplay.rl.metrics import logprob_mismatch, routing_agreement

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    resp_BS = batch["response_mask"].to(device)
    loss = -(_train_forward(model, batch, device)[resp_BS]).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    new_trace, logp_new_T = _recorded_forward(model, handle, batch, device)
    return {
        "routing": routing_agreement(train_trace, new_trace, mask=resp_T).to_dict(),
        "mismatch": logprob_mismatch(logp_new_T, logp_train_T, resp_T).to_dict(),
        "optimizer": f"AdamW lr={lr}, one step on -mean logp(response)",
        "delta": "logp_new - logp_old",
    }


def _replay_exact(with_replay: dict) -> bool:
    """The verdict: the experts received exactly the rollout's routes on every token, and every layer
    replayed every row."""
    expected_rows = with_replay["expected_replayed_rows"]
    return (
        with_replay["routing_all_tokens"]["disagreement"] == 0.0
        and with_replay["routing_all_tokens"]["ordered_match"] == 1.0
        and all(v == expected_rows for v in with_replay["replayed_rows"].values())
    )


def _settings(
    args: argparse.Namespace, chosen: _Chosen, device: str, train_trace: Any, rollout: Any, resp_T: torch.Tensor,
    t0: float,
) -> dict:  # fmt: skip
    """The report's ``settings``: what ran, on what, and how long it took since ``t0``."""
    return {
        "model": chosen.description,
        "model_kind": chosen.kind,
        "rollout_dtype": args.rollout_dtype,
        "train_dtype": args.train_dtype,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "device": str(device),
        "layer_ids": list(train_trace.layer_ids),
        "top_k": train_trace.top_k,
        "num_experts": train_trace.num_experts,
        "tokens": int(rollout.input_ids.numel()),
        "response_tokens": int(resp_T.sum()),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _plot(out_dir: str, layer_ids: list, report: dict, deltas: dict) -> None:
    """Write ``per_layer_disagreement.png`` (without replay, with R3 replay, R2 drift) and
    ``delta_hist.png`` (``deltas``: label -> response tokens' deltas) to ``out_dir``."""
    from routereplay.cli import plots

    plots.plot_per_layer_disagreement(
        os.path.join(out_dir, "per_layer_disagreement.png"),
        layer_ids,
        {
            "without replay": report["without_replay"]["routing"]["per_layer_disagreement"],
            "with R3 replay": report["with_replay"]["routing"]["per_layer_disagreement"],
            "R2 drift (1 step)": report["r2_drift"]["routing"]["per_layer_disagreement"],
        },
    )
    plots.plot_delta_histogram(os.path.join(out_dir, "delta_hist.png"), deltas)


def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_report(report: dict, out_dir: str) -> str:
    """The table ``check`` prints (see docs/CHECK.md for how to read it)."""
    s = report["settings"]
    lines = [
        f"model: {s['model']}",
        (
            f"rollout {s['rollout_dtype']} -> trainer {s['train_dtype']}, {s['samples']} samples, "
            f"layers {s['layer_ids']}, top-{s['top_k']} of {s['num_experts']}"
        ),
        (
            f"{report['without_replay']['mismatch']['num_tokens']} response tokens, "
            f"{report['without_replay']['routing']['num_tokens']} of them with a rollout route to compare "
            "(a sample's last token has none)"
        ),
        "",
        f"{'':<26}{'route disagr.':>14}{'tokens any':>12}{'layers/tok':>11}{'k3':>11}{'F(2)':>9}{'max|delta|':>11}",
    ]
    rows = (
        ("without replay", report["without_replay"]),
        ("with R3 replay", report["with_replay"]),
        ("noise floor (batching)", report["noise_floor"]),
        ("R2 drift (1 step)", report["r2_drift"]),
    )
    for label, part in rows:
        r, m = part["routing"], part["mismatch"]
        lines.append(
            f"{label:<26}{_f(r['disagreement']):>14}{_f(r['token_disagreement']):>12}"
            f"{_f(r['mean_disagreeing_layers'], '.2f'):>11}"
            f"{_f(m['k3'], '.2e'):>11}{_f(m['extreme']['F(2)'], '.3f'):>9}{_f(m['max_abs_delta'], '.3f'):>11}"
        )
    w = report["with_replay"]
    lines += [
        "",
        "route disagr. = share of (token, layer) routes whose expert set differs from the rollout's; response tokens;",
        "k3 = mean(exp(delta) - 1 - delta), delta = logp_train - logp_infer (R2 row: logp_new - logp_old).",
        (
            f"replayed rows per layer: {sorted(set(w['replayed_rows'].values()))} of {w['expected_replayed_rows']} "
            f"routed rows (routes observed at the {', '.join(w['routes_observed_at'])})"
        ),
    ]
    if report["replay_exact"]:
        lines.append(
            "PASS: R3 replay reproduces the rollout's routes exactly (disagreement 0 on every token and layer)."
        )
    else:
        lines.append("FAIL: with R3 replay the trainer's routes still differ from the rollout's; see report.json.")
    lines.append(f"wrote {os.path.join(out_dir, 'report.json')}, per_layer_disagreement.png, delta_hist.png")
    return "\n".join(lines)
