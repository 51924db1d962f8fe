"""Routing: filters, bindings, first match wins, keys."""

from __future__ import annotations

import pytest

from bridge.config import Route
from bridge.errors import Rejected
from bridge.routing import FilterError, KeySpec, RouteFilter, Router


def route(name: str, pattern: str) -> Route:
    return Route(name=name, filter=RouteFilter.parse(pattern), kafka_topic=f"t.{name}")


def test_placeholders_bind_one_level_and_derive_the_subscription() -> None:
    f = RouteFilter.parse("sites/{site}/devices/{device_id}/telemetry")
    assert f.subscription == "sites/+/devices/+/telemetry"
    assert f.match("sites/berlin/devices/d1/telemetry") == {"site": "berlin", "device_id": "d1"}
    assert f.match("sites/berlin/devices/d1/alerts") is None
    assert f.match("sites/berlin/devices/d1/telemetry/extra") is None


def test_hash_matches_the_rest() -> None:
    f = RouteFilter.parse("devices/{device_id}/alerts/#")
    assert f.subscription == "devices/+/alerts/#"
    assert f.match("devices/d1/alerts/fire/now") == {"device_id": "d1"}
    assert f.match("devices/d1/alerts") == {"device_id": "d1"}
    assert f.match("devices/d1") is None


@pytest.mark.parametrize("pattern", ["", "$SYS/{device_id}", "a/#/{device_id}", "a/b+/{device_id}",
                                     "{device_id}/{device_id}", "a/{x}", "a/{device_id}\n",
                                     "a/{device_id}/b\x00", "a/{device_id}/" + "x" * 65535])
def test_bad_filters_are_refused(pattern: str) -> None:
    with pytest.raises(FilterError):
        RouteFilter.parse(pattern)


def test_first_matching_route_wins_and_subscriptions_are_distinct() -> None:
    router = Router([route("special", "devices/{device_id}/telemetry"),
                     route("catchall", "devices/{device_id}/#"),
                     route("again", "devices/{device_id}/telemetry")])
    assert router.match("devices/d7/telemetry")[0].name == "special"
    assert router.match("devices/d7/other/x")[:2] == (router.routes[1], "d7")
    assert router.subscriptions() == ["devices/+/telemetry", "devices/+/#"]


def test_unroutable_and_empty_device_ids_are_rejected_with_codes() -> None:
    router = Router([route("r", "devices/{device_id}/telemetry")])
    with pytest.raises(Rejected) as no_route:
        router.match("elsewhere/x")
    assert no_route.value.code == "no_route"
    with pytest.raises(Rejected) as empty:
        router.match("devices//telemetry")
    assert empty.value.code == "no_device_id"
    with pytest.raises(Rejected) as bad:
        router.match("devices/a\x00b/telemetry")
    assert bad.value.code == "invalid_device_id"


def test_arrival_millis_and_device_id_keys() -> None:
    assert KeySpec("arrival_millis").key("d1", 1700000000123) == b"1700000000123"
    assert KeySpec("device_id").key("d1", 1700000000123) == b"d1"
    assert KeySpec("none").key("d1", 1700000000123) is None


def test_time_bucket_groups_one_device_per_window() -> None:
    spec = KeySpec("time_bucket", window=60)
    assert spec.key("d1", 1_700_000_040_000) == b"d1@1700000040"
    assert spec.key("d1", 1_700_000_099_999) == b"d1@1700000040"
    assert spec.key("d1", 1_700_000_100_000) == b"d1@1700000100"
    assert spec.key("d2", 1_700_000_040_000) == b"d2@1700000040"


def test_hash_bucket_is_stable_and_bounded() -> None:
    spec = KeySpec("hash_bucket", buckets=8)
    keys = {spec.key(f"dev-{i}", 0) for i in range(1000)}
    assert keys == {str(b).encode() for b in range(8)}
    assert spec.key("dev-1", 0) == spec.key("dev-1", 10**12)
    assert spec.key("dev-1", 0) == b"2"  # sha256-based: the same in every process and release


def test_only_device_keys_are_computed_once_per_topic() -> None:
    assert [s for s in ("arrival_millis", "device_id", "time_bucket", "hash_bucket", "none")
            if KeySpec(s).per_device()] == ["device_id", "hash_bucket", "none"]


def test_kafka_topic_templates_render_bound_levels() -> None:
    r = Route(name="r", filter=RouteFilter.parse("sites/{site}/devices/{device_id}/t"),
              kafka_topic="iot.{site}.telemetry")
    found = Router([r]).match("sites/berlin/devices/d1/t")
    assert found.kafka_topic == "iot.berlin.telemetry"
    assert found.bindings == {"site": "berlin", "device_id": "d1"}


@pytest.mark.parametrize("site", ["a b", "x" * 250, "ü", ".."])
def test_a_template_that_breaks_kafka_rules_is_rejected(site: str) -> None:
    r = Route(name="r", filter=RouteFilter.parse("sites/{site}/devices/{device_id}/t"),
              kafka_topic="{site}")
    with pytest.raises(Rejected) as caught:
        Router([r]).match(f"sites/{site}/devices/d1/t")
    assert caught.value.code == "invalid_topic"


@pytest.mark.parametrize("device_id", ["d1", "A-b_c.d", "x" * 128, "..a"])
def test_safe_device_ids_pass(device_id: str) -> None:
    router = Router([route("t", "devices/{device_id}/telemetry")])
    assert router.match(f"devices/{device_id}/telemetry").device_id == device_id


@pytest.mark.parametrize("device_id", ["x" * 129, "a b", "a@b", "a:b", ".", "..", "dév", "a\nb",
                                       "a\\b"])
def test_unsafe_device_ids_are_refused_before_any_use(device_id: str) -> None:
    router = Router([route("t", "devices/{device_id}/telemetry")])
    with pytest.raises(Rejected) as refused:
        router.match(f"devices/{device_id}/telemetry")
    assert refused.value.code == "invalid_device_id"


@pytest.mark.parametrize(("first", "second", "covered"), [
    ("devices/{device_id}/telemetry", "devices/{device_id}/telemetry", True),  # the same
    ("devices/{device_id}/#", "devices/{device_id}/telemetry", True),
    ("devices/{device_id}/#", "devices/{device_id}", True),  # '#' takes its own level too
    ("devices/{device_id}/#", "devices/{device_id}/alerts/#", True),
    ("a/+/{device_id}", "a/x/{device_id}", True),  # '+' and placeholders take any level
    ("a/{site}/{device_id}", "a/+/{device_id}", True),
    ("{device_id}/#", "a/b/{device_id}/c", True),
    ("devices/{device_id}/telemetry", "devices/{device_id}/#", False),
    ("a/x/{device_id}", "a/+/{device_id}", False),  # a literal takes only itself
    ("devices/{device_id}/alerts/#", "devices/{device_id}", False),
    ("devices/{device_id}/telemetry", "devices/{device_id}/telemetry/raw", False),
    ("devices/{device_id}/telemetry", "devices/{device_id}/alerts", False),
    ("a/+/+/{device_id}", "a/+/{device_id}", False),
])
def test_a_filter_covers_another_when_it_matches_every_topic_the_other_does(
        first: str, second: str, covered: bool) -> None:
    assert RouteFilter.parse(first).covers(RouteFilter.parse(second)) is covered
