"""The auth plugin's proxy-side callback: ``litellm_settings.callbacks`` lists
``plugins.auth.proxy_callback.disclosure`` (last, after the other plugins' callbacks).

Importing this module inside the proxy (LiteLLM does, while it loads its config) puts the
public ``/model/info`` route ahead of LiteLLM's (``plugins.auth.disclosure``), and the key
management routes of the offline store (``plugins.auth.key_management``)."""

from __future__ import annotations

from litellm.proxy import proxy_server

from plugins import proxy_process
from plugins.auth.disclosure import DisclosureHook, install_model_info_route
from plugins.auth.key_management import install_key_routes

proxy_process.prepare()
disclosure = DisclosureHook()
install_model_info_route(proxy_server.app)
install_key_routes(proxy_server.app)
