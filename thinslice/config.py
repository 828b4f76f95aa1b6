"""The one config schema of the project: every YAML in config/ is validated against it.

Unknown or misspelled keys are errors that name the key (and suggest the closest valid one),
so a typo never silently falls back to a default.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file that does not match the schema; the message names every offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThickConfig(_Strict):
    """How a thick scan is simulated from a thin one (slab average)."""

    slab_thickness_mm: float = Field(5.0, gt=0)
    slab_spacing_mm: float = Field(5.0, gt=0)


class SeriesSelection(_Strict):
    """Which series of a case count as thin (truth) and thick (input)."""

    thin_max_spacing_mm: float = Field(2.0, gt=0)
    thick_min_spacing_mm: float = Field(3.0, gt=0)
    # "auto": a real thick series when the case has one, else simulate it from the thin series.
    thick_source: Literal["auto", "paired", "simulated"] = "auto"

    @model_validator(mode="after")
    def _ordered(self):
        if self.thick_min_spacing_mm <= self.thin_max_spacing_mm:
            raise ValueError("thick_min_spacing_mm must be larger than thin_max_spacing_mm")
        return self


class SplitConfig(_Strict):
    """Patient-level split; a patient's bucket depends only on its own id, so adding cases moves nobody."""

    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    seed: str = "thinslice-split-v1"
    # Pin patients (hashed ids or the raw names the patient_regex extracts) or case ids to a split.
    fixed: dict[str, Literal["train", "val", "test"]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class PatchConfig(_Strict):
    """Random patches for autoencoder training (TorchIO Queue)."""

    size: tuple[int, int, int] = (64, 64, 64)
    queue_length: int = Field(64, gt=0)
    samples_per_volume: int = Field(8, gt=0)
    body_threshold_hu: float = -500.0
    flip_axes: tuple[int, ...] = (0, 1)
    jitter_hu: float = Field(10.0, ge=0)
    jitter_scale: float = Field(0.02, ge=0, lt=0.5)


class DataConfig(_Strict):
    hu_window: tuple[float, float] = (-1024.0, 2048.0)
    thick: ThickConfig = ThickConfig()
    series: SeriesSelection = SeriesSelection()
    split: SplitConfig = SplitConfig()
    # Regex with one group applied to the case id to find the patient when DICOM has no PatientID.
    patient_regex: str | None = None
    patches: PatchConfig = PatchConfig()

    @model_validator(mode="after")
    def _window(self):
        if self.hu_window[1] <= self.hu_window[0]:
            raise ValueError("hu_window must be [low, high] with high > low")
        return self


class Config(_Strict):
    data: DataConfig = DataConfig()


def _describe(err: dict, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = model
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            ann = getattr(field, "annotation", None)
            parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if parent is None:
                break
        known = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{loc}: unknown key{hint}"
    return f"{loc or '<root>'}: {err['msg']}"


def parse_config(raw: dict | None, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw or {})
    except ValidationError as e:
        lines = [_describe(err, Config) for err in e.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config; None gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        raw = yaml.safe_load(f)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return parse_config(raw, str(path))
