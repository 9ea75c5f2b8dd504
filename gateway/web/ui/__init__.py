"""The dashboard under `/ui`: server-rendered pages over the store's read layer, live by SSE."""

from gateway.web.ui.routes import add_ui_routes

__all__ = ["add_ui_routes"]
