"""The synthetic verifiable task of the built-in trained model: multi-digit addition written as text.

A sample is ``<bos>123+45=168<eos>``: the prompt is ``<bos>a+b=``, the completion the decimal sum
and ``<eos>``. Operands have 1 to ``max_digits`` digits (the number of digits uniform, then the
value uniform), so prompts have different lengths and a batch of them is really padded.

The tokenizer is one token per character over a fixed alphabet; its whole definition is a small
JSON file (``char_tokenizer.json``) next to the checkpoint, read without the Hugging Face hub:
``{"format": "routereplay-char-tokenizer", "version": 1, "pad_token_id": 0, "eos_token_id": 1,
"bos_token_id": 2, "chars": "0123456789+=", "task": {"name": "addition", "max_digits": 3}}``,
char ``i`` of ``chars`` having id ``3 + i``.

Only torch and the standard library: importing this module pulls in no transformers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources

import torch

from routereplay.core.errors import RouteReplayError

__all__ = [
    "TRAINED_FILES",
    "AdditionTask",
    "CharTokenizer",
    "load_tokenizer",
    "trained_model_dir",
]

TOKENIZER_FILE = "char_tokenizer.json"
TOKENIZER_FORMAT = "routereplay-char-tokenizer"
#: The files a trained checkpoint directory holds (``scripts/train_small_moe.py --out DIR``).
TRAINED_FILES = ("config.json", "model.safetensors", TOKENIZER_FILE, "train_log.json")


@dataclass(frozen=True, kw_only=True, slots=True)
class CharTokenizer:
    """One token per character. ``pad`` 0, ``eos`` 1, ``bos`` 2, then ``chars[i]`` = ``3 + i``."""

    chars: str = "0123456789+="
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars):
            raise RouteReplayError(f"CharTokenizer: chars must be distinct, found {self.chars!r}")

    @property
    def vocab_size(self) -> int:
        return 3 + len(self.chars)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        unknown = sorted(set(text) - set(self.chars))
        if unknown:
            raise RouteReplayError(f"CharTokenizer: {unknown} not in the alphabet {self.chars!r}")
        return ([self.bos_token_id] if bos else []) + [3 + self.chars.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        """Characters of ``ids`` up to the first EOS; special ids are dropped."""
        out = []
        for i in ids:
            if i == self.eos_token_id:
                break
            if i >= 3 and i - 3 < len(self.chars):
                out.append(self.chars[i - 3])
        return "".join(out)

    def to_dict(self, *, max_digits: int) -> dict:
        return {
            "format": TOKENIZER_FORMAT, "version": 1, "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id, "bos_token_id": self.bos_token_id, "chars": self.chars,
            "task": {"name": "addition", "max_digits": max_digits},
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class AdditionTask:
    """``a+b=`` with 1 to ``max_digits`` digit operands; reward 1 for the exact sum then EOS."""

    max_digits: int = 3
    tokenizer: CharTokenizer = CharTokenizer()

    def __post_init__(self) -> None:
        if not 1 <= self.max_digits <= 9:
            raise RouteReplayError(f"AdditionTask: max_digits must be in 1..9, found {self.max_digits}")

    def problems(self, num: int, *, generator: torch.Generator) -> list[tuple[int, int]]:
        """``num`` operand pairs: digits per operand uniform in 1..max_digits, then the value uniform."""
        d_N2 = torch.randint(1, self.max_digits + 1, (num, 2), generator=generator)
        lo_N2 = torch.where(d_N2 == 1, 0, 10 ** (d_N2 - 1))
        u_N2 = torch.rand((num, 2), generator=generator, dtype=torch.float64)
        v_N2 = lo_N2 + (u_N2 * (10**d_N2 - lo_N2)).long()
        return [(int(a), int(b)) for a, b in v_N2.tolist()]

    def prompt_ids(self, a: int, b: int) -> list[int]:
        """``<bos>a+b=`` as ids."""
        return self.tokenizer.encode(f"{a}+{b}=")

    def sample_ids(self, a: int, b: int) -> tuple[list[int], int]:
        """``<bos>a+b=sum<eos>`` as ids, and the prompt length."""
        prompt = self.prompt_ids(a, b)
        return prompt + self.tokenizer.encode(str(a + b), bos=False) + [self.tokenizer.eos_token_id], len(prompt)

    def reward(self, a: int, b: int, completion_ids: list[int]) -> float:
        """1.0 when the completion is exactly the sum's digits followed by EOS, else 0.0."""
        tok = self.tokenizer
        want = tok.encode(str(a + b), bos=False) + [tok.eos_token_id]
        return 1.0 if [int(i) for i in completion_ids] == want else 0.0

    def prompts(self, num: int, *, seed: int) -> list[list[int]]:
        """``num`` prompt id lists from a fixed seed (what ``routereplay check`` samples from)."""
        g = torch.Generator().manual_seed(seed)
        return [self.prompt_ids(a, b) for a, b in self.problems(num, generator=g)]


def load_tokenizer(directory: str | os.PathLike) -> tuple[CharTokenizer, AdditionTask]:
    """The tokenizer and task saved next to a checkpoint (``char_tokenizer.json``).

    Raises:
        RouteReplayError: the file is missing or not a routereplay char tokenizer of version 1.
    """
    path = os.path.join(directory, TOKENIZER_FILE)
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise RouteReplayError(f"{path}: cannot read the char tokenizer ({type(e).__name__}: {e})") from None
    if not isinstance(spec, dict) or spec.get("format") != TOKENIZER_FORMAT or spec.get("version") != 1:
        raise RouteReplayError(
            f"{path}: expected format {TOKENIZER_FORMAT!r} version 1, found "
            f"{spec.get('format') if isinstance(spec, dict) else type(spec).__name__!r}"
        )
    tok = CharTokenizer(
        chars=spec["chars"], pad_token_id=spec["pad_token_id"], eos_token_id=spec["eos_token_id"],
        bos_token_id=spec["bos_token_id"],
    )
    return tok, AdditionTask(max_digits=int(spec["task"]["max_digits"]), tokenizer=tok)


def trained_model_dir() -> str | None:
    """The packaged trained checkpoint (``routereplay/data/small_moe``), or None when its weights are absent."""
    path = resources.files("routereplay.data").joinpath("small_moe")
    directory = str(path)
    if all(os.path.isfile(os.path.join(directory, name)) for name in TRAINED_FILES[:3]):
        return directory
    return None
