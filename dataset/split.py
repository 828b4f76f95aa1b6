"""Patient-level train/val/test split that never moves a patient when other cases are added.

A patient's split is a function of its own (hashed) id alone: u = hash(seed, patient) in [0, 1)
picks test, val or train by the configured fractions. `fixed` pins chosen patients
(by pseudonym, or by the raw id, which for files without a patient id is the case name).
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path

from thinslice.atomic import atomic_path
from thinslice.config import SplitConfig


KEY_FILE = "pseudonym.key"


def dataset_key(cache: Path) -> bytes:
    """The cache's secret for pseudonyms: 32 random bytes made on first use, kept only in the cache
    (never in latents, checkpoints, logs or reports). Keep it to keep pseudonyms and splits stable;
    a cache prepared with a new key gets new pseudonyms, hence new splits."""
    return key_from_file(Path(cache) / KEY_FILE)


def key_from_file(path: Path) -> bytes:
    """The secret in `path`, made there (owner-only, 0600) on first use."""
    path = Path(path)
    if not path.exists():
        with atomic_path(path, mode=0o600) as tmp:
            tmp.write_text(secrets.token_hex(32) + "\n")
    return bytes.fromhex(path.read_text().strip())


def patient_key(raw_id: str, key: bytes) -> str:
    """A pseudonym that cannot be confirmed: HMAC-SHA256 of the raw id (DICOM PatientID or a name) under
    the cache's secret key, so holding a candidate id is not enough to check it against the cache."""
    return "pt-" + hmac.new(key, raw_id.encode(), hashlib.sha256).hexdigest()[:12]


def case_pseudonym(name: str, key: bytes) -> str:
    """A case id that does not repeat its folder or file name (keyed like patient pseudonyms)."""
    return "case-" + hmac.new(key, b"case:" + name.encode(), hashlib.sha256).hexdigest()[:12]


def patient_raw_id(case_id: str, dicom_patient_id: str, regex: str | None) -> str:
    if dicom_patient_id.strip():
        return dicom_patient_id.strip()
    if regex:
        m = re.search(regex, case_id)
        if m:
            return m.group(1) if m.groups() else m.group(0)
    return case_id


def assign_split(patient: str, cfg: SplitConfig, raw_patient: str | None = None, case_id: str | None = None) -> str:
    """`fixed` pins by pseudonym, by a name-derived patient label, or by case id (a local folder name)."""
    for key in (patient, raw_patient, case_id):
        if key and key in cfg.fixed:
            return cfg.fixed[key]
    digest = hashlib.sha256(f"{cfg.seed}:{patient}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"
