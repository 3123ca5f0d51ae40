"""The OpenAI-compatible HTTP server: `create_app` builds the FastAPI app over an `AsyncEngine`."""

from kvengine.server.app import create_app

__all__ = ["create_app"]
