"""The HTTP inference service (``edgekidney serve``): FastAPI + uvicorn, dynamic micro-batching.

Modules, one job each:

- :mod:`.config`   -- :class:`ServeConfig`, the typed options of the service;
- :mod:`.inputs`   -- request bodies: content types, size limit, multipart parts, decoding (the CLI's code);
- :mod:`.batching` -- :class:`MicroBatcher`, requests arriving together run as one batch;
- :mod:`.metrics`  -- Prometheus text exposition, written by hand;
- :mod:`.app`      -- the FastAPI app: routes, API key, one log line per request, lifespan;
- :mod:`.run`      -- :func:`serve`: open the model and run uvicorn (what the CLI calls).

FastAPI and uvicorn are the ``serve`` extra; importing this package does not need them.
"""

from edgekidney.server.config import ServeConfig

__all__ = ["ServeConfig", "serve"]


def serve(config: ServeConfig) -> None:
    from edgekidney.server.run import serve as _serve

    _serve(config)
