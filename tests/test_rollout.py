"""Generation capture (routereplay.runtime.rollout) and the R3 / R2 trainer helpers (routereplay.rl).

The alignment tests run the models in float64 so that a KV-cached decode step and a full
training forward compute the same router scores up to ~1e-16: the captured routes must then be
EXACTLY the routes of a training forward over the same tokens.

Legend: B samples, P padded prompt length, G generated positions, S padded length, T packed
tokens, L MoE layers, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers", reason="generation capture tests need transformers (pip install 'routereplay[hf]')")

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from routereplay import attach
from routereplay.core.errors import (
    EosMismatchError,
    GenerationCaptureError,
    LayoutError,
    MissingRoutesError,
    ReplayError,
)
from routereplay.rl.metrics import routing_agreement
from routereplay.rl.store import DispatchTap, RouteStore, token_logprobs

EOS, PAD = 1, 0
# Several end-of-sequence ids make EOS frequent enough on a random model (generate accepts a list).
EOS_IDS = [1, 2, 3]


def _model(*, vocab=40, seed=0, dtype=torch.float64):
    """Tiny Qwen3-MoE (2 layers, 8 experts, top-2). A small vocab makes EOS frequent."""
    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, initializer_range=0.2, pad_token_id=PAD, eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).eval().to(dtype)
    # The grouped_mm experts kernel has no float64 path on the CPU.
    model.set_experts_implementation("eager")
    return model


# Three prompts of lengths 3, 5, 2, left-padded to 5.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]


def _prompt_batch():
    P = max(map(len, PROMPTS))
    ids = torch.full((len(PROMPTS), P), PAD)
    mask = torch.zeros((len(PROMPTS), P), dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    return ids, mask


def _generate(model, handle, **kw):
    ids, mask = _prompt_batch()
    torch.manual_seed(kw.pop("seed", 0))
    with torch.no_grad(), handle.capture_generation() as cap:
        out = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    return cap, out, ids, mask


def _tapped_routes(model, handle):
    """Pre-hooks on every experts module collecting the ids it receives: an independent witness."""
    seen = [[] for _ in handle.layers]
    hooks = []
    for i, layer in enumerate(handle.layers):
        experts = model.get_submodule(layer.path.rpartition(".")[0]).experts
        hooks.append(experts.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[1].clone())))
    return seen, hooks


@pytest.mark.parametrize(
    "gen_kw",
    [
        {"do_sample": False, "max_new_tokens": 6, "eos_token_id": None},
        {"do_sample": True, "top_k": 0, "max_new_tokens": 6, "num_return_sequences": 2, "eos_token_id": None},
        {
            "do_sample": True, "top_k": 0, "max_new_tokens": 8, "num_return_sequences": 3, "eos_token_id": EOS_IDS,
            "seed": 2,
        },
        {"do_sample": True, "top_k": 0, "max_new_tokens": 5, "eos_token_id": EOS_IDS, "use_cache": False, "seed": 2},
    ],
    ids=["greedy", "sample-R2", "sample-R3-eos", "no-cache-eos"],
)
def test_captured_routes_equal_training_forward_routes(gen_kw):
    model = _model()
    handle = attach(model)
    eos = gen_kw.get("eos_token_id")
    cap, out, ids, mask = _generate(model, handle, **gen_kw)
    R = gen_kw.get("num_return_sequences", 1)
    rollout = cap.rollout(
        out, prompt_attention_mask=mask, eos_token_id=eos, pad_token_id=PAD if eos is not None else None
    )
    trace = cap.trace(out, prompt_attention_mask=mask, eos_token_id=eos)
    assert trace == rollout.trace
    # the routers' own top-k ids: known distinct (rows_checked), as validation finds them
    assert trace.rows_checked() and trace.replace(check=True) == trace

    B, G = len(PROMPTS) * R, out.shape[1] - ids.shape[1]
    prompt_lens = torch.tensor([len(p) for p in PROMPTS]).repeat_interleave(R)
    assert rollout.num_seqs == B and torch.equal(rollout.prompt_lens, prompt_lens)
    # Completion: through the first EOS, else all G tokens; engine rows = tokens - 1 per sample.
    comp = out[:, ids.shape[1] :]
    if eos is None:
        expected_comp = torch.full((B,), G)
    else:
        is_eos = torch.isin(comp, torch.tensor(EOS_IDS))
        expected_comp = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, G)
        # The case must exercise an early EOS and a sample that runs to max_new_tokens.
        assert bool((expected_comp < G).any()) and bool((expected_comp == G).any()), expected_comp
        if R == 3:  # and a completion that is only the EOS token (its rows end at the prompt)
            assert bool((expected_comp == 1).any()), expected_comp
    assert torch.equal(rollout.completion_lens, expected_comp)
    assert torch.equal(trace.seq_lens, prompt_lens + expected_comp - 1)
    for b in range(B):  # the packed tokens are the prompt's real tokens then the kept completion
        tokens = rollout.input_ids[rollout.cu_seqlens[b] : rollout.cu_seqlens[b + 1]].tolist()
        assert tokens == PROMPTS[b // R] + comp[b, : expected_comp[b]].tolist()

    # The same tokens through a full training forward (right padded, record mode).
    batch = rollout.padded(padding_side="right")
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    train = rec.trace(attention_mask=batch["attention_mask"])
    rows = rollout.training_trace()
    assert train.rows_checked() and rows.rows_checked()
    assert torch.equal(rows.seq_lens, train.seq_lens)
    valid = rows.valid_mask
    assert int((~valid).sum()) == B  # only each sample's last token lacks a route
    assert torch.equal(rows.experts[valid], train.experts[valid])


def test_capture_with_left_padded_training_batch_and_select():
    model = _model()
    handle = attach(model)
    cap, out, _, mask = _generate(model, handle, do_sample=True, top_k=0, max_new_tokens=4, eos_token_id=None)
    rollout = cap.rollout(out, prompt_attention_mask=mask, eos_token_id=None).select([2, 0])
    batch = rollout.padded(padding_side="left")
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()
    assert torch.equal(batch["response_mask"].sum(1), rollout.completion_lens)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    train = rec.trace(attention_mask=batch["attention_mask"])
    rows = rollout.training_trace()
    assert torch.equal(rows.experts[rows.valid_mask], train.experts[rows.valid_mask])


class _Capturing:
    """A float64 model, its handle, the prompt batch, and one closed capture of a 3-token greedy
    generate (cap, out) for the cases that read it."""

    def __init__(self):
        self.model = _model()
        self.handle = attach(self.model)
        self.ids, self.mask = _prompt_batch()
        with torch.no_grad(), self.handle.capture_generation() as self.cap:
            self.out = self.generate()

    def generate(self):
        return self.model.generate(
            self.ids, attention_mask=self.mask, do_sample=False, max_new_tokens=3, pad_token_id=PAD, eos_token_id=None
        )


def _trace_inside_the_block(c):
    with torch.no_grad(), c.handle.capture_generation() as cap:
        cap.trace(c.generate())


def _two_generates_in_one_block(c):
    with torch.no_grad(), c.handle.capture_generation() as cap:
        out = c.generate()
        c.generate()
    cap.trace(out, prompt_attention_mask=c.mask)


def _token_after_eos(c):
    forged = c.out.clone()
    forged[0, -3:] = torch.tensor([EOS, 7, 7])
    c.cap.trace(forged, prompt_attention_mask=c.mask, eos_token_id=EOS, pad_token_id=PAD)


def _empty_block(c):
    with c.handle.capture_generation() as cap:
        pass
    cap.trace(c.out)


CAPTURE_ERRORS = [
    pytest.param(
        _trace_inside_the_block,
        GenerationCaptureError,
        r"after the `with handle.capture_generation\(\)` block ends",
        id="trace-inside-block",
    ),
    pytest.param(
        _two_generates_in_one_block,
        GenerationCaptureError,
        r"recorded 6 forwards but sequences hold 3 generated tokens",
        id="two-generates",
    ),
    pytest.param(
        lambda c: c.cap.trace(c.out[:2], prompt_attention_mask=c.mask),
        GenerationCaptureError,
        r"saw 3 sequences of 5 prompt tokens but sequences has shape \(2, 8\)",
        id="fewer-sequences",
    ),
    pytest.param(
        lambda c: c.cap.trace(c.out, prompt_attention_mask=c.mask.flip(1)),
        LayoutError,
        r"row 0 has padding at position 3 after a real token: generate\(\) needs left-padded",
        id="right-padded-prompt",
    ),
    pytest.param(
        lambda c: c.cap.trace(c.out, prompt_attention_mask=c.mask[:2]),
        LayoutError,
        r"prompt_attention_mask has shape \(2, 5\), expected \[B0, 5\] with 3 generated",
        id="prompt-mask-shape",
    ),
    pytest.param(
        _token_after_eos,
        GenerationCaptureError,
        r"sequence 0: token 7 at generated position 1 follows its EOS at position 0",
        id="token-after-eos",
    ),
    pytest.param(_empty_block, GenerationCaptureError, r"no forward was recorded", id="no-forward"),
]


@pytest.fixture
def capturing():
    return _Capturing()


@pytest.mark.parametrize(("call", "error", "match"), CAPTURE_ERRORS)
def test_capture_errors(capturing, call, error, match):
    with pytest.raises(error, match=match):
        call(capturing)


@pytest.mark.parametrize("use_cache", [True, False])
def test_rollout_logprobs_aligned_with_training_logprobs(use_cache):
    """capture_generation(logprobs=True): in float64 the rollout's log-probs equal token_logprobs of
    a training forward over padded() at exactly the response positions (no off-by-one)."""
    model = _model()
    handle = attach(model)
    ids, mask = _prompt_batch()
    torch.manual_seed(2)
    with torch.no_grad(), handle.capture_generation(logprobs=True, temperature=0.7) as cap:
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            temperature=0.7,
            max_new_tokens=6,
            eos_token_id=EOS_IDS,
            pad_token_id=PAD,
            num_return_sequences=2,
            use_cache=use_cache,
        )
    rollout = cap.rollout(out, prompt_attention_mask=mask, eos_token_id=EOS_IDS)
    assert rollout.logprobs is not None and rollout.logprobs.dtype == torch.float32
    assert torch.all(rollout.logprobs[~rollout.response_mask()] == 0)
    for side in ("right", "left"):
        batch = rollout.padded([4, 1, 3], padding_side=side)
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
            ).logits
        train = token_logprobs(logits / 0.7, batch["input_ids"]).float()
        resp = batch["response_mask"]
        assert torch.allclose(batch["rollout_logprobs"][resp], train[resp], atol=1e-5)
        assert torch.all(batch["rollout_logprobs"][~resp] == 0)


def test_rollout_logprobs_equal_generate_output_logits():
    model = _model()
    handle = attach(model)
    ids, mask = _prompt_batch()
    torch.manual_seed(0)
    with torch.no_grad(), handle.capture_generation(logprobs=True) as cap:
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            max_new_tokens=5,
            eos_token_id=None,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_logits=True,
        )
    rollout = cap.rollout(out, prompt_attention_mask=mask, eos_token_id=None)
    comp = out.sequences[:, ids.shape[1] :]
    expected = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, comp[..., None])[..., 0]
    assert torch.equal(rollout.logprobs[rollout.response_mask()], expected.reshape(-1))


def test_eos_defaults_to_model_ids_and_unknown_stop_raises():
    model = _model()
    model.generation_config.eos_token_id = EOS_IDS
    handle = attach(model)
    ids, mask = _prompt_batch()
    torch.manual_seed(2)
    with torch.no_grad(), handle.capture_generation() as cap:
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            max_new_tokens=8,
            pad_token_id=PAD,
            num_return_sequences=3,
        )
    comp = out[:, ids.shape[1] :]
    stopped = torch.isin(comp, torch.tensor(EOS_IDS)).any(1)
    assert bool(stopped.any()) and bool((~stopped).any())
    # Default: every id of generation_config, so the rollout matches what generate stopped on.
    default = cap.rollout(out, prompt_attention_mask=mask)
    explicit = cap.rollout(out, prompt_attention_mask=mask, eos_token_id=EOS_IDS, pad_token_id=PAD)
    assert torch.equal(default.input_ids, explicit.input_ids) and default.trace == explicit.trace
    # Told all ids but one: a sequence that stopped early on that one (then only padding) raises.
    G = comp.shape[1]
    first_pos = torch.where(torch.isin(comp, torch.tensor(EOS_IDS)), torch.arange(G), G).min(1).values
    b = int((first_pos < G - 1).nonzero()[0, 0])
    stop_id = int(comp[b, first_pos[b]])
    told = [i for i in EOS_IDS if i != stop_id]
    with pytest.raises(
        EosMismatchError,
        match=rf"sequence \d+ stopped at generated position \d+ on token {stop_id}, an "
        r"end-of-sequence id of the model's generation_config \(\[1, 2, 3\]\).*but rollout\(\) was told "
        rf"eos_token_id=\{told}; .*Pass eos_token_id=\[1, 2, 3\]",
    ):
        cap.rollout(out, prompt_attention_mask=mask, eos_token_id=told)


def test_padded_widths_positions_and_pad_id():
    model = _model()
    model.generation_config.pad_token_id = 39
    handle = attach(model)
    ids, mask = _prompt_batch()
    with torch.no_grad(), handle.capture_generation() as cap:
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=3, eos_token_id=None)
    rollout = cap.rollout(out, prompt_attention_mask=mask, eos_token_id=None)
    assert rollout.pad_token_id == 39
    batch = rollout.padded([2, 1], padding_side="left", width=10)
    lens = [len(PROMPTS[2]) + 3, len(PROMPTS[1]) + 3]
    assert batch["input_ids"].shape == (2, 10)
    for b, n in enumerate(lens):
        assert batch["attention_mask"][b].tolist() == [0] * (10 - n) + [1] * n
        assert batch["position_ids"][b].tolist() == [0] * (10 - n) + list(range(n))
        assert batch["input_ids"][b, : 10 - n].tolist() == [39] * (10 - n)
        assert batch["response_mask"][b].tolist() == [False] * (10 - 3) + [True] * 3
    right = rollout.padded([2, 1])
    assert right["input_ids"].shape == (2, max(lens))  # width: the longest selected sample
    assert right["position_ids"][0].tolist() == list(range(lens[0])) + [0] * (max(lens) - lens[0])
    assert "rollout_logprobs" not in right
    with pytest.raises(
        LayoutError, match=r"padded\(width=4\) is narrower than the longest selected sample \(8 tokens\)"
    ):
        rollout.padded([1], width=4)


def test_token_logprobs_shifts_by_one():
    logits = torch.tensor([[[0.5, 0.5], [0.25, 0.75], [1.0, 1.0]]]).log()
    lp = token_logprobs(logits, torch.tensor([[0, 1, 0]]))
    # position 1 is predicted by position 0 (p(1) = 0.5), position 2 by position 1 (p(0) = 0.25)
    assert torch.allclose(lp, torch.tensor([[0.0, math.log(0.5), math.log(0.25)]]))


# --- R3 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_rollout():
    """Samples generated by a bf16 copy of ``_model(vocab=64)``: its routes differ from the fp32 trainer's."""
    roll = _model(vocab=64, dtype=torch.bfloat16)
    roll.set_experts_implementation("grouped_mm")
    h = attach(roll)
    ids, mask = _prompt_batch()
    torch.manual_seed(1)
    with torch.no_grad(), h.capture_generation() as cap:
        out = roll.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            max_new_tokens=6,
            num_return_sequences=2,
            pad_token_id=PAD,
            eos_token_id=None,
        )
    return cap.rollout(out, prompt_attention_mask=mask, eos_token_id=None)


def test_r3_replay_padded_microbatches_uses_rollout_routes(bf16_rollout):
    model = _model(vocab=64, dtype=torch.float32)
    rollout = bf16_rollout
    handle = attach(model)
    rows = rollout.training_trace()
    store = RouteStore(handle, rows)
    seen, hooks = _tapped_routes(model, handle)
    splits = [[5, 0, 3], [1, 4, 2]]  # shuffled micro-batches
    try:
        for ids in splits:
            batch = rollout.padded(ids)
            with store.replay(ids, attention_mask=batch["attention_mask"], verify=True) as rep:
                model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"],
                )
            expected = rows.select_sequences(ids)
            keep = batch["attention_mask"].reshape(-1).bool()
            for i in range(len(handle.layers)):
                used = seen[i][-1][keep]
                v = expected.valid_mask
                assert torch.equal(used[v], expected.experts[v, i].long())
            assert all(s.replayed == int(expected.valid_mask.sum()) for s in rep.stats.values())
    finally:
        for h in hooks:
            h.remove()
    # Without replay the fp32 trainer ranks some of these routes differently (bf16 rollout): the
    # replayed ids above are the rollout's, not what the trainer would have picked.
    batch = rollout.padded()
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    live = rec.trace(attention_mask=batch["attention_mask"])
    v = rows.valid_mask
    assert not torch.equal(live.experts[v], rows.experts[v])


def test_r3_replay_packed_layout(bf16_rollout):
    model = _model(vocab=64, dtype=torch.float32)
    rollout = bf16_rollout
    handle = attach(model)
    rows = rollout.training_trace()
    store = RouteStore(handle, rows)
    ids = [3, 1, 4]
    part = rollout.select(ids)
    pos = torch.cat([torch.arange(int(n)) for n in part.seq_lens])  # positions restart per sample
    seen, hooks = _tapped_routes(model, handle)
    try:
        with store.replay(ids) as rep:
            model(input_ids=part.input_ids[None], position_ids=pos[None])
    finally:
        for h in hooks:
            h.remove()
    expected = rows.select_sequences(ids)
    v = expected.valid_mask
    for i in range(len(handle.layers)):
        assert torch.equal(seen[i][0][v], expected.experts[v, i].long())
    assert all(s.live == part.num_seqs for s in rep.stats.values())  # only the last tokens route live


# --- R2 -----------------------------------------------------------------------------------------
def test_r2_record_old_policy_then_replay_over_steps(bf16_rollout):
    model = _model(vocab=64, dtype=torch.float64)
    rollout = bf16_rollout
    handle = attach(model)
    store = RouteStore(handle)
    old_logp = {}
    with torch.no_grad():
        for ids in ([0, 1, 2], [3, 4, 5]):  # old-policy pass: padded micro-batches
            batch = rollout.padded(ids)
            with store.record(ids, attention_mask=batch["attention_mask"]):
                logits = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"],
                ).logits
            lp = token_logprobs(logits, batch["input_ids"])
            for r, i in enumerate(ids):
                old_logp[i] = lp[r][batch["attention_mask"][r].bool()]
    assert store.sample_ids == list(range(6))
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    seen, hooks = _tapped_routes(model, handle)
    drifted = 0
    try:
        for step, split in enumerate(([[4, 1], [0, 5, 2], [3]], [[2, 3, 0], [5, 1, 4]])):
            for ids in split:
                batch = rollout.padded(ids)
                with store.replay(ids, attention_mask=batch["attention_mask"]) as rep:
                    logits = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"],
                    ).logits
                lp = token_logprobs(logits, batch["input_ids"])
                keep = batch["attention_mask"].bool()
                expected = store.trace(ids)
                for i in range(len(handle.layers)):
                    assert torch.equal(seen[i][-1][keep.reshape(-1)], expected.experts[:, i].long())
                if step == 0:  # same weights, same routes: the importance ratio is 1
                    for r, i in enumerate(ids):
                        assert torch.allclose(lp[r][keep[r]], old_logp[i], atol=1e-12)
                else:
                    drifted += sum(s.disagreement for s in rep.stats.values())
                loss = -(lp[batch["response_mask"]]).mean()
                loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        for h in hooks:
            h.remove()
    # After an update the live router would pick other experts for some rows: R2 pinned them.
    assert drifted > 0


class _Storing:
    """A float32 model, its handle, the prompt batch, and a store holding samples 0, 1, 2 (``full``)."""

    def __init__(self):
        self.model = _model(vocab=64, dtype=torch.float32)
        self.handle = attach(self.model)
        self.ids, self.mask = _prompt_batch()
        self.full = RouteStore(self.handle)
        with torch.no_grad(), self.full.record([0, 1, 2], attention_mask=self.mask):
            self.model(input_ids=self.ids, attention_mask=self.mask)


@pytest.fixture
def storing():
    return _Storing()


def _record_without_layout(s):
    with RouteStore(s.handle).record([0, 1, 2]):
        pass


def _two_forwards_in_one_record(s):
    with torch.no_grad(), RouteStore(s.handle).record([0, 1, 2], attention_mask=s.mask):
        s.model(input_ids=s.ids, attention_mask=s.mask)
        s.model(input_ids=s.ids, attention_mask=s.mask)


def _record_a_held_sample_again(s):
    with torch.no_grad(), s.full.record([1], attention_mask=s.mask[:1]):
        s.model(input_ids=s.ids[:1], attention_mask=s.mask[:1])


def _packed_boundaries_short_of_the_rows(s):
    packed = torch.cat([s.ids[b][s.mask[b].bool()] for b in range(3)])
    with torch.no_grad(), RouteStore(s.handle).record([0, 1, 2], cu_seqlens=[0, 3, 8, 10]) as rec:
        s.model(input_ids=packed[None])
    assert rec.trace().num_tokens == 10  # the right boundaries record the same forward
    with torch.no_grad(), RouteStore(s.handle).record([0, 1], cu_seqlens=[0, 3, 9]):
        s.model(input_ids=packed[None])


def _hole_inside_a_sample(s):
    # A missing route in the middle of a sample is never routed live silently.
    t = s.full.trace([0, 1, 2])
    holes = torch.ones(t.num_tokens, dtype=torch.bool)
    holes[1] = False
    RouteStore(s.handle, t.replace(check=False, valid=holes))


ROUTE_STORE_ERRORS = [
    pytest.param(
        _record_without_layout,
        LayoutError,
        r"record needs attention_mask \(padded batch\) or cu_seqlens \(packed batch\), exactly one",
        id="no-mask-nor-cu-seqlens",
    ),
    pytest.param(
        _two_forwards_in_one_record,
        ReplayError,
        r"store.record saw 2 forwards; record one forward per block",
        id="two-forwards",
    ),
    pytest.param(
        _record_a_held_sample_again,
        LayoutError,
        r"sample\(s\) \[1\] already have routes in this store",
        id="sample-recorded-twice",
    ),
    pytest.param(
        lambda s: s.full.replay([0, 7], attention_mask=s.mask[:2]),
        MissingRoutesError,
        r"sample\(s\) \[7\] have no routes in this store \(it holds 3 samples\)",
        id="replay-unknown-sample",
    ),
    pytest.param(
        lambda s: s.full.trace([0, 0]),
        LayoutError,
        r"sample ids of one micro-batch must be distinct, found \[0, 0\]",
        id="repeated-sample-ids",
    ),
    pytest.param(
        _packed_boundaries_short_of_the_rows,
        LayoutError,
        r"cu_seqlens \[0, 3, 9\] must have 3 entries ending at the 10 rows",
        id="packed-boundaries-short",
    ),
    pytest.param(
        _hole_inside_a_sample,
        MissingRoutesError,
        r"row 1 \(sequence 0, position 1\) has no route and is not the sequence's last token",
        id="hole-inside-sample",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), ROUTE_STORE_ERRORS)
def test_route_store_errors(storing, call, error, match):
    with pytest.raises(error, match=match):
        call(storing)


@pytest.mark.parametrize(
    "cu, message",
    [
        ([0, 8, 3, 10], r"cu_seqlens \[0, 8, 3, 10\] decreases at entry 2 \(8 -> 3\); boundaries must not decrease"),
        ([2, 3, 8, 10], r"cu_seqlens \[2, 3, 8, 10\] starts at 2; the boundaries of a packed batch start at row 0"),
        (
            [0.0, 3.5, 8.0, 10.0],
            r"cu_seqlens must be a 1-D sequence of ints \[B\+1\], found shape \(4,\) of torch.float32",
        ),
        ([[0, 3, 8, 10]], r"cu_seqlens must be a 1-D sequence of ints \[B\+1\], found shape \(1, 4\) of torch.int64"),
        (
            [0, 4, 8, 10],
            (
                r"cu_seqlens \[0, 4, 8, 10\] contradicts the forward, whose inputs \(position_ids restarting at 0, "
                r"or cu_seq_lens_q\) start sequences at rows \[0, 3, 8\], not \[0, 4, 8\]"
            ),
        ),
    ],
)
def test_route_store_refuses_invalid_packed_boundaries(cu, message):
    """Issue 20.8: boundaries that cannot describe the packed forward are refused at record time."""
    model = _model(vocab=64, dtype=torch.float32)
    handle = attach(model)
    ids, mask = _prompt_batch()
    packed = torch.cat([ids[b][mask[b].bool()] for b in range(3)])
    positions = torch.cat([torch.arange(int(n)) for n in mask.sum(1)])
    store = RouteStore(handle)
    with pytest.raises(LayoutError, match=message), torch.no_grad(), store.record([0, 1, 2], cu_seqlens=cu):
        model(input_ids=packed[None], position_ids=positions[None])
    assert store.sample_ids == []  # nothing stored


def test_route_store_accepts_boundaries_that_agree_with_positions():
    model = _model(vocab=64, dtype=torch.float32)
    handle = attach(model)
    ids, mask = _prompt_batch()
    packed = torch.cat([ids[b][mask[b].bool()] for b in range(3)])
    positions = torch.cat([torch.arange(int(n)) for n in mask.sum(1)])
    store = RouteStore(handle)
    # An empty sample (no rows) is invisible in the positions and agrees with them.
    cu = torch.tensor([0, 3, 8, 8, 10], dtype=torch.int32)
    with torch.no_grad(), store.record([0, 1, 9, 2], cu_seqlens=cu) as rec:
        model(input_ids=packed[None], position_ids=positions[None])
    assert rec.sequence_boundaries().tolist() == [0, 3, 8, 10]
    assert store.trace([2, 9, 0]).cu_seqlens.tolist() == [0, 2, 2, 5]
    assert torch.equal(store.trace([0, 1, 9, 2]).experts, rec.trace().experts)


def test_dispatch_tap_sees_what_the_experts_received(bf16_rollout):
    """The witness is independent of the replay: live, the fp32 trainer dispatches other experts than
    the bf16 rollout chose; under replay exactly the rollout's."""
    rollout = bf16_rollout
    model = _model(vocab=64, dtype=torch.float32)
    handle = attach(model)
    store = RouteStore(handle, rollout.training_trace())
    ids = [5, 0, 3, 1, 4, 2]
    batch = rollout.padded(ids, padding_side="left")
    fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad(), DispatchTap(handle) as tap:
        model(**fwd)
        with store.replay(ids, attention_mask=batch["attention_mask"]):
            model(**fwd)
    assert tap.forwards == 2 and set(tap.observed_at) == {"experts input"}
    recorded = store.trace(ids)
    live = routing_agreement(recorded, tap.trace(attention_mask=batch["attention_mask"], forward=0))
    replayed = routing_agreement(recorded, tap.trace(attention_mask=batch["attention_mask"], forward=1))
    # (the bf16 rollout ranks some experts differently: sets agree, ordered lists do not)
    assert live.ordered_match < 1.0 and replayed.disagreement == 0.0 and replayed.ordered_match == 1.0
    with pytest.raises(
        ReplayError,
        match=r"DispatchTap: attention_mask \(6, 2\) has 12 positions but the forward "
        r"dispatched \d+ rows",
    ):
        tap.trace(attention_mask=batch["attention_mask"][:, :2])
