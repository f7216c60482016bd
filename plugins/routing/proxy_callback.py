"""The instance the proxy config names: ``litellm_settings.callbacks:
["plugins.routing.proxy_callback.routing"]``. Settings come from ``TRIAGE_ROUTING_*``; invalid or
missing settings make the proxy fail at start-up with the field named."""

from __future__ import annotations

from plugins import log_setup
from plugins.routing.hook import RoutingHook
from plugins.routing.settings import RoutingSettings

log_setup.configure()
routing = RoutingHook(RoutingSettings())
