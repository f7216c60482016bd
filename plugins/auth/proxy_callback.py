"""The auth plugin's proxy-side callback: ``litellm_settings.callbacks`` lists
``plugins.auth.proxy_callback.disclosure`` (last, after the other plugins' callbacks).

Importing this module inside the proxy (LiteLLM does, while it loads its config) puts the
public ``/model/info`` route ahead of LiteLLM's (``plugins.auth.disclosure``)."""

from __future__ import annotations

from litellm.proxy import proxy_server

from plugins import log_setup
from plugins.auth.disclosure import DisclosureHook, install_model_info_route

log_setup.configure()
disclosure = DisclosureHook()
install_model_info_route(proxy_server.app)
