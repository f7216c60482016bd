"""``python -m plugins.proxy_main <litellm CLI arguments>``: LiteLLM's own proxy CLI, serving
LiteLLM's app behind triage's front door (``plugins/front_door``).

Everything LiteLLM's ``litellm`` command does (config loading, workers, Prometheus multiprocess
directory, uvicorn settings) stays as it is; the one change is the ASGI application uvicorn
imports: ``plugins.front_door.asgi:app`` (LiteLLM's app wrapped) instead of
``litellm.proxy.proxy_server:app``. uvicorn imports it by name in every worker process, so the
front door runs in each of ``--num_workers`` workers.
"""

from __future__ import annotations

import sys
from typing import Any

from litellm.proxy import proxy_cli

FRONT_DOOR_APP = "plugins.front_door.asgi:app"
LITELLM_APP = "litellm.proxy.proxy_server:app"


def _patch_uvicorn_app() -> None:
    helpers = proxy_cli.ProxyInitializationHelpers
    original = helpers.get_default_unvicorn_init_args

    def with_front_door(*args: Any, **kwargs: Any) -> dict[str, Any]:
        uvicorn_args = original(*args, **kwargs)
        if uvicorn_args.get("app") != LITELLM_APP:
            raise RuntimeError(
                f"LiteLLM's CLI serves {uvicorn_args.get('app')!r}, not {LITELLM_APP!r}: "
                "the front door does not know this LiteLLM version"
            )
        uvicorn_args["app"] = FRONT_DOOR_APP
        return uvicorn_args

    helpers.get_default_unvicorn_init_args = staticmethod(with_front_door)  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    _patch_uvicorn_app()
    proxy_cli.run_server.main(args=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
