"""The instance the proxy config names: ``litellm_settings.callbacks:
["plugins.admission.proxy_callback.admission"]``. Settings come from ``TRIAGE_ADMISSION_*``;
invalid or missing settings make the proxy fail at start-up with the field named."""

from __future__ import annotations

from plugins import proxy_process
from plugins.admission.hook import AdmissionHook
from plugins.admission.settings import AdmissionSettings

proxy_process.prepare()
admission = AdmissionHook(AdmissionSettings())
