"""The proxy's deployments for a catalogue: one per (model, server it may run on)."""

from __future__ import annotations

from typing import Any

from plugins.catalogue.settings import Catalogue, replica_id
from plugins.triton_provider.deployments import triton_deployment


def catalogue_deployments(catalogue: Catalogue) -> list[dict[str, Any]]:
    """Every server a model may run on gets a deployment (``model_info.id`` = the replica id
    its sidecar publishes); routers use only those whose replica is loaded and healthy."""
    return [
        triton_deployment(
            name,
            replica_id(server, name),
            catalogue.servers[server].api_base,
            entry.triton_model,
            dialect=entry.dialect,
        )
        for name, entry in catalogue.models.items()
        for server in catalogue.servers_of(name)
    ]
