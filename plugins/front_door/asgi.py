"""The ASGI application uvicorn serves in each proxy worker (``plugins/proxy_main.py``):
LiteLLM's proxy app behind the front door. Settings (``TRIAGE_FRONT_DOOR_*``) are validated on
import, so a bad one stops the proxy at start-up with the field named."""

from __future__ import annotations

from litellm.proxy.proxy_server import app as litellm_app

from plugins import proxy_process
from plugins.front_door.door import FrontDoor
from plugins.front_door.proxy_side import LiteLLMSide
from plugins.front_door.settings import FrontDoorSettings

proxy_process.prepare()
settings = FrontDoorSettings()
app = FrontDoor(litellm_app, settings, LiteLLMSide(settings))
