"""``LiteLLMSide``: what the front door learns from the LiteLLM proxy process it runs in (the
router's deployments, the registered triage callbacks, the key cache), read without I/O."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import litellm
from litellm import Router
from litellm.proxy.auth.auth_utils import is_request_body_safe

from plugins.admission.controller import AdmissionController
from plugins.admission.errors import GatewayError
from plugins.admission.hook import AdmissionHook
from plugins.auth.custom_auth import NO_KEY_MESSAGE, UNKNOWN_KEY_MESSAGE, cached_identity
from plugins.auth.model_access import model_allowed
from plugins.front_door.door import Answer, error_answer
from plugins.front_door.settings import MODEL_INFO_MAX_OUTPUT, FrontDoorSettings
from plugins.front_door.validation import Accepted, Rejected
from plugins.request_end import RequestEndHook
from plugins.routing.hook import proxy_router

log = logging.getLogger(__name__)


def deployments_limit(deployments: list[dict[str, object]], default: int) -> int:
    """The smallest ``model_info.max_output_tokens`` among a model's deployments (a request
    may land on any of them), else ``default``."""
    limits = []
    for deployment in deployments:
        info = deployment.get("model_info")
        value = info.get(MODEL_INFO_MAX_OUTPUT) if isinstance(info, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limits.append(value)
    return min(limits) if limits else default


class LiteLLMSide:
    def __init__(
        self,
        settings: FrontDoorSettings,
        router: Callable[[], Router | None] = proxy_router,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._router = router
        self._clock = clock
        self._limits: dict[str, tuple[float, int]] = {}

    def max_tokens_limit(self, model: str) -> int:
        now = self._clock()
        cached = self._limits.get(model)
        if cached is not None and cached[0] > now:
            return cached[1]
        router = self._router()
        deployments = router.get_model_list(model_name=model) if router is not None else None
        limit = deployments_limit(list(deployments or []), self.settings.max_tokens_limit)
        if len(self._limits) > 4096:
            self._limits.clear()
        self._limits[model] = (now + self.settings.limits_cache_s, limit)
        return limit

    def body_problem(self, accepted: Accepted, path: str) -> Rejected | None:
        from litellm.proxy import proxy_server

        general = getattr(proxy_server, "general_settings", None)
        try:
            is_request_body_safe(
                accepted.data,
                general if isinstance(general, dict) else {},
                self._router(),
                accepted.model,
                route=path,
            )
        except ValueError as exc:
            return Rejected(str(exc).splitlines()[0][:300], None, "param_not_allowed")
        return None

    def let_in(
        self,
        authorization: str | None,
        model: str,
        call_id: str,
        reached_gate: Callable[[], None],
    ) -> Answer | None:
        identity = cached_identity(authorization)
        if identity is None:
            return None  # not known here yet: LiteLLM authenticates it
        if not identity.known:
            return error_answer(
                401,
                UNKNOWN_KEY_MESSAGE if authorization else NO_KEY_MESSAGE,
                "auth_error",
                "api_key",
                "401",
            )
        if not model_allowed(model, identity.models):
            return None  # LiteLLM's 403, from the model-access hook
        gated = self._gated(model)
        if gated is None:
            return None
        controller, replica_ids = gated
        shed = controller.shed_early(model, replica_ids, identity.priority, flow=identity.flow)
        if shed is not None:
            return _shed_answer(shed)
        # ahead of the next ones until it reaches the gate
        controller.arrive(model, call_id, identity.priority, reached_gate, identity.flow)
        return None

    def recheck(self, model: str, call_id: str) -> Answer | None:
        gated = self._gated(model)
        if gated is None:
            return None
        controller, replica_ids = gated
        arrival = controller.arrival_of(model, call_id)
        if arrival is None:
            return None
        priority, flow = arrival
        shed = controller.shed_early(model, replica_ids, priority, call_id, flow)
        return None if shed is None else _shed_answer(shed)

    def _gated(self, model: str) -> tuple[AdmissionController, list[str]] | None:
        """The admission controller (once it exists) and the model's replicas, when the
        model is behind the admission gate."""
        admission = _admission_hook()
        router = self._router()
        if admission is None or admission.started_controller is None or router is None:
            return None
        replica_ids = router.get_model_ids(model_name=model)
        if not replica_ids:
            return None  # LiteLLM answers 404 after authentication
        return admission.started_controller, list(replica_ids)

    def finished(self, call_id: str, abandoned: bool) -> None:
        admission = _admission_hook()
        if admission is not None and admission.started_controller is not None:
            admission.started_controller.arrived(call_id)
        if not abandoned:
            return  # LiteLLM's own hooks gave back what it held
        data = {"litellm_call_id": call_id}
        for hook in _request_end_hooks():
            hook.spawn(hook.on_request_end(data))


def _shed_answer(shed: GatewayError) -> Answer:
    return Answer(503, {"error": shed.to_dict()}, tuple((shed.headers or {}).items()))


def _callbacks() -> list[object]:
    return [*litellm.callbacks, *litellm.success_callback, *litellm.failure_callback]


def _admission_hook() -> AdmissionHook | None:
    for callback in _callbacks():
        if isinstance(callback, AdmissionHook):
            return callback
    return None


def _request_end_hooks() -> list[RequestEndHook]:
    seen: list[RequestEndHook] = []
    for callback in _callbacks():
        if isinstance(callback, RequestEndHook) and all(callback is not s for s in seen):
            seen.append(callback)
    return seen
