"""Tell thin from thick within a case by slice spacing and thickness, never by folder names."""
from __future__ import annotations

from dataclasses import dataclass, field

from dataset.errors import CaseError
from thinslice.config import SeriesSelection


@dataclass
class Pair:
    thin: object | None  # None: a thick-only case (in-plane training pairs only, nothing to score against)
    thick: object | None  # None: simulate it from the thin series
    skipped: list[str] = field(default_factory=list)


def _describe(s) -> str:
    return f"{s.name} ({s.plane}, {s.spacing:.2f} mm spacing, {s.thickness:.2f} mm thick, {s.n_slices} slices)"


def choose_pair(series: list, sel: SeriesSelection, target_spacing: float = 5.0) -> Pair:
    skipped = [s.skip_reason for s in series if s.skip_reason]
    usable = [s for s in series if not s.skip_reason]
    if not usable:
        raise CaseError("; ".join(skipped) or "no usable series")
    planes = {s.plane for s in usable}
    plane = "axial" if "axial" in planes else min(usable, key=lambda s: s.spacing).plane
    for s in usable:
        if s.plane != plane:
            skipped.append(f"series {s.name}: {s.plane} series skipped, the case is read in the {plane} plane")
    usable = [s for s in usable if s.plane == plane]

    def thin_ok(s):
        return s.spacing <= sel.thin_max_spacing_mm

    def thick_ok(s):
        return s.spacing >= sel.thick_min_spacing_mm

    thins = sorted([s for s in usable if thin_ok(s)], key=lambda s: (s.spacing, s.thickness))
    thicks = sorted([s for s in usable if thick_ok(s)], key=lambda s: abs(s.spacing - target_spacing))
    for s in usable:
        if not thin_ok(s) and not thick_ok(s):
            skipped.append(f"series {s.name}: {s.spacing:.2f} mm spacing is neither thin "
                           f"(<= {sel.thin_max_spacing_mm:g}) nor thick (>= {sel.thick_min_spacing_mm:g})")
    if not thins:
        found = "; ".join(_describe(s) for s in usable)
        if thicks and sel.keep_thick_only:
            thick = thicks[0]
            skipped += [f"series {s.name}: another thick series, kept {thick.name}" for s in thicks[1:]]
            return Pair(None, thick, skipped)
        if thicks:
            raise CaseError(f"only thick series, no thin truth (<= {sel.thin_max_spacing_mm:g} mm) "
                            f"to learn from or score against: {found} (keep_thick_only is off)")
        raise CaseError(f"no thin series (<= {sel.thin_max_spacing_mm:g} mm): {found}")
    thin = thins[0]
    skipped += [f"series {s.name}: another thin series, kept {thin.name}" for s in thins[1:]]
    thick = None
    if sel.thick_source != "simulated" and thicks:
        thick = thicks[0]
        skipped += [f"series {s.name}: another thick series, kept {thick.name}" for s in thicks[1:]]
    elif sel.thick_source == "paired":
        raise CaseError(f"no thick series (>= {sel.thick_min_spacing_mm:g} mm) and thick_source is 'paired'")
    return Pair(thin, thick, skipped)
