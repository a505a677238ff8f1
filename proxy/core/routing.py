"""Which route serves a request for (model, version, label).

Several routes may share a model name, as the versions of one model do on TF
Serving: at most one plain route, plus routes pinned to a version number and/or
a version label. With no version asked, the plain route serves, else the highest
pinned version. A version with no route pinned to it goes to the plain route
(whose backend then decides whether it has that version, as before versions
could be routed); a label must be routed. Kept apart from the Router so that
every front end (KServe and TF Serving, gRPC and REST) resolves names one way.
"""

from __future__ import annotations

from collections.abc import Sequence

from coalesce.config import Route
from coalesce.errors import NotFound


class RouteTable:
    """The routes of a config, indexed by model name, version and label."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._plain: dict[str, Route] = {}
        self._versions: dict[str, dict[str, Route]] = {}
        self._labels: dict[str, dict[str, Route]] = {}
        for route in routes:
            if route.version is not None:
                self._versions.setdefault(route.model, {})[str(route.version)] = route
            if route.label is not None:
                self._labels.setdefault(route.model, {})[route.label] = route
            if route.version is None and route.label is None:
                self._plain[route.model] = route

    def default(self, model: str) -> Route | None:
        """The route for a request that names no version or label."""
        route = self._plain.get(model)
        if route is None and model in self._versions:
            versions = self._versions[model]
            route = versions[max(versions, key=int)]
        if route is None and model in self._labels:
            route = next(iter(self._labels[model].values()))
        return route

    def defaults(self) -> dict[str, Route]:
        models = [*self._plain, *self._versions, *self._labels]
        return {model: self.default(model) for model in dict.fromkeys(models)}  # type: ignore[misc]

    def find(self, model: str, version: str = "", label: str = "") -> Route | None:
        """The route for a request; None if the model is not routed at all."""
        if label:
            route = self._labels.get(model, {}).get(label)
            if route is None and self.default(model) is not None:
                raise NotFound(
                    f"model '{model}' has no version label '{label}'{self._known(model)}"
                )
            return route
        if version:
            route = self._versions.get(model, {}).get(version)
            if route is not None:
                return route
            if model in self._versions and model not in self._plain:
                raise NotFound(f"model '{model}' has no version '{version}'{self._known(model)}")
        return self.default(model)

    def routes_of(self, model: str) -> list[Route]:
        """Every route of a model name: the plain one first, then by version."""
        found = [self._plain[model]] if model in self._plain else []
        pinned = [*self._versions.get(model, {}).values(), *self._labels.get(model, {}).values()]
        pinned.sort(key=lambda r: r.version or 0)
        return found + [r for r in dict.fromkeys(pinned) if r not in found]

    def _known(self, model: str) -> str:
        versions = sorted(self._versions.get(model, {}), key=int)
        labels = sorted(self._labels.get(model, {}))
        known = [f"versions {', '.join(versions)}"] if versions else []
        known += [f"labels {', '.join(labels)}"] if labels else []
        return f" (routed: {'; '.join(known)})" if known else ""
