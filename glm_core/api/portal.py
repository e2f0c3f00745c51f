"""The API on the portal's own server. Streamlit's ASGI entry (`st.App`, which `streamlit run Home.py` serves with
uvicorn when Home.py defines `app = st.App(...)`) takes extra routes and a lifespan, not a mounted application:
a Mount at "/" would swallow the portal's own paths. So the whole API application becomes one route that claims
exactly the requests one of its routes matches and hands them over whole (its middleware, error handlers and
docs); every other request falls through to Streamlit."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.routing import BaseRoute, Match


class ApiRoutes(BaseRoute):
    def __init__(self, api: FastAPI):
        self.api = api

    def matches(self, scope) -> tuple[Match, dict]:
        if scope["type"] != "http":
            return Match.NONE, {}
        best = Match.NONE
        for route in self.api.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return Match.FULL, {}
            if match == Match.PARTIAL:  # the path is the API's but not the method: Streamlit may still take it
                best = Match.PARTIAL  # (GET / is the portal's page, POST / the API's)
        return best, {}

    async def handle(self, scope, receive, send) -> None:
        await self.api(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params):
        return self.api.url_path_for(name, **path_params)
