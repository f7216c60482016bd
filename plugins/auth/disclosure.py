"""What a key other than the master key may learn about the fleet: model names and limits, not
the replicas' addresses, and no Python internals in error bodies.

Triton has no authentication, so a replica's URL (a deployment's ``litellm_params.api_base``)
is as good as a key to it. LiteLLM shows it to any key in three places, each closed here for
every caller but the proxy admin (the master key):

* ``/model/info`` and ``/v1/model/info`` list each deployment's ``litellm_params`` with
  ``api_base`` (``model_info_v1`` in ``litellm/proxy/proxy_server.py`` masks only secret-named
  fields). ``install_model_info_route`` puts a route ahead of LiteLLM's that calls LiteLLM's
  handler and, for a non-admin, keeps of each deployment ``model_name``, ``model_info`` (limits,
  costs, supported parameters; minus any field that holds an address) and of ``litellm_params``
  only ``PUBLIC_LITELLM_PARAMS``.
* Every LLM response carries ``x-litellm-model-api-base``
  (``ProxyBaseLLMRequestProcessing.get_custom_headers``); LiteLLM has no setting to drop it, so
  ``async_post_call_response_headers_hook`` overrides it with an empty value (a hook can add or
  replace response headers, not remove them).
* An error whose text holds a traceback, a file path or an internal address (LiteLLM's
  ``_handle_llm_api_exception`` sends ``f"Invalid request format: {e}"`` unredacted when an
  ``AttributeError`` is in the chain, e.g. ``/v1/responses`` with ``input: [5]``) is replaced
  by ``async_post_call_failure_hook`` with the same status and type and the text passed through
  LiteLLM's own ``redact_internal_details_from_client_message``. The hook is listed last among
  the callbacks, so a substitution by another plugin (the admission plugin's overflow
  mapping) wins.

The proxy-side instance and the route installation are in ``plugins.auth.proxy_callback``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import Depends, HTTPException, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from litellm._logging import redact_internal_details_from_client_message
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import LitellmUserRoles, ProxyException, UserAPIKeyAuth

from plugins.auth.errors import EnvelopeError, SubstituteError
from plugins.auth.identity import key_id_of

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("triage.auth.disclosure")

API_BASE_HEADER = "x-litellm-model-api-base"
MODEL_INFO_PATHS = ("/model/info", "/v1/model/info")
PUBLIC_LITELLM_PARAMS = frozenset(
    {
        "model",
        "custom_llm_provider",
        "tpm",
        "rpm",
        "max_tokens",
        "max_input_tokens",
        "max_output_tokens",
        "input_cost_per_token",
        "output_cost_per_token",
    }
)
"""The deployment parameters a key may see: what model it is and its limits, never where it
runs or how the proxy authenticates to it."""
_ADDRESS_FIELDS = frozenset({"api_base", "base_url", "url", "endpoint", "host", "address"})


def is_admin(user_api_key_dict: UserAPIKeyAuth) -> bool:
    """The proxy admin (the master key, or an admin key of LiteLLM's database) sees everything."""
    return user_api_key_dict.user_role == LitellmUserRoles.PROXY_ADMIN


def _holds_address(name: str, value: object) -> bool:
    return name.lower() in _ADDRESS_FIELDS or (isinstance(value, str) and "://" in value)


def public_deployment(row: Mapping[str, Any]) -> dict[str, Any]:
    """A ``/model/info`` row as a key other than the admin's sees it (pure)."""
    out: dict[str, Any] = {}
    if "model_name" in row:
        out["model_name"] = row["model_name"]
    params = row.get("litellm_params")
    if isinstance(params, Mapping):
        out["litellm_params"] = {k: v for k, v in params.items() if k in PUBLIC_LITELLM_PARAMS}
    info = row.get("model_info")
    if isinstance(info, Mapping):
        out["model_info"] = {k: v for k, v in info.items() if not _holds_address(k, v)}
    return out


def public_model_info(body: Mapping[str, Any]) -> dict[str, Any]:
    """A ``/model/info`` answer (``{"data": [rows]}``) with every row made public (pure)."""
    rows = body.get("data")
    if not isinstance(rows, list):
        return {"data": []}
    return {"data": [public_deployment(r) for r in rows if isinstance(r, Mapping)]}


def scrubbed_client_message(exc: BaseException) -> str | None:
    """The text LiteLLM would send the client for ``exc`` with tracebacks, file paths and
    internal addresses removed; None when there is nothing to remove."""
    message = getattr(exc, "message", None)
    text = message if isinstance(message, str) else str(exc)
    if _attribute_error_in_chain(exc):  # LiteLLM's own wording on this path
        text = f"Invalid request format: {exc}"
    clean = redact_internal_details_from_client_message(text)
    return clean if clean != text else None


def _attribute_error_in_chain(exc: BaseException) -> bool:
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, AttributeError):
            return True
        for linked in (
            current.__cause__,
            current.__context__,
            getattr(current, "original_exception", None),
        ):
            if isinstance(linked, BaseException):
                pending.append(linked)
    return False


def _status_of(exc: BaseException) -> int:
    if _attribute_error_in_chain(exc):
        return 400
    for name in ("status_code", "code"):
        value = getattr(exc, name, None)
        try:
            number = int(value) if value is not None else 0
        except (TypeError, ValueError):
            continue
        if 400 <= number <= 599:
            return number
    return 500


def _str_headers(headers: object) -> dict[str, str]:
    if not isinstance(headers, Mapping):
        return {}
    return {str(k): str(v) for k, v in headers.items()}


def _reason_of(exc: BaseException) -> str | None:
    """The machine-readable reason the original answer carried in ``code`` (``load_failed``,
    ``queue_full``, ...), kept through the substitution; None for a bare status."""
    reason = getattr(exc, "openai_code", None)
    return reason if isinstance(reason, str) and reason and not reason.isdigit() else None


def _type_of(exc: BaseException, status_code: int) -> str:
    value = getattr(exc, "type", None)
    if isinstance(value, str) and value:
        return value
    return "invalid_request_error" if status_code < 500 else "internal_server_error"


class DisclosureHook(CustomLogger):
    """Response headers and error bodies of the LLM routes, for keys other than the admin's."""

    async def async_post_call_response_headers_hook(
        self,
        data: dict,
        user_api_key_dict: UserAPIKeyAuth,
        response: object,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, object] | None = None,
    ) -> dict[str, str] | None:
        if is_admin(user_api_key_dict):
            return None
        return {API_BASE_HEADER: ""}

    async def async_post_call_failure_hook(
        self,
        request_data: dict,
        original_exception: Exception,
        user_api_key_dict: UserAPIKeyAuth,
        traceback_str: str | None = None,
    ) -> HTTPException | None:
        clean = scrubbed_client_message(original_exception)
        if clean is None:
            return None
        status_code = _status_of(original_exception)
        log.info(
            "removed internal details from a %d error for key %s (%s)",
            status_code,
            key_id_of(user_api_key_dict),
            type(original_exception).__name__,
        )
        return SubstituteError(
            message=clean,
            type=_type_of(original_exception, status_code),
            param=getattr(original_exception, "param", None)
            if isinstance(original_exception, ProxyException)
            else None,
            status_code=status_code,
            reason=_reason_of(original_exception),
            headers=_str_headers(getattr(original_exception, "headers", None)),
        )


def envelope_of(exc: HTTPException, param: str | None = None) -> EnvelopeError:
    """LiteLLM's ``HTTPException`` (``{"detail": ...}`` on the wire) as the OpenAI envelope."""
    detail = exc.detail
    if isinstance(detail, Mapping) and isinstance(detail.get("error"), str):
        message = str(detail["error"])
    else:
        message = detail if isinstance(detail, str) else json.dumps(detail)
    return EnvelopeError(
        message=message,
        type="invalid_request_error" if exc.status_code < 500 else "internal_server_error",
        param=param,
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
    )


def install_model_info_route(app: FastAPI) -> None:
    """Serve ``/model/info`` and ``/v1/model/info`` ahead of LiteLLM's routes (the same handler,
    behind the same key check), public rows for callers other than the admin, and LiteLLM's
    ``{"detail": ...}`` errors in the OpenAI envelope."""
    from litellm.proxy.auth.user_api_key_auth import user_api_key_auth
    from litellm.proxy.proxy_server import model_info_v1

    async def model_info(
        user_api_key_dict: UserAPIKeyAuth = Depends(user_api_key_auth),  # noqa: B008
        litellm_model_id: str | None = None,
        include_team_models: bool = False,
        teamId: str | None = None,  # LiteLLM's query parameter
        healthy_only: bool = False,
    ) -> Response:
        try:
            response = await model_info_v1(
                user_api_key_dict=user_api_key_dict,
                litellm_model_id=litellm_model_id,
                include_team_models=include_team_models,
                teamId=teamId,
                healthy_only=healthy_only,
            )
        except HTTPException as exc:
            raise envelope_of(exc, "litellm_model_id" if litellm_model_id else None) from exc
        if is_admin(user_api_key_dict):
            return response
        body = json.loads(bytes(response.body))
        return JSONResponse(public_model_info(body))

    for path in MODEL_INFO_PATHS:
        route = APIRoute(path, model_info, methods=["GET"], tags=["model management"])
        app.router.routes.insert(0, route)
    log.info("/model/info: replica addresses shown to the master key only")
