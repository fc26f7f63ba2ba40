"""Deprecated ``ResilienceMiddleware(route_deadlines={path: seconds})``; to be removed.

Use ``@redis_deadline(seconds)`` on the endpoint (FastAPI: also ``Depends(redis_deadline(s))``).
Kept working without routing of our own: the app's routes say which one takes the request.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from starlette.routing import Match
from starlette.types import Scope

from otel_redis_resilience import ConfigurationError, validate_deadline


def check_route_deadlines(
    route_deadlines: Mapping[str, float | None] | None,
) -> dict[str, float | None]:
    if route_deadlines is None:
        return {}
    if not isinstance(route_deadlines, Mapping):
        raise ConfigurationError(
            "ResilienceMiddleware.route_deadlines must be a mapping {path: seconds}, "
            f"got {route_deadlines!r}"
        )
    for path, seconds in route_deadlines.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError(
                "ResilienceMiddleware.route_deadlines keys must be paths starting with '/' "
                f"(as the routes declare them), got {path!r}"
            )
        validate_deadline(f"ResilienceMiddleware route_deadlines[{path!r}]", seconds)
    warnings.warn(
        "ResilienceMiddleware(route_deadlines=...) is deprecated: decorate the endpoint with "
        "@redis_deadline(seconds) (FastAPI: also Depends(redis_deadline(seconds)))",
        DeprecationWarning,
        stacklevel=3,
    )
    return dict(route_deadlines)


def apply_route_deadline(scope: Scope, deadlines: dict[str, float | None], request_scope: Any) -> None:
    """Ask the app's own routes which one takes this request (Starlette's matching, not ours)."""
    for route in getattr(scope.get("app"), "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            path = getattr(route, "path", None)
            if path in deadlines:
                request_scope.set_deadline(deadlines[path])
            return
