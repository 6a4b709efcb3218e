"""Exceptions raised by routereplay.

Every user-facing failure has its own class so callers can catch exactly what they expect and
tests can pin it. All of them subclass ``ValueError`` (bad data or a bad call, never a bug in
routereplay). Messages say where (sequence / layer / row / file / module path), what was
expected, what was found, and what to do.
"""

from __future__ import annotations


class RouteReplayError(ValueError):
    """Base class of every routereplay error."""


# --- RoutingTrace construction -------------------------------------------------------------
class TraceError(RouteReplayError):
    """A RoutingTrace could not be built from the given tensors."""


class TraceShapeError(TraceError):
    """A tensor has the wrong number of dimensions, shape or dtype kind."""


class NumExpertsError(TraceShapeError):
    """``num_experts`` is not an int in ``[1, MAX_NUM_EXPERTS]`` (ids must fit int32 storage)."""


class SeqlensError(TraceError):
    """``cu_seqlens`` is not a monotone int vector from 0 to the number of tokens."""


class ExpertIdError(TraceError):
    """An expert id on a valid row is outside ``[0, num_experts)``."""


class DuplicateExpertError(TraceError):
    """A valid row selects the same expert twice."""


class LayerIdsError(TraceError):
    """``layer_ids`` are not unique non-negative ints, one per layer of the trace."""


class GatesError(TraceError):
    """``gates`` are not finite floats shaped like ``experts``."""


class TraceMismatchError(TraceError):
    """Two traces cannot be combined (different layers, top-k or expert count)."""


# --- layouts, files and engine formats -----------------------------------------------------
class LayoutError(RouteReplayError):
    """A layout conversion got inputs that do not fit together (mask, shard count, sizes)."""


class AttentionMaskMismatchError(LayoutError):
    """The attention mask given to ``replay``/``prepare``/``trace`` differs from the one the forward ran with."""


class TraceFormatError(RouteReplayError):
    """A ``.rrt`` file is truncated, corrupt, of an unknown version or fails its checksum."""


class EngineFormatError(RouteReplayError):
    """An inference engine's or trainer's routing payload does not follow its convention."""


class ZeroRoutesError(EngineFormatError):
    """A whole sequence routed every token of an MoE layer to expert 0 in every slot.

    This is the signature of a known silent capture failure in inference engines; pass
    ``allow_zero_routes=True`` to accept such data anyway.
    """


class RouteContinuityError(EngineFormatError):
    """Routes added to a sequence leave a gap, overlap rows that differ, or belong to other tokens."""


class RetractedRoutesError(EngineFormatError):
    """SGLang retracted the request: its re-prefill rewrote the routes of tokens generated before."""


# --- routing, sessions and adapters --------------------------------------------------------
class RouterSpecError(RouteReplayError):
    """A RouterSpec is inconsistent, or forced ids violate it (k, range, groups)."""


class UnsupportedModelError(RouteReplayError):
    """``attach`` found no adapter or no MoE router in the model."""


class NoMoELayersError(UnsupportedModelError):
    """A pipeline stage of an MoE model holds no MoE layer: nothing to record or replay on that rank."""


class UnsupportedRouterError(UnsupportedModelError):
    """A router was found but its routing cannot be replayed exactly."""


class ReplayError(RouteReplayError):
    """A record/replay session was used in a way that cannot give exact routes."""


class LayerMismatchError(ReplayError):
    """The trace's layers, top-k or expert count differ from the model's MoE layers."""


class TokenCountMismatchError(ReplayError):
    """A router saw a different number of rows than the trace provides."""


class TraceExhaustedError(ReplayError):
    """A forward asked for routes after every micro-batch trace was consumed."""


class UnconsumedTraceError(ReplayError):
    """A replay context ended with micro-batch traces that no forward used."""


class MissingRoutesError(ReplayError):
    """Rows without a recorded route reached a router under ``missing="error"``."""


class ReplayVerificationError(ReplayError):
    """``verify=True`` found that the experts did not receive the forced ids."""


class RecomputeMismatchError(ReplayError):
    """An activation-checkpoint recompute cannot be matched with certainty to the forward it re-runs."""


class AlreadyAttachedError(ReplayError):
    """``attach`` was called on a model that already has an attached handle."""


class CudaGraphError(ReplayError):
    """A record or replay block's router call ran inside a CUDA graph capture (the hooks would run
    once at capture and never when the graph replays)."""


class BatchShapeMismatchError(TokenCountMismatchError):
    """A forward's batch shape ``[B, S]`` differs from the sequences of the trace replayed on it."""


# --- metrics --------------------------------------------------------------------------------
class MetricInputError(RouteReplayError):
    """Inputs to a routing-agreement or log-prob-mismatch metric do not fit (type, shape, mask, NaN)."""


class GenerationCaptureError(ReplayError):
    """The forwards recorded around ``generate`` do not map onto the returned sequences."""


class EosMismatchError(GenerationCaptureError):
    """A generation stopped on an end-of-sequence id that ``rollout()`` was not told about."""


class BatchMismatchError(ReplayError):
    """A training batch does not hold the tokens the routes replayed on it were recorded for."""


# --- integrations ---------------------------------------------------------------------------
class IntegrationError(RouteReplayError):
    """A trainer integration (TRL, ...) is configured in a way routing replay cannot support."""
