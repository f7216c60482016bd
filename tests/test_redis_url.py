"""The Redis URLs every component accepts (``core/redis_url.py``): plain, TLS, unix socket and
``redis+sentinel://``; bad ones stop startup with the field named and the password hidden."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.redis_url import SentinelTarget, check_redis_url, redacted, sentinel_target
from plugins.auth.settings import KeysSettings
from plugins.routing.settings import RoutingSettings
from sidecar.settings import SidecarSettings


def test_sentinel_urls_name_the_sentinels_the_service_and_the_credentials() -> None:
    url = "redis+sentinel://triage-proxy:s3cret@10.0.0.1:26380,[::1],sentinel-2/triage/3"
    assert sentinel_target(url) == SentinelTarget(
        sentinels=(("10.0.0.1", 26380), ("::1", 26379), ("sentinel-2", 26379)),
        service="triage",
        db=3,
        username="triage-proxy",
        password="s3cret",
    )
    target = sentinel_target("redis+sentinel://:pw@h:1/svc?sentinel_password=spw&ssl=true")
    assert target is not None
    assert (target.username, target.password, target.db) == (None, "pw", 0)
    assert (target.sentinel_password, target.ssl) == ("spw", True)
    assert sentinel_target("redis://127.0.0.1:6379/0") is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://:pw@h:26379", "SERVICE"),
        ("redis+sentinel://:pw@h:26379/svc/zero", "database must be a number"),
        ("redis+sentinel://:pw@h:port/svc", "bad Sentinel port"),
        ("redis+sentinel://:pw@h,,k/svc", "has no host"),
        ("redis+sentinel://:pw@h/svc?password=x", "unknown query parameter"),
        ("http://:pw@h:6379/0", r"unix:// or redis\+sentinel://"),
        ("redis://:pw@/0", "has no host"),
    ],
)
def test_bad_urls_say_what_is_wrong_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        check_redis_url(url)
    assert "pw" not in str(caught.value).replace("password", "")


def test_every_settings_model_takes_sentinel_urls_and_names_a_bad_one() -> None:
    url = "redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/triage/0"
    assert RoutingSettings(redis_url=url).redis_url == url
    assert KeysSettings(redis_url=url).redis_url == url
    assert (
        SidecarSettings(
            replica_id="r", model="m", triton_url="http://127.0.0.1:8000", redis_url=url
        ).redis_url
        == url
    )
    with pytest.raises(ValidationError, match="redis_url") as caught:
        RoutingSettings(redis_url="redis+sentinel://:pw@h/")
    assert ":pw@" not in str(caught.value)


def test_redacted_hides_every_password() -> None:
    assert redacted("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert (
        redacted("redis+sentinel://:pw@a:1,b:2/s?sentinel_password=spw")
        == "redis+sentinel://:***@a:1,b:2/s?sentinel_password=***"
    )
    assert redacted("redis://h:1/0") == "redis://h:1/0"
    # a base64 password may hold "/", "?" or "#" unescaped: masked all the same
    assert redacted("redis://:Ab+c/d9==@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted("redis://h/0?password=x") == "redis://h/0?password=***"
    with pytest.raises(ValueError) as caught:
        check_redis_url("redis://:Ab+c/d9==@:6379/0")
    assert "d9==" not in str(caught.value)
