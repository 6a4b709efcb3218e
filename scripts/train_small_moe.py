"""Train the small Qwen3-MoE-style model that ``routereplay check`` uses by default, from scratch.

    python scripts/train_small_moe.py --out DIR                  # one GPU, about 6 minutes
    python scripts/train_small_moe.py --out DIR --smoke          # CPU, seconds (tests)

The task is multi-digit addition written as text (``routereplay.data.addition``: ``<bos>123+45=168<eos>``,
one token per character), a verifiable task GRPO can be run on (``examples/grpo_r3.py``). The
model is ``transformers.Qwen3MoeForCausalLM`` built from a config (no hub): by default 8 MoE layers,
32 experts, top-4, hidden 128, so that the bf16 checkpoint stays under 16 MB. Training: AdamW on
the cross-entropy of the answer tokens (prompt masked) plus ``router_aux_loss_coef`` times
transformers' load-balancing loss, bf16 autocast over fp32 weights, stopped at ``--max-seconds``
(or ``--steps``), whichever comes first.

Router statistics, per MoE layer, on a fixed evaluation batch (real tokens only), before and after
training and at each evaluation (``train_log.json``):

* ``load_entropy``: entropy of the share of (token, slot) assignments each expert receives, over
  ``ln E`` (1 = perfectly balanced; the load-balancing loss keeps it near 1);
* ``token_entropy``: mean entropy of each token's router softmax, over ``ln E`` (1 = uniform; a
  router that has learnt to specialise is peaked, well below 1);
* ``margin``: mean gap between the k-th and (k+1)-th router probabilities (small margins are the
  routes a numerical difference flips).

Writes to ``--out``: ``config.json``, ``generation_config.json`` and ``model.safetensors`` (bf16),
``char_tokenizer.json`` and ``train_log.json``: the directory ``src/routereplay/data/small_moe/``
ships. Needs ``transformers`` (``pip install 'routereplay[hf]'``).

Legend (shape suffixes used in this file):
    B  samples;  S  padded sample length;  N  real tokens of a batch;  E  experts;  K  top-k
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch

from routereplay.data.addition import AdditionTask, CharTokenizer

MAX_BYTES = 16 * 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write the checkpoint, tokenizer and log to")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-seconds", type=float, default=360.0, help="training time budget (default 360)")
    p.add_argument("--steps", type=int, default=100_000, help="step cap (default: the time budget decides)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef (load balancing)")
    p.add_argument("--max-digits", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--autocast", choices=["bf16", "none"], default="bf16")
    p.add_argument("--eval-every", type=float, default=30.0, help="seconds between evaluations (default 30)")
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke", action="store_true",
        help="tiny model and a few steps (CPU, seconds): 2 layers, hidden 32, 8 experts, top-2, 12 steps",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.experts, args.top_k, args.moe_intermediate = 2, 32, 8, 2, 16
        args.heads, args.kv_heads, args.head_dim = 2, 1, 16
        args.batch, args.warmup, args.eval_samples = 32, 5, 16
        args.steps, args.max_seconds = min(args.steps, 12), min(args.max_seconds, 60.0)
    return args


def build_model(args: argparse.Namespace, tok: CharTokenizer):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=tok.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        router_aux_loss_coef=args.aux_coef,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(config)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    return model


def make_batch(task: AdditionTask, num: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A right-padded batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
    samples = [task.sample_ids(a, b) for a, b in task.problems(num, generator=g)]
    S = max(len(ids) for ids, _ in samples)
    pad = task.tokenizer.pad_token_id
    ids_BS = torch.full((num, S), pad, dtype=torch.int64)
    labels_BS = torch.full((num, S), -100, dtype=torch.int64)
    for b, (ids, prompt_len) in enumerate(samples):  # one row per sample
        ids_BS[b, : len(ids)] = torch.tensor(ids)
        labels_BS[b, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return {"input_ids": ids_BS, "attention_mask": (ids_BS != pad).long(), "labels": labels_BS}


def _entropy(p_XE: torch.Tensor) -> torch.Tensor:
    return -(p_XE * p_XE.clamp_min(1e-30).log()).sum(-1)


@torch.no_grad()
def router_stats(model, batch: dict[str, torch.Tensor], top_k: int) -> dict[str, list[float]]:
    """Per-layer router statistics on ``batch``'s real tokens (see the module docstring)."""
    model.eval()
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
    )
    keep_N = batch["attention_mask"].reshape(-1).bool()
    stats: dict[str, list[float]] = {"load_entropy": [], "token_entropy": [], "margin": []}
    for logits in out.router_logits:
        probs_NE = torch.softmax(logits.float().reshape(-1, logits.shape[-1])[keep_N], -1)
        E = probs_NE.shape[-1]
        top_NK = probs_NE.topk(min(top_k + 1, E), -1)
        load_E = torch.bincount(top_NK.indices[:, :top_k].reshape(-1), minlength=E).double()
        load_E /= load_E.sum()
        stats["load_entropy"].append(float(_entropy(load_E) / math.log(E)))
        stats["token_entropy"].append(float(_entropy(probs_NE.double()).mean() / math.log(E)))
        margin = top_NK.values[:, top_k - 1] - top_NK.values[:, top_k] if top_k < E else torch.zeros(1)
        stats["margin"].append(float(margin.mean()))
    return {k: [round(v, 5) for v in vals] for k, vals in stats.items()}


@torch.no_grad()
def greedy_accuracy(model, task: AdditionTask, problems: list[tuple[int, int]], device: str, autocast) -> float:
    """Share of ``problems`` answered exactly (greedy decoding, left-padded prompts)."""
    model.eval()
    tok = task.tokenizer
    prompts = [task.prompt_ids(a, b) for a, b in problems]
    P = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), P), tok.pad_token_id, dtype=torch.int64)
    for b, p in enumerate(prompts):  # one row per prompt
        ids_BP[b, P - len(p):] = torch.tensor(p)
    with autocast():
        out = model.generate(
            ids_BP.to(device), attention_mask=(ids_BP != tok.pad_token_id).long().to(device), do_sample=False,
            max_new_tokens=task.max_digits + 2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    correct = 0
    for (a, b), row in zip(problems, out[:, P:].tolist()):
        comp = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
        correct += task.reward(a, b, comp) == 1.0
    return correct / len(problems)


def main(argv: list[str] | None = None) -> dict:
    import contextlib

    import transformers

    args = parse_args(argv)
    device = args.device
    task = AdditionTask(max_digits=args.max_digits)
    tok = task.tokenizer
    model = build_model(args, tok).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    if 2 * num_params > MAX_BYTES:
        raise SystemExit(f"train_small_moe: {num_params} parameters = {2 * num_params} bytes in bf16, over 16 MiB")
    if args.autocast == "bf16":
        def autocast():
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    g_eval = torch.Generator().manual_seed(10_000 + args.seed)
    eval_batch = {k: v.to(device) for k, v in make_batch(task, args.eval_samples, g_eval).items()}
    eval_problems = task.problems(args.eval_samples, generator=g_eval)
    g_train = torch.Generator().manual_seed(args.seed)

    with autocast():
        before = router_stats(model, eval_batch, args.top_k)
    log: dict = {
        "settings": {**vars(args), "num_params": num_params, "torch": torch.__version__,
                     "transformers": transformers.__version__, "platform": platform.platform(),
                     "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else device},
        "task": {"name": "addition", "max_digits": args.max_digits, "format": "<bos>a+b=sum<eos>"},
        "router_stats_before": before,
        "accuracy_before": greedy_accuracy(model, task, eval_problems, device, autocast),
        "curve": [],
        "evals": [],
    }
    print(f"{num_params} parameters; router stats before: {json.dumps(before)}", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0 = time.perf_counter()
    last_eval, step = t0, 0
    while step < args.steps and time.perf_counter() - t0 < args.max_seconds:
        progress = max(step / args.steps, (time.perf_counter() - t0) / args.max_seconds)
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        batch = {k: v.to(device, non_blocking=True) for k, v in make_batch(task, args.batch, g_train).items()}
        with autocast():
            out = model(**batch, output_router_logits=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 50 == 0 or step == 1 or args.smoke:
            aux = float(out.aux_loss.detach())
            loss = float(out.loss.detach())
            row = {"step": step, "seconds": round(time.perf_counter() - t0, 2), "loss": round(loss, 5),
                   "ce": round(loss - args.aux_coef * aux, 5), "aux": round(aux, 5), "lr": lr,
                   "grad_norm": round(float(grad_norm), 4)}
            log["curve"].append(row)
            if step % 500 == 0 or step == 1:
                print(json.dumps(row), flush=True)
        if time.perf_counter() - last_eval > args.eval_every:
            acc = greedy_accuracy(model, task, eval_problems, device, autocast)
            with autocast():
                stats = router_stats(model, eval_batch, args.top_k)
            log["evals"].append({"step": step, "seconds": round(time.perf_counter() - t0, 2), "accuracy": acc,
                                 "token_entropy_mean": round(sum(stats["token_entropy"]) / args.layers, 5)})
            print(json.dumps(log["evals"][-1]), flush=True)
            last_eval = time.perf_counter()

    log["steps"] = step
    log["train_seconds"] = round(time.perf_counter() - t0, 2)
    log["samples_seen"] = step * args.batch
    with autocast():
        log["router_stats_after"] = router_stats(model, eval_batch, args.top_k)
    log["accuracy_after"] = greedy_accuracy(model, task, eval_problems, device, autocast)
    # The shipped model is what a bf16 engine serves: measure it in bf16 too (no autocast).
    model.to(torch.bfloat16)
    log["accuracy_after_bf16_weights"] = greedy_accuracy(model, task, eval_problems, device, contextlib.nullcontext)

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    with open(os.path.join(args.out, "char_tokenizer.json"), "w") as f:
        json.dump(tok.to_dict(max_digits=args.max_digits), f, indent=1)
    log["files"] = {name: os.path.getsize(os.path.join(args.out, name)) for name in sorted(os.listdir(args.out))}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    b, a = log["router_stats_before"], log["router_stats_after"]
    print(f"steps {step} in {log['train_seconds']} s; accuracy {log['accuracy_before']:.3f} -> "
          f"{log['accuracy_after']:.3f} (bf16 weights {log['accuracy_after_bf16_weights']:.3f})")
    for key in b:
        print(f"{key:>14}: before {b[key]}\n{'':>14}  after  {a[key]}")
    print(f"wrote {args.out}: {log['files']}")
    return log


if __name__ == "__main__":
    main()
