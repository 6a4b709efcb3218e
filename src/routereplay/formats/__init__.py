"""Converters between the routing payloads of inference engines / trainers and RoutingTrace.

One leaf module per source, all pure numpy/torch (no vllm, sglang, verl or megatron import):

    routereplay.formats.vllm       ``routed_experts`` / ``prompt_routed_experts`` (arrays, lists, base64 .npy)
    routereplay.formats.sglang     ``meta_info["routed_experts"]`` (base64 int32) and ``routed_experts_start_len``
    routereplay.formats.verl       DataProto ``routed_experts`` padded ``[bs, seq, L, K]`` + attention mask
    routereplay.formats.megatron   ``RouterReplay.get_recorded_data()`` / ``set_replay_data()`` lists
    routereplay.formats.accumulate ``RouteAccumulator``: one sequence from several requests (multi-turn
                                   turns, partial-rollout resume attempts), boundary rows kept

Two row conventions, chosen by ``rows=`` wherever it matters:

    "engine"    each sequence of T tokens has T-1 rows: an inference engine never forwards the last
                sampled token, so that token has no route (what vLLM and SGLang return).
    "training"  each sequence has T rows, one per token as the trainer forwards them; a row without a
                known route (the last token of an engine capture) is marked invalid (``trace.valid``).

Shared rules (every ``from_*``):
    * ``moe_layer_ids``: the global decoder-layer index of each MoE layer. A payload whose layer axis
      covers every decoder layer (dense layers as empty rows) is cut down to these layers; the dropped
      layers must be empty (all 0, or -1 placeholders), otherwise the ids are wrong and
      EngineFormatError says which layer holds routes. A payload with exactly ``len(moe_layer_ids)``
      layers is taken as MoE layers only. Without ``moe_layer_ids`` the layer axis is kept whole with
      ids ``0..L-1``.
    * A negative id on a kept layer is a missing route (vLLM fills rows it never captured, e.g. a
      prefix-cache hit, with -1): EngineFormatError, or with ``missing="invalid"`` the row is marked
      invalid.
    * An MoE layer routed entirely to expert 0 across a whole sequence is a known silent capture
      failure: ZeroRoutesError naming the sequence and layer, or with ``allow_zero_routes=True`` every
      row of that sequence is marked invalid (with top-k > 1 such rows are not valid routes anyway:
      they repeat expert 0). With top-1 a short sequence can route to expert 0 by chance, so for
      top-1 only sequences of at least 16 routed rows are checked.
    * Wrong shapes, lengths or dtypes raise EngineFormatError naming the request / sample and what
      was expected.
    * Payloads come as writable numpy arrays of any integer dtype (vLLM: uint8, uint16 above 256
      experts, int16 or int32 by release), read-only arrays (SGLang decoded with ``np.frombuffer``,
      ``.npy`` payloads), torch tensors (SGLang with ``skip_tokenizer_init``, on any device) or
      nested lists. Ids are never narrowed before they are checked: when every id of every request
      is in ``[0, num_experts)`` (a read-only min / max per payload) the requests are copied once,
      straight into the trace's compact dtype (uint8 up to 256 experts); otherwise (missing-route
      markers, corrupt ids) into int32 (int64 for uint32 / int64 sources), so that the checks name
      the offending row. A read-only array is copied rather than shared with torch.

Legend (shape suffixes):
    N  rows of a payload (one per routed token), all requests back to back
    T  rows of a trace
    Lp layers on the payload's layer axis (may include dense layers)
    L  MoE layers kept in the trace
    K  top-k slots
    B  sequences
"""

from __future__ import annotations

# The public converters, importable from the package.
from routereplay.formats.accumulate import RouteAccumulator
from routereplay.formats.common import Rows
from routereplay.formats.megatron import from_megatron, megatron_router_layer_ids, to_megatron
from routereplay.formats.sglang import decode_sglang_payload, extend_sglang, from_sglang, to_sglang
from routereplay.formats.verl import from_verl, from_verl_unpadded, to_verl, to_verl_unpadded
from routereplay.formats.vllm import decode_vllm_payload, from_vllm, from_vllm_outputs, to_vllm

__all__ = [
    "RouteAccumulator",
    "Rows",
    "decode_sglang_payload",
    "decode_vllm_payload",
    "extend_sglang",
    "from_megatron",
    "from_sglang",
    "from_verl",
    "from_verl_unpadded",
    "from_vllm",
    "from_vllm_outputs",
    "megatron_router_layer_ids",
    "to_megatron",
    "to_sglang",
    "to_verl",
    "to_verl_unpadded",
    "to_vllm",
]
