"""GRPO with TRL on a small random Qwen3-MoE, with R3 routing replay, on the CPU (about a minute).

    python examples/trl_grpo_r3.py                 # R3, 4 steps; --mode R2 / none, --steps N

Everything is local: the built-in random MoE (``routereplay.cli.check.build_default_model``) and a
word-level tokenizer over its vocabulary (``t3 .. t1023``). The reward asks for many distinct
tokens. Each logged step prints the replay metrics the trainer adds to TRL's logs:
``router_replay/disagreement`` (routes the experts received vs the recorded ones: 0 under replay),
``router_replay/live_disagreement`` (routes live routing would have chosen instead),
``router_replay/coverage`` and ``router_replay/k3`` (rollout vs trainer log-prob mismatch).
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, then ``t3 .. t{vocab_size - 1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left"
    )


def distinct_tokens(completions, **kwargs):
    """Reward: the number of distinct tokens in the completion."""
    return [float(len(set(c.split()))) for c in completions]


def main(argv: list[str] | None = None) -> list[dict]:
    from datasets import Dataset
    from trl import GRPOConfig

    from routereplay.cli.check import DEFAULT_SIZE, TINY_SIZE, build_default_model
    from routereplay.integrations.trl import GRPOTrainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["R3", "R2", "none"], default="R3")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (tests)")
    parser.add_argument("--max-completion-length", type=int, default=12)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    size = TINY_SIZE if args.tiny else DEFAULT_SIZE
    model = build_default_model(size)
    tokenizer = build_tokenizer(size.vocab)
    prompts = [" ".join(f"t{3 + (11 * i + 5 * j) % (size.vocab - 3)}" for j in range(3 + i % 4)) for i in range(16)]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_r3-"), use_cpu=True, report_to=[], save_strategy="no",
        per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=2,
        num_iterations=2,  # TRL's old-policy pass runs; the 2nd iteration updates a changed policy
        gradient_checkpointing=True, max_completion_length=args.max_completion_length, max_steps=args.steps,
        learning_rate=2e-3, logging_steps=1, seed=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=distinct_tokens, args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer, router_replay=None if args.mode == "none" else args.mode,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    keys = (
        "router_replay/disagreement",
        "router_replay/live_disagreement",
        "router_replay/coverage",
        "router_replay/k3",
    )
    print(f"{'step':>4}  {'loss':>9}  " + "  ".join(f"{k.split('/')[1]:>17}" for k in keys))
    for h in logs:
        cells = [f"{h[k]:17.4g}" if k in h else f"{'-':>17}" for k in keys]
        print(f"{h['step']:>4}  {h['loss']:9.4f}  " + "  ".join(cells))
    if trainer.router_replay_handle is not None:
        trainer.router_replay_handle.detach()
    return logs


if __name__ == "__main__":
    main()
