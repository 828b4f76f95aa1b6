"""Patient-level train/val/test split that never moves a patient when other cases are added.

A patient's split is a function of its own (hashed) id alone: u = hash(seed, patient) in [0, 1)
picks test, val or train by the configured fractions. `fixed` pins chosen patients
(by pseudonym, or by the raw id, which for files without a patient id is the case name).
"""
from __future__ import annotations

import hashlib
import re

from thinslice.config import SplitConfig


def patient_key(raw_id: str) -> str:
    """A stable pseudonym: the raw id (DICOM PatientID or a name) is never written out."""
    return "pt-" + hashlib.sha256(raw_id.encode()).hexdigest()[:12]


def patient_raw_id(case_id: str, dicom_patient_id: str, regex: str | None) -> str:
    if dicom_patient_id.strip():
        return dicom_patient_id.strip()
    if regex:
        m = re.search(regex, case_id)
        if m:
            return m.group(1) if m.groups() else m.group(0)
    return case_id


def assign_split(patient: str, cfg: SplitConfig, raw_patient: str | None = None) -> str:
    for key in (patient, raw_patient):
        if key and key in cfg.fixed:
            return cfg.fixed[key]
    digest = hashlib.sha256(f"{cfg.seed}:{patient}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"
