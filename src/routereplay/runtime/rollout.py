"""Capture the routes of ``model.generate`` as an inference engine would return them (R3 capture).

    handle = routereplay.attach(model)
    with handle.capture_generation() as cap:
        out = model.generate(input_ids, attention_mask=mask, do_sample=True, max_new_tokens=64)
    trace = cap.trace(out, prompt_attention_mask=mask, eos_token_id=eos)   # engine rows
    rollout = cap.rollout(out, prompt_attention_mask=mask)   # tokens + routes (EOS ids: the model's)
    batch = rollout.padded(ids)                              # a training micro-batch, see Rollout.padded

With ``capture_generation(logprobs=True, temperature=t)`` the capture also keeps, for every
generated token, its log-probability under the distribution it was sampled from,
``log_softmax(logits / t)`` of the forward that produced it (the raw model distribution divided by
the temperature, before top-k / top-p filtering: what vLLM reports by default). ``Rollout.logprobs``
holds them packed like ``input_ids``; ``padded()`` returns them aligned with the training batch, in
the convention of ``routereplay.rl.token_logprobs``, so ``logp_train - batch["rollout_logprobs"]``
under ``batch["response_mask"]`` is the train-inference ``delta`` of ``routereplay.rl.metrics``.

``generate`` with a KV cache runs one prefill forward over the (left-padded) prompts, ``B * P``
router rows, then one decode forward per new token, ``B`` rows each (one per sequence, finished
sequences included). The token sampled last is never forwarded, so, exactly like vLLM and
SGLang, each sequence gets ``prompt_len + completion_len - 1`` rows: the **engine convention**.
Tokens after a sequence's first EOS are dropped; the EOS token is kept as the sample's last
token, which (like every sample's last token) has no route. The EOS ids default to every id of
the model's ``generation_config.eos_token_id`` (what ``generate`` stops on unless told otherwise);
a sequence that stopped on an id ``rollout()`` was not told about raises ``EosMismatchError``
(otherwise its padding would become response tokens, silently).
``Rollout.training_trace()`` converts to **training rows** (one per token, the last row of each
sequence invalid) for a trainer's full-sequence forward.

Supported: batched left-padded prompts of different lengths, greedy and sampling,
``num_return_sequences > 1`` (generate expands each prompt ``R`` times, consecutively), EOS before
``max_new_tokens``, generation with or without a KV cache. Not supported (raise, or documented):
beam search and assisted / speculative decoding (their forwards do not map one-to-one onto the
returned tokens), one capture block around several ``generate`` calls.

Legend (shape suffixes used in this file):
    B  generated sequences (prompts x num_return_sequences)
    P  padded prompt length;  G  generated positions (``sequences.shape[1] - P``)
    S  prompt + generated positions that have a route (``P + G - 1``)
    T  tokens of the packed rollout (real prompt tokens + kept completion tokens)
    L  MoE layers;  K  top-k slots;  V  vocabulary;  X  ``sequences.shape[1]`` (P + G)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from routereplay.core.errors import EosMismatchError, GenerationCaptureError, LayoutError
from routereplay.core.index import ranges
from routereplay.core.layout import engine_to_training
from routereplay.core.trace import RoutingTrace

__all__ = ["FROM_MODEL", "GenerationCapture", "Rollout", "capture_generation", "model_eos_ids", "model_pad_id"]

#: Default of ``eos_token_id`` / ``pad_token_id``: read the ids from the generating model.
FROM_MODEL = "from_model"


def capture_generation(
    handle: Any, *, offload: bool = False, logprobs: bool = False, temperature: float = 1.0
) -> GenerationCapture:
    """Record the routes of one ``model.generate`` call.

    Args:
        handle: the ``RouterHandle`` of the generating model (``routereplay.attach(model)``).
        offload: copy ids to pinned CPU memory as they are produced (CUDA only).
        logprobs: also keep each generated token's log-probability (``Rollout.logprobs``): one
            ``[B, V]`` log-softmax is held at a time, never the logits of every step.
        temperature: the sampling temperature ``generate`` used; log-probs are those of
            ``softmax(logits / temperature)`` (top-k / top-p filtering is not applied).

    Returns:
        A :class:`GenerationCapture` context manager.

    Raises:
        GenerationCaptureError: ``temperature`` is not positive.
    """
    return GenerationCapture(handle, offload=offload, logprobs=logprobs, temperature=temperature)


def _completion_lens(comp_BG: torch.Tensor, eos_list: list[int] | None) -> torch.Tensor:
    """int64 ``[B]``: each completion's length, up to and including its first EOS, else all G tokens."""
    B, G = comp_BG.shape
    if not eos_list:
        return torch.full((B,), G, dtype=torch.int64, device=comp_BG.device)
    is_eos_BG = torch.isin(comp_BG, torch.tensor(eos_list, device=comp_BG.device))
    return torch.where(is_eos_BG.any(1), is_eos_BG.int().argmax(1), G - 1) + 1


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def model_eos_ids(model: Any) -> list[int]:
    """Every end-of-sequence id ``generate`` stops on by default: the model's
    ``generation_config.eos_token_id`` (an int or a list), else ``config.eos_token_id``; ``[]`` if none."""
    gen = getattr(model, "generation_config", None)
    ids = _id_list(getattr(gen, "eos_token_id", None))
    if not ids:
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        ids = _id_list(getattr(text, "eos_token_id", None))
    return ids


def model_pad_id(model: Any) -> int:
    """The pad id ``generate`` fills finished sequences with: ``generation_config.pad_token_id``, else
    ``config.pad_token_id``, else the first EOS id (what ``generate`` falls back to), else 0."""
    for owner in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        if owner is not None and hasattr(owner, "get_text_config"):
            owner = owner.get_text_config()
        pad = getattr(owner, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    eos = model_eos_ids(model)
    return eos[0] if eos else 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Rollout:
    """Generated samples with their routes, packed (padding and post-EOS tokens removed).

    Attributes:
        input_ids: int64 ``[T]``: prompt + completion tokens of every sample, back to back.
        cu_seqlens: int64 ``[B+1]`` sample boundaries in ``input_ids``.
        prompt_lens: int64 ``[B]`` real prompt tokens per sample (completion = the rest).
        trace: RoutingTrace in the engine convention: ``seq_len - 1`` rows per sample.
        logprobs: float32 ``[T]`` or None: ``logprobs[t]`` = the rollout's log-probability of
            token ``t`` given the tokens before it, on completion tokens; 0.0 on prompt tokens
            (only with ``capture_generation(logprobs=True)``).
        pad_token_id: the id ``padded()`` fills with by default (the generating model's).

    Raises:
        LayoutError: sizes that do not fit together.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    prompt_lens: torch.Tensor
    trace: RoutingTrace
    logprobs: torch.Tensor | None = None
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        T, B = self.input_ids.numel(), self.cu_seqlens.numel() - 1
        if self.input_ids.ndim != 1 or self.cu_seqlens.ndim != 1 or int(self.cu_seqlens[-1]) != T:
            raise LayoutError(
                f"Rollout: input_ids must be [T] and cu_seqlens [B+1] ending at T, found input_ids "
                f"{tuple(self.input_ids.shape)} and cu_seqlens ending at {int(self.cu_seqlens[-1])}"
            )
        if self.prompt_lens.shape != (B,) or self.trace.num_seqs != B:
            raise LayoutError(
                f"Rollout: {B} samples but prompt_lens has shape {tuple(self.prompt_lens.shape)} and the trace "
                f"{self.trace.num_seqs} sequences"
            )
        if self.logprobs is not None and self.logprobs.shape != (T,):
            raise LayoutError(f"Rollout: logprobs must be [T] = [{T}], found {tuple(self.logprobs.shape)}")

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def seq_lens(self) -> torch.Tensor:
        """int64 ``[B]`` tokens per sample (prompt + completion)."""
        return self.cu_seqlens.diff()

    @property
    def completion_lens(self) -> torch.Tensor:
        return self.seq_lens - self.prompt_lens

    def response_mask(self) -> torch.Tensor:
        """bool ``[T]``: True on completion tokens (the tokens a policy-gradient loss scores), the
        final EOS included (the policy sampled it); False on prompt tokens."""
        pos_T = torch.arange(self.input_ids.numel()) - torch.repeat_interleave(self.cu_seqlens[:-1], self.seq_lens)
        return pos_T >= torch.repeat_interleave(self.prompt_lens, self.seq_lens)

    def training_trace(self) -> RoutingTrace:
        """The routes as training rows: one row per token, each sample's last row invalid."""
        return engine_to_training(self.trace)

    def select(self, idx: Sequence[int] | torch.Tensor) -> Rollout:
        """The samples ``idx``, in that order."""
        idx_N = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        lens_N = self.seq_lens[idx_N]
        cu = torch.zeros(idx_N.numel() + 1, dtype=torch.int64)
        torch.cumsum(lens_N, 0, out=cu[1:])
        rows_T = ranges(self.cu_seqlens[idx_N], lens_N)
        return Rollout(
            input_ids=self.input_ids[rows_T],
            cu_seqlens=cu,
            prompt_lens=self.prompt_lens[idx_N],
            trace=self.trace.select_sequences(idx_N.to(self.trace.device)),
            logprobs=None if self.logprobs is None else self.logprobs[rows_T],
            pad_token_id=self.pad_token_id,
        )

    def padded(
        self,
        idx: Sequence[int] | torch.Tensor | None = None,
        *,
        padding_side: str = "right",
        pad_token_id: int | None = None,
        width: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """A padded training batch of the samples ``idx`` (all when None), in that order.

        Layout: row ``b`` holds sample ``idx[b]``'s prompt and completion tokens back to back
        (no padding between them), padded on ``padding_side`` to the width ``S``.

        Args:
            idx: sample indices (a micro-batch); None for every sample.
            padding_side: ``"right"`` or ``"left"``.
            pad_token_id: the id of padding positions; None: the generating model's pad id
                (``self.pad_token_id``). Padding never matters to a masked forward, but a fixed
                id keeps batches reproducible.
            width: ``S``; None: the longest selected sample, so ``S`` changes from one
                micro-batch to the next. Give a width to get fixed shapes (must be >= the longest).

        Returns:
            ``input_ids`` int64 ``[B, S]``; ``attention_mask`` int64 ``[B, S]`` (1 on real tokens);
            ``response_mask`` bool ``[B, S]``: True on completion tokens, the final EOS included,
            False on prompt and padding (the tokens a policy-gradient loss scores);
            ``position_ids`` int64 ``[B, S]``: 0 at each sample's first real token, counting up
            over its real tokens, 0 on padding (HF models do not derive positions from a left-padded
            mask themselves: pass them); and, when the rollout has log-probs, ``rollout_logprobs``
            float32 ``[B, S]``: ``rollout_logprobs[b, s]`` = the rollout's log-probability of
            ``input_ids[b, s]`` given the tokens before it, on response tokens, 0.0 elsewhere: the
            same alignment as ``routereplay.rl.token_logprobs(logits, input_ids)``.

        Raises:
            LayoutError: a bad ``padding_side`` or a ``width`` below the longest sample.
        """
        if padding_side not in ("left", "right"):
            raise LayoutError(f'padding_side must be "left" or "right", found {padding_side!r}')
        part = self if idx is None else self.select(idx)
        lens_B = part.seq_lens
        B = lens_B.numel()
        longest = int(lens_B.max()) if B else 0
        S = longest if width is None else int(width)
        if S < longest:
            raise LayoutError(f"padded(width={width}) is narrower than the longest selected sample ({longest} tokens)")
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        col_S = torch.arange(S)
        start_B = torch.zeros_like(lens_B) if padding_side == "right" else S - lens_B
        pos_BS = col_S - start_B[:, None]
        mask_BS = (pos_BS >= 0) & (pos_BS < lens_B[:, None])
        input_ids = torch.full((B, S), pad, dtype=torch.int64)
        input_ids[mask_BS] = part.input_ids
        response_BS = torch.zeros((B, S), dtype=torch.bool)
        response_BS[mask_BS] = part.response_mask()
        out = {
            "input_ids": input_ids,
            "attention_mask": mask_BS.long(),
            "response_mask": response_BS,
            "position_ids": torch.where(mask_BS, pos_BS, 0),
        }
        if part.logprobs is not None:
            logp_BS = torch.zeros((B, S), dtype=torch.float32)
            logp_BS[mask_BS] = part.logprobs.float()
            out["rollout_logprobs"] = logp_BS
        return out


class GenerationCapture:
    """Context manager recording every forward of one ``generate`` call; see the module docstring."""

    def __init__(self, handle: Any, *, offload: bool = False, logprobs: bool = False, temperature: float = 1.0) -> None:
        if not float(temperature) > 0.0:
            raise GenerationCaptureError(f"temperature must be > 0 to compute log-probs, found {temperature}")
        self._handle = handle
        self._recording = handle.record(offload=offload, generation=True)
        self._done = False
        self._want_logprobs = logprobs
        self._temperature = float(temperature)
        self._hook = None
        self._lp_prev_BV: torch.Tensor | None = None  # log-softmax of the last forward's final position
        self._lp_tokens: list[torch.Tensor] = []  # per forward >= 1: the token it was fed ([B])
        self._lp_values: list[torch.Tensor] = []  # that token's log-prob under the forward before ([B])
        self._lp_error: str | None = None

    def __enter__(self) -> GenerationCapture:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if self._want_logprobs:
            # Eager on every step under torch.compile (a graph break, as the router seam's calls):
            # what it keeps must not live in a compiled step's CUDA-graph memory pool.
            hook = torch.compiler.disable(self._on_forward)
            self._hook = self._handle.model.register_forward_hook(hook, with_kwargs=True)
        try:
            self._recording.__enter__()
        except BaseException:
            self._remove_hook()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove_hook()
        self._recording.__exit__(*exc)
        self._done = True

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook of the generating model: keep one step's log-softmax, gather the next token's."""
        if torch._C._current_graph_task_id() != -1 or self._lp_error is not None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        if not isinstance(ids, torch.Tensor) or not isinstance(logits, torch.Tensor) or logits.ndim != 3:
            self._lp_error = (
                "logprobs=True needs each forward of generate() to take input_ids and return logits [B, S, V]; "
                f"a forward of {type(module).__name__} did not"
            )
            return
        with torch.no_grad():
            if self._lp_prev_BV is not None:
                tok_B = ids[:, -1].clone()
                self._lp_tokens.append(tok_B)
                self._lp_values.append(self._lp_prev_BV.gather(1, tok_B[:, None].to(self._lp_prev_BV.device))[:, 0])
            self._lp_prev_BV = torch.log_softmax(logits[:, -1].detach().float() / self._temperature, dim=-1)

    def _generated_logprobs(self, comp_BG: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, G]``: the log-prob of each generated token under the step that sampled it."""
        if self._lp_error is not None:
            raise GenerationCaptureError(self._lp_error)
        if self._lp_prev_BV is None:
            raise GenerationCaptureError("logprobs=True but no forward returned logits inside the capture block")
        G = comp_BG.shape[1]
        n = min(len(self._lp_values), G)
        if n:
            fed_BN = torch.stack(self._lp_tokens[:n], 1).to(comp_BG.device)
            bad_BN = fed_BN != comp_BG[:, :n]
            if bool(bad_BN.any()):
                b, g = (int(i) for i in bad_BN.nonzero()[0])
                raise GenerationCaptureError(
                    f"sequence {b}: decode forward {g + 1} was fed token {int(fed_BN[b, g])} but sequences holds "
                    f"{int(comp_BG[b, g])} at generated position {g}; pass the output of the generate() call made "
                    "inside this capture block"
                )
        values = [v.to(comp_BG.device) for v in self._lp_values[:n]]
        if n < G:  # the last sampled token was never forwarded: gather it from the last step
            values.append(self._lp_prev_BV.to(comp_BG.device).gather(1, comp_BG[:, G - 1 :])[:, 0])
        return torch.stack(values, 1)

    @property
    def recording(self) -> Any:
        """The underlying ``Recording`` (raw per-forward rows: ``calls``, ``batch_shapes``)."""
        return self._recording

    def trace(
        self,
        sequences: Any,
        *,
        prompt_attention_mask: torch.Tensor | None = None,
        eos_token_id: int | Sequence[int] | str | None = FROM_MODEL,
        pad_token_id: int | str | None = FROM_MODEL,
    ) -> RoutingTrace:
        """The generated samples' routes in the engine convention (``seq_len - 1`` rows each).

        Args and Raises: as :meth:`rollout`.

        Returns:
            RoutingTrace with one sequence per generated sample (prompt + completion, padding
            and tokens after the first EOS removed), ``prompt_len + completion_len - 1`` rows.
        """
        return self.rollout(
            sequences, prompt_attention_mask=prompt_attention_mask, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        ).trace

    def rollout(
        self,
        sequences: Any,
        *,
        prompt_attention_mask: torch.Tensor | None = None,
        eos_token_id: int | Sequence[int] | str | None = FROM_MODEL,
        pad_token_id: int | str | None = FROM_MODEL,
    ) -> Rollout:
        """The generated samples, packed, with their routes (and log-probs when captured).

        Args:
            sequences: ``generate``'s output: the ``[B, P + G]`` token tensor or an output object
                with ``.sequences``.
            prompt_attention_mask: the ``[B0, P]`` mask passed to ``generate`` (left padding);
                ``B0 = B / num_return_sequences``. None: the prompts had no padding.
            eos_token_id: id(s) that end a completion; the completion keeps its first EOS and
                drops what follows. Default: every id of the model's
                ``generation_config.eos_token_id`` (see :func:`model_eos_ids`). None: no EOS, every
                completion runs to the end of ``sequences``. Pass the ids ``generate`` was given
                when you overrode them.
            pad_token_id: the id ``generate`` filled finished sequences with; checked to fill every
                position after a completion's EOS (catches sequences that do not belong to this
                capture, or an EOS that ``generate`` did not stop on). Default: the model's
                (:func:`model_pad_id`), also ``Rollout.pad_token_id``. None: not checked.

        Returns:
            :class:`Rollout`.

        Raises:
            GenerationCaptureError: the recorded forwards do not match ``sequences`` (another
                ``generate`` call, beam search, assisted decoding, several calls in one block).
            EosMismatchError: a sequence stopped on an EOS id of the model that is not in
                ``eos_token_id`` (its padding would otherwise become response tokens).
            LayoutError: the prompt mask is not ``[B0, P]``, not 0/1, or not left-padded.
        """
        if not self._done:
            raise GenerationCaptureError(
                "call trace()/rollout() after the `with handle.capture_generation()` block ends"
            )
        model_eos, eos_list, pad_check, rollout_pad = self._stop_ids(eos_token_id, pad_token_id)
        seq_BX = getattr(sequences, "sequences", sequences)
        if not isinstance(seq_BX, torch.Tensor) or seq_BX.ndim != 2:
            found = tuple(seq_BX.shape) if isinstance(seq_BX, torch.Tensor) else type(seq_BX).__name__
            raise GenerationCaptureError(
                f"sequences must be generate()'s [B, prompt + new tokens] tensor, found {found}"
            )
        rows_BSLK, P = self._rows(seq_BX)
        B, G = seq_BX.shape[0], seq_BX.shape[1] - P

        prompt_BP = self._prompt_mask(prompt_attention_mask, B, P, seq_BX.device)
        comp_BG = seq_BX[:, P:]
        comp_len_B = _completion_lens(comp_BG, eos_list)
        col_G = torch.arange(G, device=seq_BX.device)
        keep_comp_BG = col_G < comp_len_B[:, None]
        if pad_check is not None:
            self._check_stops(comp_BG, comp_len_B, keep_comp_BG, eos_list, model_eos, int(pad_check))
        # Rows: every real prompt position, then completion positions 0 .. len-2 (the last token has no route).
        keep_rows_BS = torch.cat([prompt_BP, col_G[:-1] < (comp_len_B - 1)[:, None]], 1)
        keep_tok_BX = torch.cat([prompt_BP, keep_comp_BG], 1)
        prompt_lens_B = prompt_BP.sum(1).cpu()
        seq_lens_B = keep_tok_BX.sum(1).cpu()
        cu = torch.zeros(B + 1, dtype=torch.int64)
        torch.cumsum(seq_lens_B, 0, out=cu[1:])
        row_cu = torch.zeros(B + 1, dtype=torch.int64)
        torch.cumsum(seq_lens_B - 1, 0, out=row_cu[1:])
        experts_TLK = rows_BSLK[keep_rows_BS.to(rows_BSLK.device)]
        h = self._handle
        trace = RoutingTrace.unchecked(
            experts=experts_TLK,
            cu_seqlens=row_cu.to(experts_TLK.device),
            layer_ids=h.layer_ids,
            num_experts=h.num_experts,
            meta={"source": "routereplay.capture_generation", "model": type(h.model).__name__},
            rows_checked=True,  # the routers' own top-k ids, as a recording's (Recording.trace)
        )
        logprobs_T = None
        if self._want_logprobs:
            logp_BX = torch.zeros(seq_BX.shape, dtype=torch.float32, device=seq_BX.device)
            logp_BX[:, P:] = self._generated_logprobs(comp_BG)
            logprobs_T = logp_BX[keep_tok_BX].cpu()
        return Rollout(
            input_ids=seq_BX[keep_tok_BX].cpu(),
            cu_seqlens=cu,
            prompt_lens=prompt_lens_B,
            trace=trace,
            logprobs=logprobs_T,
            pad_token_id=rollout_pad,
        )

    def _stop_ids(self, eos_token_id, pad_token_id) -> tuple[list[int], list[int] | None, int | None, int]:
        """``(model_eos, eos_list, pad_check, rollout_pad)`` from :meth:`rollout`'s arguments."""
        model = self._handle.model
        model_eos = model_eos_ids(model)
        eos_ids = model_eos if isinstance(eos_token_id, str) and eos_token_id == FROM_MODEL else eos_token_id
        eos_list = None if eos_ids is None else _id_list(eos_ids)
        if isinstance(pad_token_id, str) and pad_token_id == FROM_MODEL:
            pad_check = rollout_pad = model_pad_id(model)
        else:
            pad_check = pad_token_id
            rollout_pad = model_pad_id(model) if pad_token_id is None else int(pad_token_id)
        return model_eos, eos_list, pad_check, rollout_pad

    def _rows(self, seq_BX: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The routes of every position of ``sequences`` but the last, ``[B, P + G - 1, L, K]``
        (the prefill's rows, then one row per decode forward), and the prompt length ``P``.

        Raises:
            GenerationCaptureError: the recorded forwards are not one generate() call of ``seq_BX``.
        """
        rec = self._recording
        calls = rec.calls
        if not calls:
            raise GenerationCaptureError("no forward was recorded: run model.generate(...) inside the capture block")
        shapes = rec.batch_shapes
        B, P = shapes[0]
        G = seq_BX.shape[1] - P
        if seq_BX.shape[0] != B or G < 1:
            raise GenerationCaptureError(
                f"the first recorded forward (the prefill) saw {B} sequences of {P} prompt tokens but sequences "
                f"has shape {tuple(seq_BX.shape)}; pass the output of the generate() call made inside this "
                "capture block"
            )
        decode = calls[1:]
        # A deferred stop check (transformers, on MPS) runs one forward more and undoes its token.
        if len(decode) == G and shapes[-1][0] == B:
            decode = decode[:-1]
        if len(decode) != G - 1:
            raise GenerationCaptureError(
                f"recorded {len(calls)} forwards but sequences hold {G} generated tokens, which need 1 prefill + "
                f"{G - 1} decode forwards; capture exactly one generate() call per block (beam search and "
                "assisted decoding are not supported)"
            )
        decode_rows = []
        for j, (ids_NLK, (b, s)) in enumerate(zip(decode, shapes[1 : 1 + len(decode)])):
            if b != B or s not in (1, P + j + 1):
                raise GenerationCaptureError(
                    f"decode forward {j + 1} saw a batch of {b} x {s} tokens; expected {B} x 1 (KV cache) or "
                    f"{B} x {P + j + 1} (no cache)"
                )
            # Without a cache every step re-forwards the whole sequence: its new row is the last one.
            decode_rows.append(ids_NLK.view(B, s, *ids_NLK.shape[1:])[:, -1])
        prefill_BPLK = calls[0].view(B, P, *calls[0].shape[1:])
        if not decode_rows:
            return prefill_BPLK, P
        return torch.cat([prefill_BPLK, torch.stack(decode_rows, 1)], 1), P

    @staticmethod
    def _check_stops(
        comp_BG: torch.Tensor,
        comp_len_B: torch.Tensor,
        keep_comp_BG: torch.Tensor,
        eos_list: list[int] | None,
        model_eos: list[int],
        pad: int,
    ) -> None:
        """Every position after a kept completion is padding, and no kept completion stopped early.

        ``generate`` fills a finished sequence with ``pad``. A kept completion whose tail is an id
        ``generate`` stops on by default followed only by padding ended there: counting that
        padding as response tokens corrupts replay, metrics and the loss, so it raises.
        """
        G = comp_BG.shape[1]
        if eos_list:
            stray_BG = ~keep_comp_BG & (comp_BG != pad)
            if bool(stray_BG.any()):
                b, g = (int(i) for i in stray_BG.nonzero()[0])
                raise GenerationCaptureError(
                    f"sequence {b}: token {int(comp_BG[b, g])} at generated position {g} follows its EOS at position "
                    f"{int(comp_len_B[b]) - 1} but is not the pad id {pad}; these sequences do not come "
                    f"from a generate() call that stopped on eos_token_id={eos_list} (pass the ids and pad id "
                    "generate() used)"
                )
        unknown = sorted(set(model_eos) - set(eos_list or []))
        if not unknown:
            return
        # An unknown stop id inside a kept completion (not its last token) after which the whole
        # rest of the row is padding: generate() stopped there.
        col_G = torch.arange(G, device=comp_BG.device)
        is_stop_BG = torch.isin(comp_BG, torch.tensor(unknown, device=comp_BG.device)) & (
            col_G < comp_len_B[:, None] - 1
        )
        tail_pad_BG = (comp_BG == pad).flip(1).int().cumprod(1).flip(1).bool()  # all(pad at g:)
        after_pad_BG = torch.cat([tail_pad_BG[:, 1:], torch.ones_like(tail_pad_BG[:, :1])], 1)  # all(pad after g)
        stop_BG = is_stop_BG & after_pad_BG
        stopped_B = stop_BG.any(1)
        pos_B = stop_BG.int().argmax(1)
        if bool(stopped_B.any()):
            b = int(stopped_B.nonzero()[0, 0])
            g = int(pos_B[b])
            raise EosMismatchError(
                f"sequence {b} stopped at generated position {g} on token {int(comp_BG[b, g])}, an end-of-sequence id "
                f"of the model's generation_config ({model_eos}), followed by {int(comp_len_B[b]) - 1 - g} pad tokens, "
                f"but rollout() was told eos_token_id={eos_list}; the padding would become response tokens. "
                f"Pass eos_token_id={sorted(set(model_eos) | set(eos_list or []))} (every id generate() stops on)"
            )

    @staticmethod
    def _prompt_mask(mask: torch.Tensor | None, B: int, P: int, device: torch.device) -> torch.Tensor:
        if mask is None:
            return torch.ones(B, P, dtype=torch.bool, device=device)
        mask = torch.as_tensor(mask, device=device)
        if mask.ndim != 2 or mask.shape[1] != P or B % mask.shape[0] != 0:
            raise LayoutError(
                f"prompt_attention_mask has shape {tuple(mask.shape)}, expected [B0, {P}] with {B} generated sequences "
                "a multiple of B0 (B0 prompts x num_return_sequences)"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise LayoutError("prompt_attention_mask must hold only 0/1 (or bool) values")
        mask = mask.bool()
        # generate() expands prompts with repeat_interleave: prompt i becomes rows i*R .. i*R + R-1.
        mask = mask.repeat_interleave(B // mask.shape[0], 0)
        # Left padding: once a row has a real token, every later position is real.
        late_pad_BP = ~mask & (mask.int().cummax(1).values.bool())
        if bool(late_pad_BP.any()):
            b, p = (int(i) for i in late_pad_BP.nonzero()[0])
            raise LayoutError(
                f"prompt_attention_mask row {b} has padding at position {p} after a real token: generate() needs "
                "left-padded prompts (tokenizer.padding_side = 'left')"
            )
        return mask
