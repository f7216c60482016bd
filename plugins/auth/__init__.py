"""Offline virtual keys: a Redis-backed key store, LiteLLM ``custom_auth`` and a model-access hook.

See ``plugins/auth/README.md``. Modules: ``settings`` (``KeysSettings``), ``keystore``
(``KeyStore``, ``KeyRecord``), ``custom_auth`` (``user_api_key_auth`` for
``general_settings.custom_auth``), ``model_access`` (``model_access`` for
``litellm_settings.callbacks``), ``identity`` (``priority_of`` / ``key_id_of`` for other plugins)
and ``cli`` (``triage keys``).
"""
