"""Payloads built the way each engine / trainer builds them, for tests/test_formats.py.

Each builder follows the source's own steps (read from its code), starting from ``truth_TLK``: the
route of every token of a request, MoE layers only.

Legend: T tokens of a request, L MoE layers, Lp payload layers, K top-k, E experts.
"""

from __future__ import annotations

import base64
import importlib.util
import io
from types import ModuleType

import numpy as np
import torch


def random_routes(n: int, num_layers: int, top_k: int, num_experts: int, seed: int = 0) -> np.ndarray:
    """int64 ``[n, L, K]``: K distinct experts per (row, layer), in router-ranked order."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, num_layers, num_experts, generator=g).argsort(-1)[..., :top_k].numpy()


def full_layer_axis(routes_TLK: np.ndarray, moe_layer_ids, num_hidden_layers: int | None, fill: int = 0) -> np.ndarray:
    """MoE-layer routes on a layer axis of every decoder layer, dense layers left at the buffer's fill."""
    if num_hidden_layers is None:
        return routes_TLK
    out = np.full((routes_TLK.shape[0], num_hidden_layers, routes_TLK.shape[2]), fill, dtype=routes_TLK.dtype)
    out[:, list(moe_layer_ids)] = routes_TLK
    return out


# --- vLLM -----------------------------------------------------------------------------------------
def vllm_dtype(num_experts: int) -> np.dtype:
    """The in-process dtype of vLLM's slot manager: uint8 up to 256 experts, else uint16."""
    return np.dtype(np.uint8 if num_experts <= 256 else np.uint16)


def vllm_capture(
    truth_TLK, *, moe_layer_ids=None, num_hidden_layers=None, dtype=np.int16, prompt_start: int = 0
) -> np.ndarray:
    """``routed_experts`` of a finished request: the host buffer's rows for the T-1 forwarded tokens.

    ``prompt_start`` (``SamplingParams.routed_experts_prompt_start``): the scheduler gathers the
    prompt's rows from that position on, then one row per decode step, so the payload is rows
    ``[prompt_start, T - 1)``.
    """
    rows = truth_TLK[prompt_start : truth_TLK.shape[0] - 1]  # the last sampled token is never forwarded
    return full_layer_axis(rows, moe_layer_ids, num_hidden_layers).astype(dtype)


def partial_rollout(prompt_len: int, generated: list[int], routes_per_attempt: list[np.ndarray], dtype=np.uint8):
    """A generation aborted and resumed as verl's ``FullyAsyncLLMServerClient`` does it.

    Attempt k is sent ``prompt + tokens generated so far`` and generates ``generated[k]`` tokens;
    ``routes_per_attempt[k]`` is the route the engine computes at every position under the weights
    of attempt k (``[P + sum(generated), L, K]``). Each attempt's payload covers its whole request
    minus one row (``None`` when it generated nothing, as verl skips it).

    Returns ``(attempts, verl_rows)``: ``[(payload, token_ids)]`` per attempt and the rows verl's
    client keeps (the first payload, then the last ``len(new tokens)`` rows of each later one).
    """
    total = prompt_len + sum(generated)
    tokens = list(range(1000, 1000 + total))
    attempts, verl_rows, sent = [], None, prompt_len
    for g, routes in zip(generated, routes_per_attempt):
        n = sent + g
        payload = None if g == 0 else routes[: n - 1].astype(dtype)
        attempts.append((payload, tokens[:n]))
        if payload is not None:
            verl_rows = payload if verl_rows is None else np.concatenate([verl_rows, payload[-g:]])
        sent = n
    return attempts, verl_rows


def generated_with(prompt_len: int, generated: list[int], routes_per_attempt: list[np.ndarray]) -> np.ndarray:
    """Row r = the route of the forward that generated token r + 1: from the attempt that generated it."""
    rows, sent = [], prompt_len
    for g, routes in zip(generated, routes_per_attempt):
        first = 0 if not rows else sent - 1  # this attempt forwards position sent-1 to generate token sent
        if g:
            rows.append(routes[first : sent + g - 1])
        sent += g
    return np.concatenate(rows)


def vllm_split(capture_NLK, prompt_len: int, completion_len: int, extra_row=None):
    """vLLM's ``split_routed_experts``: prompt part, generated part clipped to the output tokens.

    ``extra_row``: a row captured for a speculative (MTP) draft at the last position, which vLLM's
    clip to ``completion_len`` rows keeps.
    """
    if extra_row is not None:
        capture_NLK = np.concatenate([capture_NLK, extra_row[None].astype(capture_NLK.dtype)])
    prompt, gen = capture_NLK[:prompt_len], capture_NLK[prompt_len:]
    if completion_len and gen.shape[0] > completion_len:
        gen = gen[:completion_len]
    return (prompt if prompt.size else None), (gen if gen.size else None)


def npy_base64(arr: np.ndarray) -> str:
    """The OpenAI server's encoding: base64 of ``np.save`` bytes."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --- SGLang ---------------------------------------------------------------------------------------
def sglang_meta_info(
    truth_TLK,
    prompt_len: int,
    *,
    start_len: int = 0,
    honour_start_len: bool = True,
    moe_layer_ids=None,
    num_hidden_layers=None,
    override_rows=None,
    num_retractions: int | None = None,
) -> dict:
    """``meta_info`` of a finished request: base64 of the little-endian int32 rows ``[start_len, seqlen-1)``.

    ``honour_start_len=False`` mimics builds that ignore ``routed_experts_start_len``.
    ``override_rows``: ``{absolute_row: [L, K] routes}`` that this forward computed differently.
    ``num_retractions``: ``meta_info["num_retractions"]`` (SGLang reports it on every response).
    """
    T = truth_TLK.shape[0]
    rows = truth_TLK[: T - 1].copy()
    for r, v in (override_rows or {}).items():
        rows[r] = v
    rows = full_layer_axis(rows, moe_layer_ids, num_hidden_layers)
    if honour_start_len:
        rows = rows[start_len:]
    return {
        "routed_experts": base64.b64encode(np.ascontiguousarray(rows, dtype="<i4").tobytes()).decode("ascii"),
        "prompt_tokens": prompt_len,
        "completion_tokens": T - prompt_len,
        "finish_reason": {"type": "stop"},
        **({} if num_retractions is None else {"num_retractions": num_retractions}),
    }


def sglang_openai_response(meta_info: dict, *, n: int = 1, with_meta_info: bool = False) -> dict:
    """What SGLang's OpenAI server returns for a request of ``n`` completions whose first one has
    ``meta_info`` (SGLang 0.5.23, ``entrypoints/openai/serving_completions.py``): the routes once, at
    response level in ``sglext``, the token counts in ``usage``; ``with_meta_info`` mimics chat's
    ``return_meta_info=true`` (each choice carries its meta_info, ``sglext`` has no routes)."""
    choice = {"index": 0, "text": "", "finish_reason": "stop"}
    response = {
        "id": "cmpl-0",
        "object": "text_completion",
        "choices": [{**choice, "index": i} for i in range(n)],
        "usage": {
            "prompt_tokens": meta_info["prompt_tokens"],
            "completion_tokens": n * meta_info["completion_tokens"],
            "total_tokens": meta_info["prompt_tokens"] + n * meta_info["completion_tokens"],
        },
    }
    if with_meta_info:
        response["choices"] = [{**c, "meta_info": meta_info} for c in response["choices"]]
    else:
        response["sglext"] = {"routed_experts": meta_info["routed_experts"], "cached_tokens_details": None}
    return response


# --- verl -----------------------------------------------------------------------------------------
def verl_batch(captures, prompt_lens, *, prompt_length: int, response_length: int, dtype=torch.int16, num_tokens=None):
    """verl's agent loop: each sample's engine rows copied into zeros from its first prompt token.

    The prompt is left-padded to ``prompt_length``, the response right-padded to ``response_length``.
    ``num_tokens``: tokens per sample (default: engine rows + 1; give it for trainer-recorded rows).
    Returns ``(routed_experts [B, S, Lp, K], attention_mask [B, S] int64)``.
    """
    S = prompt_length + response_length
    re_list, mask_list = [], []
    for i, (cap, P) in enumerate(zip(captures, prompt_lens)):
        tokens = cap.shape[0] + 1 if num_tokens is None else num_tokens[i]
        R = tokens - P
        mask = torch.zeros(1, S, dtype=torch.int64)
        mask[0, prompt_length - P : prompt_length + R] = 1
        experts = torch.from_numpy(np.ascontiguousarray(cap)).to(dtype)
        re = torch.zeros(1, S, *experts.shape[1:], dtype=dtype)
        start_pos = prompt_length - P
        end_pos = min(start_pos + experts.shape[0], S)
        re[:, start_pos:end_pos] = experts[: end_pos - start_pos].unsqueeze(0)
        re_list.append(re)
        mask_list.append(mask)
    return torch.cat(re_list), torch.cat(mask_list)


# --- Megatron-Core --------------------------------------------------------------------------------
def load_megatron_router_replay() -> tuple[ModuleType | None, str | None]:
    """megatron-core's own ``router_replay.py``, loaded as a standalone module.

    Importing ``megatron.core`` takes ~15 s (it pulls in the whole framework); the file itself
    needs only torch, so it is executed directly. Returns ``(module, None)`` or ``(None, reason)``.
    """
    try:
        spec = importlib.util.find_spec("megatron.core")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, "megatron-core is not installed (pip install 'routereplay[megatron]')"
    path = f"{next(iter(spec.submodule_search_locations))}/transformer/moe/router_replay.py"
    file_spec = importlib.util.spec_from_file_location("_megatron_router_replay_for_tests", path)
    if file_spec is None:
        return None, f"megatron-core has no {path} (router replay needs megatron-core >= 0.16)"
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except FileNotFoundError:
        return None, f"megatron-core has no {path} (router replay needs megatron-core >= 0.16)"
    return module, None
