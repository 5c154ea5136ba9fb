"""/api/routes and `probewire routes` read the route learner through the family's capability
(``learned_routes()``), and /api/services/{name} lists what that service learned."""

from __future__ import annotations

from prometheus_client.registry import CollectorRegistry

from probewire.agent import Agent
from probewire.aggregate.routes import PARAM, RouteTemplater
from probewire.config import Config
from probewire.serve.api import Api
from probewire.serve.history import History
from probewire.serve.openapi import openapi_document


def _api_with_learner() -> tuple[Api, RouteTemplater]:
    agent = Agent(Config.model_validate(
        {"probes": {"http": {"route_learning": {"max_distinct": 3}}}}))
    # The capability the l7 family offers, over the templater its record path uses.
    templater = agent.probes["l7"].templater  # type: ignore[attr-defined]
    assert isinstance(templater, RouteTemplater)
    return Api(agent, CollectorRegistry(auto_describe=False), History()), templater


def test_api_routes_lists_each_services_learned_templates() -> None:
    api, templater = _api_with_learner()
    for name in ("ann", "bob", "cat", "dan", "eve"):
        templater.template(f"/u/{name}/x", "web")
    templater.template("/health", "db")
    data = api.handle("/api/routes", {})
    assert data["enabled"] and data["generation"] == 1
    web = data["services"]["web"]
    assert [t["template"] for t in web["templates"]] == [f"/u/{PARAM}"]
    assert web["templates"][0]["distinct_values"] == 4 and web["collapsed"] == 1
    assert data["services"]["db"]["templates"] == []
    only = api.handle("/api/routes", {"service": ["db"]})
    assert list(only["services"]) == ["db"]


def test_api_routes_says_off_when_learning_is_off() -> None:
    agent = Agent(Config.model_validate(
        {"probes": {"http": {"route_learning": {"enabled": False}}}}))
    api = Api(agent, CollectorRegistry(auto_describe=False), History())
    assert api.handle("/api/routes", {}) == {"enabled": False, "generation": 0, "services": {}}


def test_openapi_describes_the_routes_endpoint() -> None:
    doc = openapi_document("0")
    assert "/api/routes" in doc["paths"]
    assert "LearnedRoute" in doc["components"]["schemas"]
