"""The instance the proxy config names: ``litellm_settings.callbacks:
["plugins.catalogue.proxy_callback.catalogue"]``. Settings come from ``TRIAGE_CATALOGUE_*``;
an invalid catalogue file or setting makes the proxy fail at start-up with the field named."""

from __future__ import annotations

from plugins import proxy_process
from plugins.catalogue.hook import CatalogueHook
from plugins.catalogue.settings import CatalogueSettings

proxy_process.prepare()
catalogue = CatalogueHook(CatalogueSettings())
catalogue.install_listing()
