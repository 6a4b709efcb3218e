"""GRPO on the addition task with routing replay R0 / R2 / R3: what replay does to the train-inference mismatch.

    python examples/grpo_r3.py --device cuda --out DIR                      # every arm, the trained model
    python examples/grpo_r3.py --arms R3 --mini-steps 4 --max-seconds 120 --device cuda --out DIR
    python examples/grpo_r3.py --smoke --out DIR                            # CPU, random tiny model, seconds
    python examples/grpo_r3.py --combine RUNS_DIR --out DIR                 # merge per-run JSONs, plot

A plain loop on one device, no TRL (``Rollout``, ``RouteStore``, ``DispatchTap``, ``routereplay.rl.metrics``):

1. **rollout**: a bf16 copy of the policy (weights copied from the trainer each step) samples
   ``--group`` completions per prompt at temperature 1 with ``handle.capture_generation(logprobs=True)``;
   reward 1 for the exact sum then EOS (``routereplay.data.addition``); group-normalised advantages;
2. **old-policy pass** (no grad) of the trainer (``--train-dtypes``: fp32 weights, or bf16 autocast over
   fp32 weights) over the same tokens: R0 routes live, R2 records its routes (``store.record``), R3
   replays the rollout's (``RouteStore(handle, rollout.training_trace())``). Logged against the
   rollout: routing disagreement of the routes the experts actually received (``DispatchTap``) and
   the mismatch ``delta = logp_train - logp_rollout`` on response tokens: k3, F(2), max |delta|;
3. **updates**: the batch is cut into ``--mini-steps`` mini-batches, one AdamW step each (PPO-style,
   later mini-steps are off-policy). R0 live routing, R2 replays the old-policy pass's routes, R3 the
   rollout's. Loss: token-mean clipped surrogate ``-min(r A, clip(r, 1-eps, 1+eps) A)`` with
   ``r = exp(logp_train - logp_old)``, ``logp_old`` the rollout's log-probs (``--old-logp rollout``,
   the behaviour policy: the mismatch enters the ratio) or the old-policy pass's (``trainer``). No
   KL term. Logged per mini-step: clip fraction (share of response tokens where the clipped term is
   the one in the loss), gradient norm (before clipping to 1), disagreement and k3 against the
   rollout, and under replay the share of replayed routes live routing would have changed.

The bf16 trainer is bf16 autocast over fp32 weights; transformers' grouped-mm experts kernel is
not autocast-enabled and runs in the weights' dtype, so under autocast the experts' matmuls stay
fp32 while attention, routers and the LM head run in bf16.

Writes ``grpo.json`` (every run's per-step log, a summary per run) and ``grpo_m{M}.png`` curves to
``--out``; with ``--no-combine``, one ``run_*.json`` per run instead (merged later by ``--combine``).
Needs ``transformers`` and ``matplotlib`` (``pip install 'routereplay[hf,plot]'``).

Legend (shape suffixes used in this file):
    Q  prompts;  G  completions per prompt;  B = Q * G samples;  P  padded prompt length
    S  padded sample length;  V  vocabulary
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import json
import math
import os
import platform
import time

import torch

from routereplay.data.addition import AdditionTask, CharTokenizer

ARMS = ("R0", "R2", "R3")
COLORS = {"R0": "tab:red", "R2": "tab:orange", "R3": "tab:blue"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument(
        "--model", help="checkpoint directory with char_tokenizer.json (default: the packaged trained model)"
    )
    p.add_argument("--arms", default="R0,R2,R3", help="comma-separated subset of R0,R2,R3")
    p.add_argument("--mini-steps", default="1,4", help="comma-separated optimizer steps per rollout batch")
    p.add_argument("--train-dtypes", default="fp32", help="comma-separated: fp32 and/or bf16 (autocast)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=10_000, help="GRPO steps per run (cap; --max-seconds decides)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time budget per run (default 60)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step (default 64)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--old-logp", choices=["rollout", "trainer"], default="rollout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-combine", action="store_true", help="write one run_*.json per run, no merge or plots")
    p.add_argument("--combine", metavar="RUNS_DIR", help="merge RUNS_DIR/run_*.json into --out, plot, and exit")
    p.add_argument("--smoke", action="store_true", help="random tiny model, 2 steps per run, CPU (tests)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        p.error(f"--arms: unknown {bad}; choose from {','.join(ARMS)}")
    args.mini_steps = [int(m) for m in args.mini_steps.split(",")]
    args.train_dtypes = [d.strip() for d in args.train_dtypes.split(",")]
    if any(d not in ("fp32", "bf16") for d in args.train_dtypes):
        p.error(f"--train-dtypes: choose from fp32,bf16, found {args.train_dtypes}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke:
        args.steps, args.prompts, args.group = min(args.steps, 2), min(args.prompts, 4), min(args.group, 4)
    return args


# --- model ----------------------------------------------------------------------------------------
def load_policy(args: argparse.Namespace):
    """(fp32 trainer model, task, description): the packaged trained model, ``--model``, or (smoke) random."""
    if args.smoke:
        from routereplay.cli.check import ModelSize, build_default_model

        tok = CharTokenizer()
        size = ModelSize(layers=2, hidden=32, experts=8, top_k=2, vocab=tok.vocab_size, heads=2, kv_heads=1,
                         head_dim=16, moe_intermediate=16)
        model = build_default_model(size, seed=0)
        gen = model.generation_config
        gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
        return model, AdditionTask(max_digits=2, tokenizer=tok), "random tiny Qwen3-MoE (smoke)"
    from transformers import AutoModelForCausalLM

    from routereplay.data import addition

    path = args.model or addition.trained_model_dir()
    if path is None:
        raise SystemExit(
            "grpo_r3: the trained model is not installed (routereplay/data/small_moe has no weights); train it with "
            "scripts/train_small_moe.py --out DIR and pass --model DIR, or run --smoke"
        )
    _, task = addition.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model, task, path


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids_QP = torch.full((len(prompts), P), pad, dtype=torch.int64)
    for q, p in enumerate(prompts):  # one row per prompt
        ids_QP[q, P - len(p):] = torch.tensor(p)
    return ids_QP, (ids_QP != pad).long()


def _fwd(batch: dict, device: str) -> dict:
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}


def _digits_reward(task: AdditionTask, a: int, b: int, completion: list[int]) -> float:
    """Smoke runs only: share of the answer's characters (and EOS) right in place, so random models get signal."""
    tok = task.tokenizer
    want = tok.encode(str(a + b), bos=False) + [tok.eos_token_id]
    return sum(int(x == y) for x, y in zip(want, completion)) / len(want)


# --- one run ----------------------------------------------------------------------------------------
def run_one(args: argparse.Namespace, base_model, task: AdditionTask, *, arm: str, mini_steps: int,
            train_dtype: str, seed: int) -> dict:
    """GRPO for ``args.steps`` steps or ``args.max_seconds``; returns the run's log."""
    from routereplay import attach
    from routereplay.rl import DispatchTap, RouteStore, token_logprobs
    from routereplay.rl.metrics import logprob_mismatch, routing_agreement

    device = args.device
    tok = task.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train = copy.deepcopy(base_model).to(device=device, dtype=torch.float32).train()
    roll = copy.deepcopy(train).to(dtype=torch.bfloat16).eval()
    h_train, h_roll = attach(train), attach(roll)
    train_params = dict(train.named_parameters())
    roll_params = dict(roll.named_parameters())
    assert train_params.keys() == roll_params.keys()
    opt = torch.optim.AdamW(train.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    device_type = torch.device(device).type

    def autocast():
        if train_dtype == "bf16":
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    steps: list[dict] = []
    t0 = time.perf_counter()
    try:
        while len(steps) < args.steps and time.perf_counter() - t0 < args.max_seconds:
            t_step = time.perf_counter()
            with torch.no_grad():  # the engine serves the current policy, in bf16
                for name, p in train_params.items():
                    roll_params[name].copy_(p)
            problems = task.problems(args.prompts, generator=g)
            ids_QP, mask_QP = _left_pad([task.prompt_ids(a, b) for a, b in problems], pad)
            with torch.no_grad(), h_roll.capture_generation(logprobs=True, temperature=1.0) as cap:
                out = roll.generate(
                    ids_QP.to(device), attention_mask=mask_QP.to(device), do_sample=True, top_k=0, top_p=1.0,
                    temperature=1.0, num_return_sequences=args.group, max_new_tokens=task.max_digits + 2,
                    eos_token_id=eos, pad_token_id=pad,
                )
            rollout = cap.rollout(out, prompt_attention_mask=mask_QP, eos_token_id=eos, pad_token_id=pad)
            B = rollout.num_seqs
            cu, plen = rollout.cu_seqlens.tolist(), rollout.prompt_lens.tolist()
            ids_T = rollout.input_ids.tolist()
            reward_fn = _digits_reward if args.smoke else (lambda t, a, b, c: t.reward(a, b, c))
            rewards_B = torch.tensor([
                reward_fn(task, *problems[i // args.group], ids_T[cu[i] + plen[i]: cu[i + 1]]) for i in range(B)
            ], dtype=torch.float32)
            exact_B = torch.tensor([
                task.reward(*problems[i // args.group], ids_T[cu[i] + plen[i]: cu[i + 1]]) for i in range(B)
            ])
            r_QG = rewards_B.view(-1, args.group)
            adv_B = ((r_QG - r_QG.mean(1, keepdim=True)) / (r_QG.std(1, unbiased=False, keepdim=True) + 1e-6)).view(-1)
            batch = rollout.padded(padding_side="right", pad_token_id=pad)
            rows_trace = rollout.training_trace().to("cpu")
            all_ids = torch.arange(B)

            # Old-policy pass: the trainer on the rollout's tokens, same weights as the engine.
            if arm == "R3":
                store = RouteStore(h_train, rows_trace)
                ctx = store.replay(all_ids, attention_mask=batch["attention_mask"])
            elif arm == "R2":
                store = RouteStore(h_train)
                ctx = store.record(all_ids, attention_mask=batch["attention_mask"])
            else:
                store, ctx = None, contextlib.nullcontext()
            with torch.no_grad(), ctx, DispatchTap(h_train) as tap, autocast():
                logits_old = train(**_fwd(batch, device)).logits
            logp_old_BS = token_logprobs(logits_old, batch["input_ids"]).float().cpu()
            del logits_old
            resp_BS = batch["response_mask"]
            agree = routing_agreement(rows_trace, tap.trace(attention_mask=batch["attention_mask"]),
                                      mask=resp_BS, attention_mask=batch["attention_mask"])
            mism = logprob_mismatch(logp_old_BS, batch["rollout_logprobs"], resp_BS)

            # Updates: mini-batches, one optimizer step each.
            updates = []
            for ids in torch.randperm(B, generator=g).chunk(mini_steps):
                mb = rollout.padded(ids, padding_side="right", pad_token_id=pad)
                S = mb["input_ids"].shape[1]
                rep_ctx = (store.replay(ids, attention_mask=mb["attention_mask"]) if store is not None
                           else contextlib.nullcontext())
                with rep_ctx as rep, DispatchTap(h_train) as tap_mb, autocast():
                    logits = train(**_fwd(mb, device)).logits
                logp_BS = token_logprobs(logits, mb["input_ids"]).float()
                resp_mb = mb["response_mask"].to(device)
                old_BS = (mb["rollout_logprobs"] if args.old_logp == "rollout" else logp_old_BS[ids][:, :S]).to(device)
                ratio_BS = torch.exp(logp_BS - old_BS)
                a_B1 = adv_B[ids].to(device)[:, None]
                lo, hi = 1.0 - args.clip_eps, 1.0 + args.clip_eps
                unclipped_BS, clipped_BS = ratio_BS * a_B1, ratio_BS.clamp(lo, hi) * a_B1
                loss = -torch.minimum(unclipped_BS, clipped_BS)[resp_mb].mean()
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(train.parameters(), 1.0))
                opt.step()
                opt.zero_grad(set_to_none=True)
                clip_frac = float((clipped_BS < unclipped_BS)[resp_mb].float().mean())
                live = None
                if rep is not None:
                    st = rep.stats.values()
                    replayed = sum(s.replayed for s in st)
                    live = sum(s.disagreement for s in st) / replayed if replayed else None
                mb_rows = rows_trace.select_sequences(ids)
                mb_agree = routing_agreement(mb_rows, tap_mb.trace(attention_mask=mb["attention_mask"]),
                                             mask=mb["response_mask"], attention_mask=mb["attention_mask"])
                mb_mism = logprob_mismatch(logp_BS.detach().cpu(), mb["rollout_logprobs"], mb["response_mask"])
                updates.append({
                    "loss": float(loss.detach()), "clip_frac": clip_frac, "grad_norm": grad_norm,
                    "disagreement": mb_agree.disagreement, "k3": mb_mism.k3, "F(2)": mb_mism.extreme["F(2)"],
                    "max_abs_delta": mb_mism.max_abs_delta, "live_route_change": live,
                })
            steps.append({
                "step": len(steps), "seconds": round(time.perf_counter() - t0, 3),
                "step_seconds": round(time.perf_counter() - t_step, 3),
                "reward": float(rewards_B.mean()), "accuracy": float(exact_B.mean()),
                "response_tokens": int(resp_BS.sum()),
                "disagreement": agree.disagreement, "token_disagreement": agree.token_disagreement,
                "mean_disagreeing_layers": agree.mean_disagreeing_layers,
                "k1": mism.k1, "k3": mism.k3, "F(2)": mism.extreme["F(2)"], "max_abs_delta": mism.max_abs_delta,
                "prob_diff": mism.prob_diff,
                "clip_frac": sum(u["clip_frac"] for u in updates) / len(updates),
                "grad_norm": sum(u["grad_norm"] for u in updates) / len(updates),
                "updates": updates,
            })
    finally:
        h_train.detach()
        h_roll.detach()
    return {
        "config": {"arm": arm, "mini_steps": mini_steps, "train_dtype": train_dtype, "seed": seed},
        "steps": steps,
        "summary": summarize(steps),
    }


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def summarize(steps: list[dict]) -> dict:
    """Means over steps; ``update_disagreement_max`` is the largest over every update pass."""
    keys = ("reward", "accuracy", "disagreement", "token_disagreement", "k3", "F(2)", "max_abs_delta",
            "clip_frac", "grad_norm")
    out = {f"{k}_mean": _mean([s[k] for s in steps]) for k in keys}
    out["steps"] = len(steps)
    out["disagreement_max"] = max((s["disagreement"] for s in steps), default=None)
    out["update_disagreement_max"] = max((u["disagreement"] for s in steps for u in s["updates"]), default=None)
    out["live_route_change_mean"] = _mean([u["live_route_change"] for s in steps for u in s["updates"]])
    half = steps[len(steps) // 2:]
    out["reward_second_half"] = _mean([s["reward"] for s in half])
    return out


# --- output ----------------------------------------------------------------------------------------
def _run_name(cfg: dict) -> str:
    return f"{cfg['arm']}_m{cfg['mini_steps']}_{cfg['train_dtype']}_s{cfg['seed']}"


def combine(runs: list[dict], settings: dict, out_dir: str) -> dict:
    """Write ``grpo.json`` (settings, runs, a summary table) and the PNG curves; return the merged dict."""
    runs = sorted(runs, key=lambda r: (r["config"]["mini_steps"], r["config"]["train_dtype"],
                                       r["config"]["arm"], r["config"]["seed"]))
    table = [{**r["config"], **r["summary"]} for r in runs]
    ratios = {}
    for r0 in table:
        if r0["arm"] != "R0":
            continue
        for r3 in table:
            same = all(r3[k] == r0[k] for k in ("mini_steps", "train_dtype", "seed"))
            if r3["arm"] == "R3" and same and r0["k3_mean"] and r3["k3_mean"]:
                ratios[f"m{r0['mini_steps']}_{r0['train_dtype']}_s{r0['seed']}"] = r0["k3_mean"] / r3["k3_mean"]
    merged = {"settings": settings, "summary": table, "k3_ratio_R0_over_R3": ratios, "runs": runs}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "grpo.json"), "w") as f:
        json.dump(merged, f, indent=1)
    plot(runs, out_dir)
    return merged


def plot(runs: list[dict], out_dir: str) -> list[str]:
    """One PNG per mini-step setting: the per-step curves of every arm (bf16 trainer dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward", "reward", False), ("disagreement", "route disagreement vs rollout", False),
              ("k3", "k3 (train vs rollout)", True), ("F(2)", "F(2): |delta| > ln 2", False),
              ("max_abs_delta", "max |delta|", False), ("clip_frac", "clip fraction", False),
              ("grad_norm", "gradient norm", False), ("live_route_change", "replayed routes live would change", False)]
    written = []
    for m in sorted({r["config"]["mini_steps"] for r in runs}):
        fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
        for ax, (key, title, log) in zip(axes.flat, panels):
            for r in runs:
                c = r["config"]
                if c["mini_steps"] != m:
                    continue
                x = [s["step"] for s in r["steps"]]
                if key == "live_route_change":
                    y = [_mean([u[key] for u in s["updates"]]) for s in r["steps"]]
                else:
                    y = [s[key] for s in r["steps"]]
                y = [math.nan if v is None else v for v in y]
                if log:
                    y = [v if v and v > 0 else math.nan for v in y]
                ax.plot(x, y, color=COLORS[c["arm"]], ls="--" if c["train_dtype"] == "bf16" else "-",
                        lw=1.2, alpha=0.85, label=f"{c['arm']} {c['train_dtype']} s{c['seed']}")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("GRPO step")
            if log:
                ax.set_yscale("log")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.suptitle(f"GRPO on addition, {m} mini-step(s) per batch; delta = logp_train - logp_rollout", y=0.99)
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=min(len(labels), 6),
                   fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.9))
        path = os.path.join(out_dir, f"grpo_m{m}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.combine:
        runs = []
        for path in sorted(glob.glob(os.path.join(args.combine, "run_*.json"))):
            with open(path) as f:
                runs.append(json.load(f))
        if not runs:
            raise SystemExit(f"grpo_r3 --combine: no run_*.json in {args.combine}")
        return combine(runs, runs[0]["settings"], args.out)
    import transformers

    base, task, desc = load_policy(args)
    settings = {
        "model": desc, "device": args.device, "prompts": args.prompts, "group": args.group, "lr": args.lr,
        "clip_eps": args.clip_eps, "old_logp": args.old_logp, "max_seconds": args.max_seconds,
        "steps_cap": args.steps, "rollout_dtype": "bf16", "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "delta": "logp_train - logp_rollout",
    }
    runs = []
    os.makedirs(args.out, exist_ok=True)
    for seed in args.seeds:
        for train_dtype in args.train_dtypes:
            for m in args.mini_steps:
                for arm in args.arms:
                    run = run_one(args, base, task, arm=arm, mini_steps=m, train_dtype=train_dtype, seed=seed)
                    run["settings"] = settings
                    s = run["summary"]
                    print(f"{_run_name(run['config'])}: {s['steps']} steps, reward {s['reward_mean']:.3f}, "
                          f"disagreement {s['disagreement_mean']:.4f}, k3 {s['k3_mean']:.3e}, "
                          f"clip {s['clip_frac_mean']:.4f}", flush=True)
                    runs.append(run)
                    if args.no_combine:
                        with open(os.path.join(args.out, f"run_{_run_name(run['config'])}.json"), "w") as f:
                            json.dump(run, f)
    if args.no_combine:
        return {"settings": settings, "runs": runs}
    return combine(runs, settings, args.out)


if __name__ == "__main__":
    main()
