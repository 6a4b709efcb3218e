"""Capture the routes of ``model.generate`` as an inference engine would return them (R3 capture).

    handle = routereplay.attach(model)
    with handle.capture_generation() as cap:
        out = model.generate(input_ids, attention_mask=mask, do_sample=True, max_new_tokens=64)
    trace = cap.trace(out, prompt_attention_mask=mask, eos_token_id=eos)   # engine rows
    rollout = cap.rollout(out, prompt_attention_mask=mask, eos_token_id=eos)  # tokens + routes

``generate`` with a KV cache runs one prefill forward over the (left-padded) prompts, ``B * P``
router rows, then one decode forward per new token, ``B`` rows each (one per sequence, finished
sequences included). The token sampled last is never forwarded, so, exactly like vLLM and
SGLang, each sequence gets ``prompt_len + completion_len - 1`` rows: the **engine convention**.
Tokens after a sequence's first EOS are dropped; the EOS token is kept as the sample's last
token, which (like every sample's last token) has no route.
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
    L  MoE layers;  K  top-k slots
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from routereplay.errors import GenerationCaptureError, LayoutError
from routereplay.layout import engine_to_training
from routereplay.trace import RoutingTrace, _ranges

__all__ = ["GenerationCapture", "Rollout", "capture_generation"]


def capture_generation(handle: Any, *, offload: bool = False) -> GenerationCapture:
    """Record the routes of one ``model.generate`` call.

    Args:
        handle: the ``RouterHandle`` of the generating model (``routereplay.attach(model)``).
        offload: copy ids to pinned CPU memory as they are produced (CUDA only).

    Returns:
        A :class:`GenerationCapture` context manager.
    """
    return GenerationCapture(handle, offload=offload)


@dataclass(frozen=True, kw_only=True, slots=True)
class Rollout:
    """Generated samples with their routes, packed (padding and post-EOS tokens removed).

    Attributes:
        input_ids: int64 ``[T]``: prompt + completion tokens of every sample, back to back.
        cu_seqlens: int64 ``[B+1]`` sample boundaries in ``input_ids``.
        prompt_lens: int64 ``[B]`` real prompt tokens per sample (completion = the rest).
        trace: RoutingTrace in the engine convention: ``seq_len - 1`` rows per sample.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    prompt_lens: torch.Tensor
    trace: RoutingTrace

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
        """bool ``[T]``: True on completion tokens (the tokens a policy-gradient loss scores)."""
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
        return Rollout(
            input_ids=self.input_ids[_ranges(self.cu_seqlens[idx_N], lens_N)],
            cu_seqlens=cu,
            prompt_lens=self.prompt_lens[idx_N],
            trace=self.trace.select_sequences(idx_N.to(self.trace.device)),
        )

    def padded(self, idx: Sequence[int] | torch.Tensor | None = None, *, padding_side: str = "right",
               pad_token_id: int = 0) -> dict[str, torch.Tensor]:
        """A padded training batch of the samples ``idx`` (all when None).

        Returns:
            ``input_ids`` int64 ``[B, S]``, ``attention_mask`` int64 ``[B, S]``, ``response_mask``
            bool ``[B, S]``, and ``position_ids`` int64 ``[B, S]`` (0 at each sample's first real
            token: HF models do not derive positions from a left-padded mask themselves).
        """
        if padding_side not in ("left", "right"):
            raise LayoutError(f'padding_side must be "left" or "right", found {padding_side!r}')
        part = self if idx is None else self.select(idx)
        lens_B = part.seq_lens
        B, S = lens_B.numel(), int(lens_B.max()) if lens_B.numel() else 0
        col_S = torch.arange(S)
        if padding_side == "right":
            mask_BS = col_S < lens_B[:, None]
            pos_BS = col_S.expand(B, S)
        else:
            mask_BS = col_S >= (S - lens_B)[:, None]
            pos_BS = col_S - (S - lens_B)[:, None]
        input_ids = torch.full((B, S), pad_token_id, dtype=torch.int64)
        input_ids[mask_BS] = part.input_ids
        response_BS = torch.zeros((B, S), dtype=torch.bool)
        response_BS[mask_BS] = part.response_mask()
        return {
            "input_ids": input_ids,
            "attention_mask": mask_BS.long(),
            "response_mask": response_BS,
            "position_ids": pos_BS.clamp(min=0).contiguous(),
        }


class GenerationCapture:
    """Context manager recording every forward of one ``generate`` call; see the module docstring."""

    def __init__(self, handle: Any, *, offload: bool = False) -> None:
        self._handle = handle
        self._recording = handle.record(offload=offload)
        self._done = False

    def __enter__(self) -> GenerationCapture:
        self._recording.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._recording.__exit__(*exc)
        self._done = True

    @property
    def recording(self) -> Any:
        """The underlying ``Recording`` (raw per-forward rows: ``calls``, ``batch_shapes``)."""
        return self._recording

    def trace(
        self,
        sequences: Any,
        *,
        prompt_attention_mask: torch.Tensor | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
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
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> Rollout:
        """The generated samples, packed, with their routes.

        Args:
            sequences: ``generate``'s output: the ``[B, P + G]`` token tensor or an output object
                with ``.sequences``.
            prompt_attention_mask: the ``[B0, P]`` mask passed to ``generate`` (left padding);
                ``B0 = B / num_return_sequences``. None: the prompts had no padding.
            eos_token_id: id(s) that end a completion; the completion keeps its first EOS and
                drops what follows. None: every completion runs to the end of ``sequences``.
            pad_token_id: if given, checked to fill every position after a completion's EOS
                (catches sequences that do not belong to this capture).

        Returns:
            :class:`Rollout`.

        Raises:
            GenerationCaptureError: the recorded forwards do not match ``sequences`` (another
                ``generate`` call, beam search, assisted decoding, several calls in one block).
            LayoutError: the prompt mask is not ``[B0, P]``, not 0/1, or not left-padded.
        """
        if not self._done:
            raise GenerationCaptureError("call trace()/rollout() after the `with handle.capture_generation()` block ends")
        seq_BX = getattr(sequences, "sequences", sequences)
        if not isinstance(seq_BX, torch.Tensor) or seq_BX.ndim != 2:
            found = tuple(seq_BX.shape) if isinstance(seq_BX, torch.Tensor) else type(seq_BX).__name__
            raise GenerationCaptureError(f"sequences must be generate()'s [B, prompt + new tokens] tensor, found {found}")
        rec = self._recording
        calls = rec.calls
        if not calls:
            raise GenerationCaptureError("no forward was recorded: run model.generate(...) inside the capture block")
        shapes = rec.batch_shapes
        B, P = shapes[0]
        X = seq_BX.shape[1]
        G = X - P
        if seq_BX.shape[0] != B or G < 1:
            raise GenerationCaptureError(
                f"the first recorded forward (the prefill) saw {B} sequences of {P} prompt tokens but sequences has shape "
                f"{tuple(seq_BX.shape)}; pass the output of the generate() call made inside this capture block"
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
        rows_BSLK = torch.cat([prefill_BPLK, torch.stack(decode_rows, 1)], 1) if decode_rows else prefill_BPLK

        prompt_BP = self._prompt_mask(prompt_attention_mask, B, P, seq_BX.device)
        comp_BG = seq_BX[:, P:]
        # Completion length: up to and including the first EOS, else all G tokens.
        if eos_token_id is None:
            comp_len_B = torch.full((B,), G, dtype=torch.int64, device=seq_BX.device)
        else:
            eos_ids = torch.as_tensor(eos_token_id, device=seq_BX.device).reshape(-1)
            is_eos_BG = torch.isin(comp_BG, eos_ids)
            first_B = torch.where(is_eos_BG.any(1), is_eos_BG.int().argmax(1), G - 1)
            comp_len_B = first_B + 1
        col_G = torch.arange(G, device=seq_BX.device)
        keep_comp_BG = col_G < comp_len_B[:, None]
        if pad_token_id is not None and eos_token_id is not None:
            stray_BG = ~keep_comp_BG & (comp_BG != pad_token_id)
            if bool(stray_BG.any()):
                b, g = (int(i) for i in stray_BG.nonzero()[0])
                raise GenerationCaptureError(
                    f"sequence {b}: token {int(comp_BG[b, g])} at generated position {g} follows its EOS at position "
                    f"{int(comp_len_B[b]) - 1} but is not pad_token_id={pad_token_id}; these sequences do not come "
                    "from a generate() call with this eos/pad setting"
                )
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
        trace = RoutingTrace._trusted(
            experts=experts_TLK,
            cu_seqlens=row_cu.to(experts_TLK.device),
            layer_ids=h.layer_ids,
            num_experts=h.num_experts,
            meta={"source": "routereplay.capture_generation", "model": type(h.model).__name__},
        )
        return Rollout(input_ids=seq_BX[keep_tok_BX].cpu(), cu_seqlens=cu, prompt_lens=prompt_lens_B, trace=trace)

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
