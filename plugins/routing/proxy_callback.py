"""The instance the proxy config names: ``litellm_settings.callbacks:
["plugins.routing.proxy_callback.routing"]``. Settings come from ``TRIAGE_ROUTING_*``; invalid or
missing settings make the proxy fail at start-up with the field named."""

from __future__ import annotations

from plugins import proxy_process
from plugins.routing.hook import RoutingHook
from plugins.routing.settings import RoutingSettings

proxy_process.prepare()
routing = RoutingHook(RoutingSettings())
