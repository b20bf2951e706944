"""``edgekidney serve``: open the model (fail fast, one line), then run uvicorn until SIGINT/SIGTERM.

On SIGTERM uvicorn stops accepting, lets in-flight requests finish (up to ``graceful_timeout_s``),
then the app's lifespan drains the batcher and closes the model.
"""

from __future__ import annotations

import logging
import sys

from edgekidney.errors import DependencyError
from edgekidney.server.config import ServeConfig

log = logging.getLogger("edgekidney.server")


def setup_logging(level: str) -> None:
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s edgekidney: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False


def open_classifier(config: ServeConfig):
    from edgekidney.runtime.predict import Classifier

    # no spinning where a backend has a thread pool: it must not steal the cores the event loop decodes on
    return Classifier(config.model, backend=config.backend, threshold=config.threshold, device=config.device,
                      threads=config.threads, defaults={"spinning": False})


def serve(config: ServeConfig) -> None:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise DependencyError(f"the server needs {exc.name}: pip install 'edgekidney[serve]'") from None
    from edgekidney.server.app import create_app

    config.validate()
    setup_logging(config.log_level)
    classifier = open_classifier(config)  # a bad model fails here, before anything listens
    if not config.loopback and not config.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model",
                    config.host)
    app = create_app(classifier, config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level.lower(), access_log=False,
        server_header=False, lifespan="on", timeout_graceful_shutdown=config.graceful_timeout_s))
    server.run()
    if not server.started:  # e.g. the port is taken; uvicorn has said why
        raise SystemExit(1)
