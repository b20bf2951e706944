"""Send result objects to the destination by C-STORE (one association per series' results)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edgekidney.dicomnet.config import Destination

# Statuses a PACS may answer that still mean "stored": success and the warnings (coercion etc.).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class SendError(Exception):
    """The destination did not take the results (down, refused, or answered with a failure status)."""


def send_files(paths: list[Path], dest: Destination, calling_ae_title: str, timeout_s: float = 30.0,
               ssl_context=None) -> int:
    """C-STORE each file to ``dest``; returns how many were stored. Raises SendError otherwise."""
    from pynetdicom import AE

    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10.0)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls = (ssl_context, dest.host) if ssl_context is not None else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "unreachable"
        raise SendError(f"destination {dest} {why}")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"destination {dest}: no response to C-STORE (timeout or connection lost)")
            if code not in STORED:
                raise SendError(f"destination {dest}: C-STORE status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return len(datasets)
