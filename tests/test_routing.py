"""Routes pinned to versions and labels: the config's checks, how a request picks a
route (coalesce.core.routing) and the Router's answers to KServe and TF Serving names."""

from __future__ import annotations

import pytest
from coalesce import config
from coalesce.core.routing import RouteTable
from coalesce.errors import NotFound

from tests.conftest import local_backend, running


def parse(*routes: dict) -> config.Config:
    backends = {"a": local_backend("affine"), "e": local_backend("echo")}
    return config.parse({"backends": backends, "routes": list(routes)})


def problems(*routes: dict) -> list[str]:
    with pytest.raises(config.ConfigError) as error:
        parse(*routes)
    return error.value.problems


def test_a_version_or_label_may_be_routed_once_per_model():
    assert problems({"model": "m", "backend": "a"}, {"model": "m", "backend": "e"}) == [
        "routes.1.model: 'm' is routed twice"
    ]
    v1 = {"model": "m", "version": 1, "backend": "a"}
    assert problems(v1, {**v1, "label": "x"}) == ["routes.1.model: 'm' version 1 is routed twice"]
    stable = {"model": "m", "label": "stable", "backend": "a"}
    assert problems(stable, stable) == ["routes.1.model: 'm' label 'stable' is routed twice"]
    assert problems({**v1, "version": 0}) == ["routes.0.version: must be >= 1"]
    assert problems({**v1, "label": ""})[0].startswith("routes.0.label:")
    parse(v1, {"model": "m", "backend": "e"}, {"model": "m", "version": 2, "backend": "e"})


def table(*routes: dict) -> RouteTable:
    return RouteTable(parse(*routes).routes)


PINNED = (
    {"model": "m", "version": 1, "label": "stable", "backend": "a"},
    {"model": "m", "version": 3, "backend": "e"},
    {"model": "m", "label": "canary", "backend": "e"},
)


def test_pinned_routes_are_found_by_version_and_label():
    routes = table(*PINNED)
    assert routes.find("m").version == 3  # no version asked: the highest
    assert routes.find("m", "1").backend == "a"
    assert routes.find("m", label="stable").version == 1
    assert routes.find("m", label="canary").backend == "e"
    assert routes.find("other") is None
    with pytest.raises(NotFound, match=r"no version '2' \(routed: versions 1, 3; labels"):
        routes.find("m", "2")
    with pytest.raises(NotFound, match="no version label 'beta'"):
        routes.find("m", label="beta")
    assert [(r.version, r.label) for r in routes.routes_of("m")] == [
        (None, "canary"),
        (1, "stable"),
        (3, None),
    ]


def test_a_plain_route_takes_versions_nobody_pinned():
    routes = table({"model": "m", "backend": "a"}, {"model": "m", "version": 2, "backend": "e"})
    assert routes.find("m").backend == "a"  # the plain route is the default
    assert routes.find("m", "2").backend == "e"
    assert routes.find("m", "7").backend == "a"  # its backend decides about version 7


async def test_router_get_resolves_versions_for_every_front_end():
    data = {
        "backends": {"a": local_backend("affine"), "e": local_backend("echo")},
        "routes": [
            {"model": "m", "backend": "a"},
            {"model": "m", "version": 2, "label": "canary", "backend": "e"},
            {"model": "only-pinned", "version": 5, "backend": "e"},
        ],
    }
    async with running(data) as server:
        router = server.router
        assert router.get("m") is router.backends["a"]
        assert router.get("m", "1") is router.backends["a"]  # the local model's own version
        assert router.get("m", "2") is router.backends["e"]
        assert router.get("m", label="canary") is router.backends["e"]
        assert router.get("only-pinned") is router.backends["e"]
        with pytest.raises(NotFound, match="has no version '7'"):
            router.get("m", "7")
        with pytest.raises(NotFound, match="has no version '1'"):
            router.get("only-pinned", "1")
        with pytest.raises(NotFound, match="is not routed"):
            router.get("nope", "1")
