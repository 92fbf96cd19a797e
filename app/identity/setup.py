"""Installs the identity concern into the app and returns its pipeline stage (stub until built)."""

from __future__ import annotations

from aiohttp import web

from app.proxy.pipeline import ChatCall, Stage


class _PassStage:
    name = "identity"

    async def admit(self, call: ChatCall) -> None:
        return None

    async def settle(self, call: ChatCall) -> None:
        return None


def setup_identity(app: web.Application) -> Stage:
    return _PassStage()
