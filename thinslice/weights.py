"""Where weight files named like `pretrained/unet.pt` are found, whatever folder a command runs from.

A config names weights relative to the project (`pretrained/unet.pt`); a user may run the installed
command from anywhere. So a relative name is tried, in order: as given (the current folder), under
$THINSLICE_PRETRAINED (a folder holding the weight files), and under the project folder this package
was installed from (an editable install or a checkout). The error names every place that was tried.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "THINSLICE_PRETRAINED"
PROJECT = Path(__file__).resolve().parents[1]


def candidates(name: str | Path) -> list[Path]:
    path = Path(name).expanduser()
    if path.is_absolute():
        return [path]
    places = [path]
    if os.environ.get(ENV):
        places.append(Path(os.environ[ENV]).expanduser() / path.name)
    places.append(PROJECT / path)
    return list(dict.fromkeys(places))


def find_weights(name: str | Path, what: str = "weights") -> Path:
    """The first existing candidate; FileNotFoundError listing them all otherwise."""
    places = candidates(name)
    for place in places:
        if place.is_file():
            return place
    tried = ", ".join(str(p if p.is_absolute() else Path.cwd() / p) for p in places)
    hint = "" if Path(name).is_absolute() else f"; set {ENV}=FOLDER to name the folder that holds it"
    raise FileNotFoundError(f"{what} not found: {name} (looked at {tried}{hint}; the shipped weights are in the "
                            f"project's pretrained/ folder, see pretrained/README.md)")
