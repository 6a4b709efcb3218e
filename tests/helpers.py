"""Shared test helpers: tiny models, batches, random routes and the routing references.

Test modules import what they share from here (and tiny models of every family from
``hf_zoo``), never from another test module.

Legend: B batch rows, S sequence length, T tokens, L MoE layers, K top-k, E experts, N rows.
"""

from __future__ import annotations

import collections
import contextlib
import re
import warnings

import torch

from routereplay.adapters import hf_specs
from routereplay.core.routing import RouterSpec
from routereplay.core.trace import RoutingTrace

SYNC_WARNING = "synchronizing CUDA operation"  # torch's set_sync_debug_mode("warn") message

# --- from test_session.py ---------------------------------------------------------------------------
E, K, VOCAB = 8, 2, 64


def tiny_qwen3_moe(seed: int = 0):
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Qwen3MoeForCausalLM(config).float().eval()
    return model


def batch(B=2, S=6, seed=1, pad=None):
    g = torch.Generator().manual_seed(seed)
    ids_BS = torch.randint(3, VOCAB, (B, S), generator=g)
    mask_BS = torch.ones(B, S, dtype=torch.long)
    if pad is not None:  # first row gets 2 pads, on the left or the right
        if pad == "left":
            mask_BS[0, :2] = 0
        else:
            mask_BS[0, -2:] = 0
        ids_BS[mask_BS == 0] = 0
    return {"input_ids": ids_BS, "attention_mask": mask_BS}


def random_trace(like: RoutingTrace, seed=5) -> RoutingTrace:
    """A valid trace shaped like ``like`` with random distinct experts per row."""
    g = torch.Generator().manual_seed(seed)
    T, L, K_ = like.experts.shape
    ids_TLK = torch.rand(T, L, E, generator=g).argsort(-1)[..., :K_]
    return RoutingTrace(experts=ids_TLK, cu_seqlens=like.cu_seqlens, layer_ids=like.layer_ids, num_experts=E)


def record(handle, model, b, **kw):
    with handle.record(**kw) as rec:
        out = model(**b).logits
    return rec, out


# --- random traces for hypothesis (test_dp_helpers, test_formats, test_io, test_layout) -------------
def distinct_ids(rows: int, top_k: int, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """int64 ``[rows, K]``: K distinct ids in [0, E) per row, a uniformly random ordered choice.

    Floyd's sampling (K draws per row, whatever E), then the K slots shuffled per row.
    """
    ids_NK = torch.empty(rows, 0, dtype=torch.int64)
    for j in range(num_experts - top_k, num_experts):
        t_N1 = torch.randint(0, j + 1, (rows, 1), generator=gen)
        ids_NK = torch.cat([ids_NK, torch.where((ids_NK == t_N1).any(1, keepdim=True), j, t_N1)], 1)
    return ids_NK.gather(1, torch.rand(rows, top_k, generator=gen).argsort(1))


def traces(
    *,
    min_seqs: int = 0,
    max_seqs: int = 5,
    min_len: int = 0,
    max_len: int = 12,
    num_experts=None,
    max_top_k: int = 3,
    max_layer_id: int | None = None,
    sorted_layer_ids: bool = True,
    valid: tuple = (None, 0.8),
    gates: tuple = (None, torch.float32),
    meta=None,
):
    """A hypothesis strategy of valid RoutingTraces; each test file passes its own distribution.

    B in [min_seqs, max_seqs] sequences of [min_len, max_len] rows; L in [1, 3] layers; E drawn
    by ``num_experts`` (default 8, 64, 300, 40000: uint8, uint8, int16, int32 ids); K in
    [1, min(max_top_k, E)]; K distinct ids per row. Layer ids: 1, 3, 5, ... when ``max_layer_id``
    is None, else L distinct ids in [0, max_layer_id], sorted or in drawn order. ``valid``: the
    mask kinds drawn from: None (no mask), a float p (each row valid with probability p),
    ``"last"`` (each sequence's last row unknown, as an engine capture has it) or ``"drawn"``
    (each row's flag drawn by hypothesis; no mask when there are no rows). ``gates``: None or
    the gate dtypes drawn from. ``meta``: a strategy of the meta dict (default
    ``{"source": "test"}``).
    """
    from hypothesis import strategies as st  # here: the GPU tiers import helpers without hypothesis

    experts_of = st.sampled_from([8, 64, 300, 40000]) if num_experts is None else num_experts
    meta_of = st.builds(dict, source=st.just("test")) if meta is None else meta

    @st.composite
    def draw_trace(draw) -> RoutingTrace:
        B = draw(st.integers(min_seqs, max_seqs))
        lens = draw(st.lists(st.integers(min_len, max_len), min_size=B, max_size=B))
        E = draw(experts_of)
        K = draw(st.integers(1, min(max_top_k, E)))
        L = draw(st.integers(1, 3))
        if max_layer_id is None:
            layer_ids = tuple(range(1, 2 * L, 2))
        else:
            layer_ids = draw(st.lists(st.integers(0, max_layer_id), min_size=L, max_size=L, unique=True))
            layer_ids = tuple(sorted(layer_ids) if sorted_layer_ids else layer_ids)
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        T = sum(lens)
        cu_B1 = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0)
        kind = draw(st.sampled_from(valid))
        valid_T = None
        if kind == "last":
            valid_T = torch.ones(T, dtype=torch.bool)
            valid_T[cu_B1[1:][cu_B1.diff() > 0] - 1] = False
        elif kind == "drawn":
            if T:
                valid_T = torch.tensor(draw(st.lists(st.booleans(), min_size=T, max_size=T)), dtype=torch.bool)
        elif kind is not None:
            valid_T = torch.rand(T, generator=g) < kind
        gates_dtype = draw(st.sampled_from(gates))
        return RoutingTrace(
            experts=distinct_ids(T * L, K, E, g).reshape(T, L, K),
            cu_seqlens=cu_B1,
            layer_ids=layer_ids,
            num_experts=E,
            valid=valid_T,
            gates=None if gates_dtype is None else torch.rand(T, L, K, generator=g).to(gates_dtype),
            meta=draw(meta_of),
        )

    return draw_trace()


# --- from test_routing.py ---------------------------------------------------------------------------
# --- independent helpers (also used by test_hf_specs) ----------------------------------------
def random_valid_ids(spec: RouterSpec, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``[T, K]`` ids a trace could hold for ``spec``: distinct, in range, group limit kept."""
    choice_TE = torch.rand(num_tokens, spec.num_logits, generator=gen)
    if spec.n_group is not None:
        group_TG = torch.rand(num_tokens, spec.n_group, generator=gen)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_TG.topk(spec.topk_group, dim=1)[1], True)
        keep_TE = keep_TG.repeat_interleave(spec.group_size, dim=1)
        choice_TE = choice_TE.masked_fill(~keep_TE, -1.0)
    return choice_TE.topk(spec.top_k, dim=1)[1]


def reference_weights(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    spec: RouterSpec,
    *,
    bias_E: torch.Tensor | None = None,
    expert_scale_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gate weights at ``ids_TK`` in float64, written from the formulas (not from routing.py).

    Differentiable w.r.t. ``logits_TE`` when it is a float64 leaf (the gradient test uses it).
    """
    del bias_E  # the bias only selects; it never enters the weights
    x = logits_TE.double()
    ids = ids_TK.long()

    def score(v: torch.Tensor) -> torch.Tensor:
        if spec.score_function == "softmax":
            e = torch.exp(v - v.max(dim=-1, keepdim=True).values)
            return e / e.sum(dim=-1, keepdim=True)
        if spec.score_function == "sigmoid":
            return 1.0 / (1.0 + torch.exp(-v))
        if spec.score_function == "sqrtsoftplus":
            return torch.sqrt(torch.log1p(torch.exp(v)))
        return v

    w = score(x).gather(1, ids) if spec.score_before_topk else score(x.gather(1, ids))
    if spec.norm_topk_prob:
        if spec.norm_kind == "p_norm":
            w = w / (w.abs() ** spec.norm_p).sum(dim=-1, keepdim=True) ** (1.0 / spec.norm_p)
        elif spec.norm_kind == "clamp":
            w = w / w.sum(dim=-1, keepdim=True).clamp(min=spec.norm_eps)
        else:
            w = w / (w.sum(dim=-1, keepdim=True) + spec.norm_eps)
    if expert_scale_E is not None:
        w = w * expert_scale_E.detach().double()[ids]
    if spec.scaling_op == "mul":
        w = w * spec.scaling_factor
    else:
        w = w / spec.scaling_factor
    return w


ROUTING_E, ROUTING_K = 16, 4  # the experts and top-k of VARIANTS
VARIANTS = {
    "softmax_pre": RouterSpec(
        num_experts=ROUTING_E, top_k=ROUTING_K, compute_dtype=torch.float32, weights_dtype="logits"
    ),
    "softmax_pre_norm": RouterSpec(
        num_experts=ROUTING_E, top_k=ROUTING_K, norm_topk_prob=True, compute_dtype=torch.float32, weights_dtype="logits"
    ),
    "softmax_post": RouterSpec(num_experts=ROUTING_E, top_k=ROUTING_K, score_before_topk=False),
    "softmax_post_f32": RouterSpec(
        num_experts=ROUTING_E,
        top_k=ROUTING_K,
        score_before_topk=False,
        compute_dtype=torch.float32,
        weights_dtype="input",
    ),
    "sigmoid_bias_groups": RouterSpec(
        num_experts=ROUTING_E,
        top_k=ROUTING_K,
        score_function="sigmoid",
        uses_bias=True,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        norm_eps=1e-20,
        scaling_factor=2.5,
        topk_sorted=False,
    ),
    "sigmoid_groups_zero_fill": RouterSpec(
        num_experts=ROUTING_E,
        top_k=ROUTING_K,
        score_function="sigmoid",
        uses_bias=True,
        n_group=4,
        topk_group=2,
        group_mask_value=0.0,
        norm_topk_prob=True,
    ),
    "softmax_groups_max": RouterSpec(
        num_experts=ROUTING_E,
        top_k=ROUTING_K,
        n_group=8,
        topk_group=3,
        group_score_topn=1,
        group_mask_value=0.0,
        scaling_factor=16.0,
    ),
    "sigmoid_post_bias_logits": RouterSpec(
        num_experts=ROUTING_E,
        top_k=ROUTING_K,
        score_function="sigmoid",
        score_before_topk=False,
        uses_bias=True,
        bias_on="logits",
    ),
    "sqrtsoftplus": RouterSpec(
        num_experts=ROUTING_E,
        top_k=ROUTING_K,
        score_function="sqrtsoftplus",
        uses_bias=True,
        norm_topk_prob=True,
        norm_eps=1e-20,
    ),
    "clamp_norm": RouterSpec(
        num_experts=ROUTING_E,
        top_k=ROUTING_K,
        compute_dtype=torch.float32,
        uses_bias=True,
        norm_topk_prob=True,
        norm_kind="clamp",
        norm_eps=1e-12,
    ),
    "p_norm": RouterSpec(num_experts=ROUTING_E, top_k=ROUTING_K, norm_topk_prob=True, norm_kind="p_norm", norm_p=1.0),
    "div_scale": RouterSpec(
        num_experts=ROUTING_E, top_k=3, score_before_topk=False, scaling_factor=3.0, scaling_op="div"
    ),
    "megatron_cast": RouterSpec(
        num_experts=ROUTING_E,
        top_k=ROUTING_K,
        score_function="sigmoid",
        compute_dtype=torch.float32,
        cast_scores=True,
        norm_topk_prob=True,
        norm_eps=1e-20,
    ),
    "zero_experts_keep": RouterSpec(
        num_experts=ROUTING_E - 4, num_logits=ROUTING_E, top_k=ROUTING_K, uses_bias=True, scaling_factor=6.0
    ),
    "zero_experts_mask": RouterSpec(
        num_experts=ROUTING_E - 1, num_logits=ROUTING_E, top_k=1, uses_bias=True, zero_expert_mode="mask"
    ),
    "expert_scale": RouterSpec(
        num_experts=ROUTING_E, top_k=ROUTING_K, score_function="none", norm_topk_prob=True, uses_expert_scale=True
    ),
}


def routing_inputs(spec: RouterSpec, dtype: torch.dtype, seed: int, num_tokens: int = 64):
    gen = torch.Generator().manual_seed(seed)
    logits_TE = (2.0 * torch.randn(num_tokens, spec.num_logits, generator=gen)).to(dtype)
    if spec.score_function == "none":
        logits_TE = torch.softmax(logits_TE.float(), dim=-1).to(dtype)
    kwargs = {"out_dtype": dtype}
    if spec.uses_bias:
        kwargs["bias_E"] = 0.1 * torch.randn(spec.num_logits, generator=gen)
    if spec.uses_expert_scale:
        kwargs["expert_scale_E"] = 1.0 + 0.1 * torch.randn(spec.num_logits, generator=gen)
    return logits_TE, kwargs, gen


# --- from test_kernels.py ---------------------------------------------------------------------------
def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float tensors of one dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel() == 0:
        return 0
    if a.dtype == torch.float32:
        ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
        flip = 0x7FFFFFFF
    else:
        ia, ib = a.view(torch.int16).long(), b.view(torch.int16).long()
        flip = 0x7FFF
    # map the sign-magnitude bit patterns onto one ordered integer line
    ia = torch.where(ia < 0, -(ia & flip), ia)
    ib = torch.where(ib < 0, -(ib & flip), ib)
    return int((ia - ib).abs().max())


# --- from test_hf_contract.py -----------------------------------------------------------------------
def model_logits(model, b):
    out = model(**b)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@contextlib.contextmanager
def forced_topk(model, handle, forced_LNK):
    """Run the family's own routing code with ``torch.topk`` answering the forced ids.

    Inside each MoE block (the router's parent module) a top-k over ``[N, E]`` with ``k == K``
    returns ``(input.gather(1, forced), forced)``; everything else (group top-k, other tensors)
    is the real ``torch.topk``. The handle must be idle or detached.
    """
    state = {"ids": None}
    real_fn, real_method = torch.topk, torch.Tensor.topk
    E = handle.num_experts  # the logits width (LongCat's zero-computation experts included)

    def answer(input, k, dim=-1, largest=True, sorted=True):
        ids_NK = state["ids"]
        if (
            ids_NK is not None
            and input.ndim in (2, 3)  # [N, E], or [B, S, E] (ZAYA)
            and dim in (-1, input.ndim - 1)
            and k == ids_NK.shape[1]
            and input.shape[-1] == E
            and input.numel() == ids_NK.shape[0] * E
        ):
            flat_NE = input.reshape(-1, E)
            lead = input.shape[:-1]
            return torch.return_types.topk((flat_NE.gather(1, ids_NK).reshape(*lead, k), ids_NK.reshape(*lead, k)))
        return real_fn(input, k, dim=dim, largest=largest, sorted=sorted)

    hooks = []
    for l, layer in enumerate(handle.layers):
        router = model.get_submodule(layer.path)
        block = model.get_submodule(layer.path.rpartition(".")[0])

        def pre(m, a, l=l):
            state["ids"] = forced_LNK[l]

        def post(m, a, o):
            state["ids"] = None

        # The router's pre-hook too: JetMoE's attention MoE block runs through map/reduce, never forward.
        hooks += [block.register_forward_pre_hook(pre), router.register_forward_pre_hook(pre)]
        hooks += [block.register_forward_hook(post)]
    torch.topk = answer
    torch.Tensor.topk = lambda self, k, dim=-1, largest=True, sorted=True: answer(self, k, dim, largest, sorted)
    try:
        yield
    finally:
        torch.topk, torch.Tensor.topk = real_fn, real_method
        for h in hooks:
            h.remove()


# --- from test_gpu_generate.py ----------------------------------------------------------------------
# --- c) host syncs: capture adds none to generate's own -----------------------------------------
def count_syncs(fn):
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    sites = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message))
    return result, sites


# --- the zoo's refused and supported families (test_hf_contract, test_gpu) ---------------------------
# family -> the router (or MoE-block) class it is refused for; the reason is the one table's,
# hf_specs.REFUSED, which attach and docs/MODELS.md read too.
REFUSED_CLASS: dict[str, str] = {
    "doge": "DogeCDMoE",
    "ernie4_5_vl_moe": "Ernie4_5_VLMoeMoeBlock",
    "nllb_moe": "NllbMoeTop2Router",
    "switch_transformers": "SwitchTransformersTop1Router",
    "phimoe": "PhimoeTopKRouter",
    "inkling": "InklingTopkRouter",
}
# family -> regex its refusal at attach must match
REFUSED_FAMILIES: dict[str, str] = {
    family: rf"^[\w-]+: router( \S+| class) \({cls}\) is not supported: {re.escape(hf_specs.REFUSED[cls])}$"
    for family, cls in REFUSED_CLASS.items()
}


def supported_families() -> list[str]:
    """Zoo families attach accepts: every family of tests/hf_zoo.py minus the refused ones."""
    import hf_zoo

    return [f for f in hf_zoo.FAMILIES if f not in REFUSED_CLASS]


SUPPORTED = supported_families()


def not_known_checked(trace: RoutingTrace) -> RoutingTrace:
    """``trace`` built with RoutingTrace.unchecked: the same routes, not known to pass the repeat
    check; ``save`` writes it in the format versions before 1.2."""
    fields = ("experts", "cu_seqlens", "layer_ids", "num_experts", "valid", "gates", "meta")
    return RoutingTrace.unchecked(**{name: getattr(trace, name) for name in fields})
