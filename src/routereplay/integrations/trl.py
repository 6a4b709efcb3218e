"""TRL's ``GRPOTrainer`` with routing replay: R3 (the rollout's routes) or R2 (the old policy's).

    from routereplay.integrations.trl import GRPOTrainer     # instead of trl.GRPOTrainer
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds,
                          processing_class=tokenizer, router_replay="R3")
    trainer.train()

**Supported trl: >= 1.16, < 2 (tested with 1.16).** The subclass overrides private methods of
``trl.GRPOTrainer`` (listed below); a TRL release that renames one cannot make a policy forward
run live silently: every replay block checks that exactly its forwards consumed its routes
(``UnconsumedTraceError``), and a policy forward the subclass cannot place raises.

``router_replay``:

* ``"R3"``: ``generate`` runs under ``handle.capture_generation(logprobs=True)``; each sample's
  routes (and its tokens' rollout log-probs) go into a ``RouteStore`` of the generation batch,
  and every forward that computes the **policy's** log-probs replays them: the old-policy pass
  (run by TRL when ``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps``)
  and each loss forward (gradient accumulation and activation checkpointing included: the
  recompute in backward replays the ids its forward used).
* ``"R2"``: the old-policy pass records its routes, each loss forward replays them. It needs that
  pass: with one update per generation the update forward *is* the old policy, so R2 would do
  nothing and is refused.
* ``"measure"``: nothing is replayed, training is plain TRL's; the routes are captured as for R3
  and every policy forward (old-policy pass and loss forwards) runs live under ``handle.record()``,
  so the mismatch metrics below are logged before replay is turned on.
* ``None``: plain ``trl.GRPOTrainer`` (nothing is attached).

``router_replay_export_dir``: each generation batch's routes (the rollout's for R3 and
``"measure"``, the old-policy pass's for R2) are written there as a ``.rrt`` file
(``routereplay.core.io``), ``routes_gen{generation:06d}_rank{process:03d}.rrt``: one sequence per sample
of this process, in the order of TRL's generation batch, all prompt + completion tokens, training
rows (row ``t`` = the route of token ``t``; an R3 sample's last row has no route, ``valid`` False);
``meta`` holds ``source=trl``, the mode, the generation serial, TRL's ``global_step`` and the
process index.

The **reference model is never replayed**: a separate ``ref_model`` is not attached at all, and
with PEFT (reference = the policy with adapters disabled, or TRL's ``"ref"`` adapter active) that
forward is recognised from the adapter layers' state and runs live. PEFT: adapter-layer methods
(LoRA and the like; tested with peft 0.21 and 0.22); prompt learning is refused (disabling it swaps the
model's forward, so the reference forward could not be told from a policy forward), and so is a
forward with adapters disabled on some layers only.

**Carrying routes through TRL's batching.** The batch dict TRL builds per generation gets two
keys, which TRL's ``shuffle_sequence_dict`` / ``split_tensor_dict`` permute and split with
everything else, and its buffer keeps: ``router_replay_ids`` int64 ``[B, 2]`` (generation serial,
sample index in that generation's store) and, for R3 with local generation,
``router_replay_rollout_logps`` float32 ``[B, C]`` (each completion token's rollout log-prob).
Each replayed forward also checks that its tokens are the ones the routes were recorded for
(``BatchMismatchError``), so a misaligned batch cannot replay routes onto the wrong tokens.

**Routes that arrive with completions (vLLM).** TRL's own vLLM modes return no routes, so
``router_replay="R3"`` with ``use_vllm=True`` is refused unless a ``rollout_func`` is given that
returns, next to ``prompt_ids`` / ``completion_ids`` / ``logprobs``, a ``"routed_experts"`` entry:
one array per completion in vLLM's convention (``[prompt_len + completion_len - 1, L, K]``, what
``RequestOutput`` carries with ``SamplingParams(..., return_routed_experts=True)``). They are
converted by :meth:`GRPOTrainer.routes_from_rollout` (override it for another engine's format).

**Logged per step** (TRL's metrics, averaged over the step's policy forwards):

* ``router_replay/disagreement`` (R3, R2): share of (token, layer) routes whose experts, **observed
  at the experts' input** (``routereplay.rl.DispatchTap``), differ from the recorded ones. Must be
  0; a forward where it is not raises ``ReplayVerificationError`` after logging.
* ``router_replay/live_disagreement``: share of (token, layer) routes with a recorded route that
  live routing chooses differently (R3, R2: ``rep.stats`` of the replayed routes; ``"measure"``:
  the live forward's recorded routes against the rollout's): the mismatch replay removes.
* ``router_replay/coverage`` (R3, R2): replayed routes / (real tokens x MoE layers); below 1 only by
  each sample's last token, which has no recorded route (its logits never enter the loss).
* ``router_replay/k3``: ``mean(exp(delta) - 1 - delta)``, ``delta = logp_train - logp_rollout`` over
  completion tokens (``routereplay.rl.metrics.logprob_mismatch``), when rollout log-probs exist (R3 and
  ``"measure"`` with local generation, or TRL's ``sampling_per_token_logps`` from vLLM / a
  ``rollout_func``).
* ``router_replay/k3_old``: the same with ``delta = logp_train - logp_old``, against TRL's
  old-policy pass (``old_per_token_logps``), whenever that pass runs (always for R2).

**What they measure after the first iteration.** Each generation batch is trained on for several
optimizer steps (``num_iterations``, ``steps_per_generation``); only the forwards before the first
of those steps see the weights that generated (and, for R2, recorded) the routes. There,
``live_disagreement`` and ``k3`` are the pure train/inference mismatch and ``k3_old`` is 0 (R2 and
R3 replay the same routes on the same weights). In every later forward of that batch the policy
has been updated, so ``live_disagreement`` counts routes the update moved as well (R2 exists for
exactly this drift), ``k3`` is the train/inference mismatch plus the policy change, and ``k3_old``
is the policy change alone (the quantity TRL's importance ratio corrects). Read the mismatch
itself off the first forward of each generation batch (TRL's first logged step after a
generation), or off ``"measure"`` with ``num_iterations=1``.

Refused with ``IntegrationError`` (R3 and ``"measure"``): TRL's vLLM modes without a ``rollout_func``, transformers
continuous batching (its paged forwards do not map onto tokens), tool calling and environments
(tool tokens are not generated), vision-language processors (untested).

Extension points of ``trl.GRPOTrainer`` overridden here: ``_generate_single_turn`` (capture),
``_generate`` (routes of a ``rollout_func``; the generation batch's store),
``_generate_and_score_completions`` (the scoring phase; adds the carried keys; export),
``_get_per_token_logps_and_entropies`` (replay / record / live per forward), ``_compute_loss``
(which samples the loss forward covers; k3).

Legend (shape suffixes used in this file):
    B  samples of a batch;  S  prompt + completion positions (TRL's padded layout)
    C  completion positions;  P  padded prompt length;  G  generated positions
    T  real tokens of a batch, packed;  L  MoE layers;  K  top-k
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from routereplay.core.errors import BatchMismatchError, IntegrationError, ReplayVerificationError

if importlib.util.find_spec("trl") is None:
    raise ImportError("routereplay.integrations.trl needs trl: pip install 'routereplay[trl]'")

import trl
from packaging.version import Version

MIN_TRL, MAX_TRL = Version("1.16"), Version("2")
if not MIN_TRL <= Version(trl.__version__) < MAX_TRL:
    raise ImportError(
        f"routereplay.integrations.trl supports trl >= {MIN_TRL}, < {MAX_TRL}; found trl {trl.__version__}: "
        "pip install 'routereplay[trl]'"
    )

from routereplay.core.index import ranges
from routereplay.core.layout import engine_to_training
from routereplay.core.trace import RoutingTrace
from routereplay.rl.metrics import logprob_mismatch, routing_agreement
from routereplay.rl.store import DispatchTap, RouteStore

__all__ = ["GRPOTrainer"]

MODES = ("R3", "R2", "measure", None)
_CAPTURE_MODES = ("R3", "measure")  # routes captured at generation (or from a rollout_func)
IDS_KEY = "router_replay_ids"
LOGPS_KEY = "router_replay_rollout_logps"


@dataclass(frozen=True, kw_only=True, slots=True)
class _Batch:
    """The routes of one generation batch, addressed by sample index."""

    serial: int
    store: RouteStore
    tokens: tuple[torch.Tensor, ...]  # per sample: int64 [prompt + completion] tokens the routes belong to (CPU)
    completion_logps: tuple[torch.Tensor, ...] | None  # per sample: float32 [completion] rollout log-probs


def _is_peft(model: Any) -> bool:
    # By type, not by attribute: every transformers model has peft-like methods (PeftAdapterMixin's
    # ``disable_adapters``, ``active_adapters``), so duck typing cannot tell a PeftModel apart.
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _peft_tuner_layers(model: Any) -> tuple[Any, ...]:
    """The adapter layers of a ``PeftModel`` (LoRA and the other tuner methods); refuses prompt learning.

    Raises:
        IntegrationError: a prompt-learning method (prefix / prompt tuning: disabling it swaps the
            model's forward, which the reference forward cannot be recognised by), or no adapter layer.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    prompt = sorted(n for n, c in model.peft_config.items() if c.is_prompt_learning)
    layers = tuple(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    if prompt or not layers:
        raise IntegrationError(
            f"router_replay with a PEFT model: adapter(s) {prompt or sorted(model.peft_config)} have "
            f"{'a prompt-learning method' if prompt else 'no adapter layer'}, so TRL's reference forward (adapters "
            "disabled) cannot be told from a policy forward; use an adapter-layer method such as LoRA"
        )
    return layers


def _peft_reference_active(model: Any, layers: Sequence[Any]) -> bool:
    """Whether a ``PeftModel`` is set up as TRL's reference: its adapters disabled (``disable_adapter()``,
    a new adapter) or TRL's ``"ref"`` adapter active (a re-trained adapter).

    Args:
        model: the unwrapped ``PeftModel``.
        layers: its adapter layers (``_peft_tuner_layers``).

    Raises:
        IntegrationError: some adapter layers are disabled and others not.
    """
    if list(model.active_adapters) == ["ref"]:
        return True
    disabled = [bool(layer.disable_adapters) for layer in layers]
    if all(disabled) != any(disabled):
        raise IntegrationError(
            f"router_replay with a PEFT model: {sum(disabled)} of {len(disabled)} adapter layers are disabled, so "
            "this forward is neither the policy (all enabled) nor TRL's reference (all disabled); enable or disable "
            "adapters for the whole model (model.disable_adapter())"
        )
    return disabled[0]


def _old_pass(args: Any, num_iterations: int, vllm_is: bool) -> bool:
    """TRL's condition for the old-policy log-prob pass (``_generate_and_score_completions``, trl 1.16)."""
    generate_every = args.steps_per_generation * num_iterations
    return args.gradient_accumulation_steps % generate_every != 0 or vllm_is


def _check_config(mode: str, args: Any, kwargs: dict, *, old_pass: bool | None = None) -> None:
    """Refuse what ``mode`` cannot support, naming what is missing."""
    if args is None:
        return
    if mode in _CAPTURE_MODES:
        if getattr(args, "use_vllm", False) and kwargs.get("rollout_func") is None:
            raise IntegrationError(
                f'router_replay="{mode}" with use_vllm=True: TRL\'s vLLM generation returns no routes, '
                "so the routes each completion was generated with are missing. "
                'Pass a rollout_func that returns "routed_experts" (one '
                "[prompt_len + completion_len - 1, L, K] array per completion, vLLM's routed_experts) next to "
                'prompt_ids/completion_ids/logprobs, or use router_replay="R2", or generate with transformers '
                "(use_vllm=False)"
            )
        if getattr(args, "use_transformers_continuous_batching", False):
            raise IntegrationError(
                f'router_replay="{mode}" with use_transformers_continuous_batching=True: '
                "its paged forwards do not map onto the returned tokens, so routes cannot be captured; "
                'set it to False, or use router_replay="R2"'
            )
        if kwargs.get("tools") or kwargs.get("environment_factory") is not None:
            raise IntegrationError(
                f'router_replay="{mode}" with tools or environment_factory: tool-response tokens are not generated, '
                'so they have no rollout routes; use router_replay="R2"'
            )
    if mode == "R2":
        if old_pass is None:
            vllm_is = bool(
                getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False)
            )
            old_pass = _old_pass(args, args.num_iterations, vllm_is)
        if not old_pass:
            raise IntegrationError(
                'router_replay="R2" replays the old-policy pass\'s routes, but with num_iterations='
                f"{args.num_iterations}, steps_per_generation={args.steps_per_generation} and "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps} TRL runs no old-policy pass: every "
                "update forward already is the old policy. Set num_iterations > 1 (or steps_per_generation > "
                'gradient_accumulation_steps), or use router_replay="R3" or None'
            )


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with routing replay on the policy's log-prob forwards; see the module docstring.

    Args:
        *args, **kwargs: exactly ``trl.GRPOTrainer``'s.
        router_replay: ``"R3"``, ``"R2"``, ``"measure"`` (log the mismatch, replay nothing) or None
            (plain TRL).
        router_replay_export_dir: a directory (created if missing) where each generation batch's
            routes are written as ``.rrt`` (see the module docstring); None: not exported.

    Attributes:
        router_replay: the mode.
        router_replay_handle: the ``RouterHandle`` of the policy (None without replay);
            ``trainer.router_replay_handle.detach()`` restores the model exactly.

    Raises:
        IntegrationError: an unknown mode, a TRL configuration the mode cannot support (the
            message names what is missing), an export directory without a mode, or a PEFT
            prompt-learning adapter.
        UnsupportedModelError: the policy has no replayable MoE router.
    """

    def __init__(
        self,
        *args: Any,
        router_replay: str | None = None,
        router_replay_export_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if router_replay not in MODES:
            raise IntegrationError(f'router_replay must be "R3", "R2", "measure" or None, found {router_replay!r}')
        if router_replay is None and router_replay_export_dir is not None:
            raise IntegrationError(
                f"router_replay_export_dir={os.fspath(router_replay_export_dir)!r} with router_replay=None: nothing "
                'captures routes to export; set router_replay="measure" (or "R3" / "R2")'
            )
        if router_replay is not None:
            # Before TRL's own set-up (which starts vLLM, loads a reference model, ...).
            config = kwargs.get("args", args[2] if len(args) > 2 else None)
            _check_config(router_replay, config, kwargs)
        super().__init__(*args, **kwargs)
        self.router_replay = router_replay
        self.router_replay_handle = None
        self.router_replay_export_dir = (
            None if router_replay_export_dir is None else os.fspath(router_replay_export_dir)
        )
        self._rr_serial = itertools.count()
        self._rr_batches: dict[str, _Batch] = {}  # per mode ("train" / "eval"): the latest generation batch
        self._rr_current: _Batch | None = None  # the batch being scored
        self._rr_pending = None  # R3: the Rollout of the last local generate
        self._rr_scoring = False
        self._rr_old_done = False
        self._rr_loss: tuple[_Batch, torch.Tensor] | None = None
        self._rr_last_logps: torch.Tensor | None = None
        self._rr_peft_layers: tuple[Any, ...] | None = None  # a PEFT policy's adapter layers
        if router_replay is None:
            return
        if router_replay in _CAPTURE_MODES and getattr(self, "_is_vlm", False):
            raise IntegrationError(
                f'router_replay="{router_replay}" with a vision-language processor is not supported yet; use '
                'router_replay="R2"'
            )
        if self.router_replay_export_dir is not None:
            os.makedirs(self.router_replay_export_dir, exist_ok=True)
        _check_config(router_replay, self.args, kwargs, old_pass=self._rr_old_pass_expected)
        from routereplay import attach

        policy = self.accelerator.unwrap_model(self.model)
        if _is_peft(policy):
            self._rr_peft_layers = _peft_tuner_layers(policy)
        self.router_replay_handle = attach(policy.get_base_model() if _is_peft(policy) else policy)

    # --- configuration --------------------------------------------------------------------
    @property
    def _rr_old_pass_expected(self) -> bool:
        """Whether TRL runs the old-policy log-prob pass (its own condition, trl 1.16)."""
        vllm_is = bool(self.use_vllm and self.vllm_importance_sampling_correction)
        return _old_pass(self.args, self.num_iterations, vllm_is)

    # --- documented hook ------------------------------------------------------------------
    def routes_from_rollout(
        self,
        routed_experts: Sequence[Any],
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
    ) -> RoutingTrace:
        """Convert the routes a ``rollout_func`` returned with its completions (R3).

        Override for an engine other than vLLM.

        Args:
            routed_experts: the ``"routed_experts"`` entry of the ``rollout_func`` output: per
                completion, vLLM's ``[prompt_len + completion_len - 1, L, K]`` ids (any form
                ``routereplay.formats.vllm.from_vllm`` takes).
            prompt_ids, completion_ids: the ``rollout_func``'s token lists.

        Returns:
            RoutingTrace in the engine convention, one sequence per completion, over the policy's
            MoE layers.

        Raises:
            EngineFormatError: a payload that does not fit the tokens.
        """
        from routereplay.formats.vllm import from_vllm

        h = self.router_replay_handle
        trace = from_vllm(
            list(routed_experts),
            num_experts=h.num_experts,
            prompt_lens=[len(p) for p in prompt_ids],
            completion_lens=[len(c) for c in completion_ids],
            moe_layer_ids=h.layer_ids,
            rows="engine",
        )
        return trace.select_layers(h.layer_ids)  # the trace itself when it has the handle's layers

    # --- generation (R3 capture) ----------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        if self.router_replay not in _CAPTURE_MODES or self.use_vllm:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            )
        h = self.router_replay_handle
        with h.capture_generation(logprobs=True, temperature=self.temperature) as cap:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            )
        # generate()'s own [B, P + G] output is not returned by TRL: rebuild it (left-padded
        # prompts as the prefill saw them, completions then padding) and let rollout() check it.
        B, P = cap.recording.batch_shapes[0]
        G = max(len(c) for c in completion_ids)
        pad = self._tokenizer.pad_token_id
        seq_BX = torch.full((B, P + G), pad, dtype=torch.int64)
        mask_BP = torch.zeros((B, P), dtype=torch.int64)
        for b, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):  # per sequence, not per token
            seq_BX[b, P - len(p) : P] = torch.as_tensor(p)
            seq_BX[b, P : P + len(c)] = torch.as_tensor(c, dtype=torch.int64)
            mask_BP[b, P - len(p) :] = 1
        self._rr_pending = cap.rollout(
            seq_BX, prompt_attention_mask=mask_BP, eos_token_id=list(self.eos_token_ids), pad_token_id=pad
        )
        return completion_ids, logprobs

    def _generate(self, prompts):
        result = super()._generate(prompts)
        if self.router_replay not in _CAPTURE_MODES:
            return result
        prompt_ids, completion_ids, extra_fields = result[0], result[1], result[5]
        h = self.router_replay_handle
        if self.rollout_func is not None:
            routed = extra_fields.pop("routed_experts", None)
            if routed is None:
                raise IntegrationError(
                    'router_replay="R3" with a rollout_func: its output has no "routed_experts", so the routes each '
                    "completion was generated with are missing; return one [prompt_len + completion_len - 1, L, K] "
                    "array per completion (vLLM: SamplingParams(return_routed_experts=True), output.routed_experts)"
                )
            trace = self.routes_from_rollout(routed, prompt_ids, completion_ids)
            comp_logps = None
        else:
            rollout, self._rr_pending = self._rr_pending, None
            if rollout is None or rollout.num_seqs != len(completion_ids):
                raise IntegrationError(
                    "R3: no captured generation matches this batch's completions (trl's _generate_single_turn was not "
                    "called, or called for another batch); this trl version is not supported"
                )
            trace = rollout.trace
            resp_T = rollout.response_mask()
            comp_logps = tuple(rollout.logprobs[resp_T].split(rollout.completion_lens.tolist()))
        tokens = tuple(
            torch.as_tensor(list(p) + list(c), dtype=torch.int64)
            for p, c in zip(prompt_ids, completion_ids, strict=True)
        )
        if trace.num_seqs != len(tokens) or not torch.equal(trace.seq_lens + 1, torch.tensor([len(t) for t in tokens])):
            raise BatchMismatchError(
                f"R3: the routes cover {trace.num_seqs} samples of {(trace.seq_lens + 1).tolist()} tokens but the "
                f"completions are {len(tokens)} samples of {[len(t) for t in tokens]} tokens"
            )
        self._rr_current = _Batch(
            serial=next(self._rr_serial),
            store=RouteStore(h, engine_to_training(trace)),
            tokens=tokens,
            completion_logps=comp_logps,
        )
        return result

    # --- scoring phase ---------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        if self.router_replay is None:
            return super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        self._rr_current = None
        self._rr_scoring, self._rr_old_done = True, False
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rr_scoring = False
        batch = self._rr_current
        if batch is None:
            raise IntegrationError(
                f'router_replay="{self.router_replay}": the generation batch got no routes (no old-policy pass ran for '
                "R2, no capture for R3); this trl version or configuration is not supported"
            )
        self._rr_batches[mode] = batch
        if self.router_replay_export_dir is not None:
            self._rr_export(batch)
        device = output["prompt_ids"].device
        B, C = output["completion_ids"].shape
        output[IDS_KEY] = torch.stack(
            [torch.full((B,), batch.serial, dtype=torch.int64), torch.arange(B, dtype=torch.int64)], 1
        ).to(device)
        if batch.completion_logps is not None:
            logps_BC = torch.zeros((B, C), dtype=torch.float32)
            for b, lp in enumerate(batch.completion_logps):  # per sample, not per token
                logps_BC[b, : lp.numel()] = lp
            output[LOGPS_KEY] = logps_BC.to(device)
        return output

    # --- the policy's forwards -------------------------------------------------------------
    def _rr_role(self, model: Any) -> str:
        """``"live"`` (reference), ``"record"`` (R2 old pass) or ``"replay"``, for one log-prob call."""
        unwrap = self.accelerator.unwrap_model
        if self.ref_model is not None and (model is self.ref_model or unwrap(model) is unwrap(self.ref_model)):
            return "live"
        if self._rr_peft_layers is not None and _peft_reference_active(unwrap(model), self._rr_peft_layers):
            return "live"
        if self._rr_scoring:
            if not self._rr_old_done and self._rr_old_pass_expected:
                self._rr_old_done = True
                return {"R2": "record", "measure": "measure"}.get(self.router_replay, "replay")
            raise IntegrationError(
                "a policy log-prob forward during scoring that is neither TRL's old-policy pass nor a reference "
                "forward; this trl version is not supported (its forwards cannot be matched with routes)"
            )
        if self._rr_loss is not None:
            return "measure" if self.router_replay == "measure" else "replay"
        raise IntegrationError(
            "a policy log-prob forward outside generation scoring and the loss: routereplay cannot tell which samples "
            "it covers (call it inside compute_loss, or use trl.GRPOTrainer)"
        )

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           *args, **kwargs):
        if self.router_replay is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, *args, **kwargs
            )
        role = self._rr_role(model)
        call = lambda: super(GRPOTrainer, self)._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, *args, **kwargs
        )
        if role == "live":
            return call()
        B = input_ids.size(0)
        step = batch_size or B
        bounds = [(s, min(s + step, B)) for s in range(0, B, step)]  # TRL's own chunking
        masks = [attention_mask[s:e] for s, e in bounds]
        h = self.router_replay_handle
        if role == "record":
            with h.record() as rec:
                out = call()
            ids_BS, mask_BS = input_ids.detach().cpu(), attention_mask.detach().cpu().bool()
            self._rr_current = _Batch(
                serial=next(self._rr_serial),
                store=RouteStore(h, rec.trace(attention_mask=masks)),
                tokens=tuple(ids_BS[b][mask_BS[b]] for b in range(B)),
                completion_logps=None,
            )
            return out
        if self._rr_scoring:
            batch, sample_B = self._rr_current, torch.arange(B)
        else:
            batch, sample_B = self._rr_loss
        traces = [self._rr_trace(batch, sample_B[s:e], input_ids[s:e], attention_mask[s:e]) for s, e in bounds]
        if role == "measure":
            out = self._rr_measure(call, traces, masks)
            if not self._rr_scoring:
                self._rr_last_logps = out[0].detach()
            return out
        with h.replay(traces, attention_mask=masks, missing="live") as rep, DispatchTap(h) as tap:
            out = call()
        self._rr_log_forwards(traces, masks, rep, tap)
        if not self._rr_scoring:
            self._rr_last_logps = out[0].detach()
        return out

    def _rr_trace(
        self, batch: _Batch, sample_B: torch.Tensor, ids_BS: torch.Tensor, mask_BS: torch.Tensor
    ) -> RoutingTrace:
        """The routes of ``sample_B`` cut to the real tokens of this forward, checked against its tokens."""
        trace = batch.store.trace(sample_B)
        mask_BS = mask_BS.detach().cpu().bool()
        real_B = mask_BS.sum(1)
        lens_B = trace.seq_lens.cpu()
        ids_BS = ids_BS.detach().cpu()
        for b in range(sample_B.numel()):  # per sample: a token check, not per-token Python work
            n, i = int(real_B[b]), int(sample_B[b])
            got, want = ids_BS[b][mask_BS[b]], batch.tokens[i][:n]
            if n > int(lens_B[b]) or not torch.equal(got, want):
                pos = int((got[: want.numel()] != want[: got.numel()]).nonzero()[0, 0]) if n <= int(lens_B[b]) else n
                raise BatchMismatchError(
                    f"batch row {b} (sample {i} of generation {batch.serial}) has {n} real tokens that differ from the "
                    f"{int(lens_B[b])} tokens its routes were recorded for (first difference at token {pos}); "
                    "the batch was changed after generation, so its routes would land on the wrong tokens"
                )
        if torch.equal(real_B, lens_B):
            return trace
        # A masked tail (mask_truncated_completions): keep each sample's first real_B rows.
        rows_T = ranges(trace.cu_seqlens.cpu()[:-1], real_B)
        cu = torch.zeros(real_B.numel() + 1, dtype=torch.int64)
        torch.cumsum(real_B, 0, out=cu[1:])
        cpu = trace.to("cpu")
        return RoutingTrace(
            experts=cpu.experts[rows_T],
            cu_seqlens=cu,
            layer_ids=cpu.layer_ids,
            num_experts=cpu.num_experts,
            valid=None if cpu.valid is None else cpu.valid[rows_T],
            meta=dict(cpu.meta),
        )

    def _rr_log_forwards(
        self, traces: list[RoutingTrace], masks: list[torch.Tensor], rep: Any, tap: DispatchTap
    ) -> None:
        """Dispatched-vs-recorded disagreement (raises if not 0), live disagreement and coverage."""
        L = len(self.router_replay_handle.layers)
        differ = compared = 0.0
        for i, (trace, mask) in enumerate(zip(traces, masks, strict=True)):
            agree = routing_agreement(trace, tap.trace(attention_mask=mask, forward=i))
            if agree.num_tokens:
                differ += agree.disagreement * agree.num_tokens * L
                compared += agree.num_tokens * L
        stats = rep.stats.values()
        replayed = sum(s.replayed for s in stats)
        live_differ = sum(s.disagreement for s in stats)
        real = sum(int(m.sum()) for m in masks) * L
        device = self.accelerator.device
        totals = self.accelerator.reduce(
            torch.tensor([round(differ), compared, live_differ, replayed, real], dtype=torch.float64, device=device),
            reduction="sum",
        ).tolist()
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["router_replay/disagreement"].append(totals[0] / max(totals[1], 1.0))
        metrics["router_replay/live_disagreement"].append(totals[2] / max(totals[3], 1.0))
        metrics["router_replay/coverage"].append(totals[3] / max(totals[4], 1.0))
        if round(differ):
            raise ReplayVerificationError(
                f"router_replay: {round(differ)} of {int(compared)} (token, layer) routes dispatched to the experts "
                "differ from the recorded routes; replay did not reach the experts of this model"
            )

    # --- the loss --------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        if self.router_replay is None:
            return super()._compute_loss(model, inputs)
        ids = inputs.get(IDS_KEY)
        if ids is None:
            raise IntegrationError(
                f'router_replay="{self.router_replay}": the loss batch has no "{IDS_KEY}"; it did not come from this '
                "trainer's _generate_and_score_completions, so its routes are unknown"
            )
        ids_B2 = ids.detach().cpu()
        serials = torch.unique(ids_B2[:, 0]).tolist()
        batch = next((b for b in self._rr_batches.values() if [b.serial] == serials), None)
        if batch is None:
            raise BatchMismatchError(
                f"the loss batch comes from generation(s) {serials}, but the routes held are those of generation(s) "
                f"{sorted(b.serial for b in self._rr_batches.values())}"
            )
        self._rr_loss = (batch, ids_B2[:, 1])
        self._rr_last_logps = None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._rr_loss = None
        self._rr_log_k3(inputs)
        return loss

    def _rr_log_k3(self, inputs: dict) -> None:
        """k3 of the loss forward's log-probs against the rollout's (``k3``) and the old policy's (``k3_old``)."""
        if self._rr_last_logps is None:
            return
        mask_BC = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask_BC = mask_BC * inputs["tool_mask"]
        metrics = self._metrics["train" if self.model.training else "eval"]
        refs = {
            "router_replay/k3": inputs.get(LOGPS_KEY, inputs.get("sampling_per_token_logps")),
            "router_replay/k3_old": inputs.get("old_per_token_logps"),
        }
        for key, ref_BC in refs.items():
            if ref_BC is None:
                continue
            keep_BC = mask_BC.bool() & torch.isfinite(ref_BC)
            m = logprob_mismatch(self._rr_last_logps.float(), ref_BC.float(), keep_BC)
            if m.num_tokens:
                metrics[key].append(m.k3)

    # --- measure-only mode ------------------------------------------------------------------
    def _rr_measure(self, call: Any, traces: list[RoutingTrace], masks: list[torch.Tensor]) -> Any:
        """Run the forward live and log how its routes differ from the generation batch's (no replay)."""
        h = self.router_replay_handle
        with h.record() as rec:
            out = call()
        live = rec.trace(attention_mask=masks)
        agree = routing_agreement(RoutingTrace.concat(traces), live)
        L = len(h.layers)
        counts = torch.tensor(
            [agree.disagreement * agree.num_tokens * L, agree.num_tokens * L], dtype=torch.float64,
            device=self.accelerator.device,
        )
        differ, compared = self.accelerator.reduce(counts, reduction="sum").tolist()
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["router_replay/live_disagreement"].append(differ / max(compared, 1.0))
        return out

    # --- export -------------------------------------------------------------------------------
    def _rr_export(self, batch: _Batch) -> None:
        """Write a generation batch's routes to ``router_replay_export_dir`` as a ``.rrt`` file."""
        from routereplay.core.io import save

        trace = batch.store.trace(torch.arange(len(batch.tokens)))
        meta = {
            **dict(trace.meta),
            "source": "trl",
            "router_replay": str(self.router_replay),
            "generation": str(batch.serial),
            "global_step": str(self.state.global_step),
            "process_index": str(self.accelerator.process_index),
            "rows": "training",
        }
        name = f"routes_gen{batch.serial:06d}_rank{self.accelerator.process_index:03d}.rrt"
        save(trace.replace(check=False, meta=meta), os.path.join(self.router_replay_export_dir, name))
