"""Which study and series an instance is filed under.

Normally its Study and Series Instance UIDs. Some exports blank them (de-identification gone too far;
the shared JPEG 2000 series is one). Such an instance is still accepted, never refused or lost, and
filed under substitute keys made from what the slices of one series share (frame of reference, series
number and description, modality). A series filed that way is classified and gets a results line, but
no SR: a PACS could not file it beside images whose study it cannot name.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from edgekidney.dicomnet.sr import derived_uid

SUBSTITUTE_PREFIX = "2.25."  # substitute keys are UUID-derived UIDs, flagged in the job table by this tag
FILING_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SeriesNumber",
               "SeriesDescription", "Modality", "StudyDate", "StudyTime"]


def filing_uids(ds: Dataset) -> tuple[str, str, bool]:
    """(study key, series key, substituted?) for a dataset read with at least ``FILING_TAGS``."""
    study = str(ds.get("StudyInstanceUID", "") or "")
    series = str(ds.get("SeriesInstanceUID", "") or "")
    if study and series:
        return study, series, False
    shared = [str(ds.get(t, "") or "") for t in FILING_TAGS[2:]]
    study = study or derived_uid("substitute-study", shared[0], *shared[4:])
    series = series or derived_uid("substitute-series", study, *shared)
    return study, series, True
