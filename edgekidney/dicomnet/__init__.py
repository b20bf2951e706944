"""DICOM at the scanner: a Storage SCP that never loses an acknowledged instance, and results back to PACS.

No torch on this path (it runs on the device). See docs/listener.md.
"""

from edgekidney.dicomnet.config import Destination, ListenerConfig, TlsConfig
from edgekidney.dicomnet.processor import FallbackProcessor, ProcessResult, SeriesProcessor, fallback_processor, make_processor
from edgekidney.dicomnet.service import Listener

__all__ = ["Destination", "FallbackProcessor", "Listener", "ListenerConfig", "ProcessResult", "SeriesProcessor",
           "TlsConfig", "fallback_processor", "make_processor", "run"]


def run(cfg: ListenerConfig, model, log_level: str = "info", processor: str = "auto", plane: str = "axial",
        **classifier_options) -> None:
    """Load the model, start the listener, serve until SIGTERM/SIGINT."""
    import logging
    import signal
    import threading

    from edgekidney.errors import DependencyError

    try:
        import pynetdicom  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise DependencyError(f"the listener needs {exc.name}: pip install 'edgekidney[net]'") from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "highdicom"):  # their INFO lines echo UIDs
        logging.getLogger(noisy).setLevel(logging.WARNING)
    proc, close, name = make_processor(model, processor, plane, **classifier_options)
    logging.getLogger("edgekidney.listener").info("processor: %s", name)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    listener = Listener(cfg, proc)
    try:
        listener.start()
        done.wait()
        logging.getLogger("edgekidney.listener").info("stopping")
        listener.stop()
    finally:
        close()
