"""More real photographs for alignment: the desktop backgrounds of Debian's ``lomiri-wallpapers-16.04``,
``lomiri-wallpapers-20.04`` and ``mate-backgrounds`` packages (offline, 1280×1024 to 6028×3391).

Why a third collection: with 41 training sources the held-out fidelity of a stage-2 student plateaus after
~200 steps while its training-crop fidelity keeps rising (``benchmarks/fidelity_budget.py``), so the next lever
is more *sources*, not more steps. These 28 photographs (landscapes, plants, animals, interiors, still lifes)
add 70 % more sources. The packages' artwork and flat colour fields are left out: only named photographs are
used, listed here so that a package update cannot silently change what a recipe trains on. Train-only: the
held-out set (``heldout``) stays the 10 sources it was, so numbers stay comparable across sessions.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError

ROOT_ENV = "ADALA_BACKGROUNDS"
DEFAULT_ROOT = Path("/usr/share/backgrounds")
PACKAGES = ("lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "mate-backgrounds")
INSTALL_HINT = f"apt-get install {' '.join(PACKAGES)} (make data does it as root)"
# name -> path under the root; every one a photograph.
PHOTOGRAPHS = {
    "bridge": "Bridge_by_Sander_Klootwijk.jpg",
    "dragonfly": "Dragonfly_by_Bolly.jpg",
    "fig": "Picture_0B_by_freespace.jpg",
    "brushes": "Picture_1A_by_freespace.jpg",
    "wine": "Wine_by_Jakkub_Mede.jpg",
    "aitzgorri": "aitzgorri_by_Aitzol_Berasategi.jpg",
    "analogpattern": "analogpattern_by_Peter_Nerlich.jpg",
    "free": "free_by_Peter_Nerlich.jpg",
    "friends": "friends_by_Aitzol_Berasategi.jpg",
    "greentock": "greentock_by_Peter_Nerlich.jpg",
    "life": "life_by_Aitzol_Berasategi.jpg",
    "picosdeeuropa": "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "seeding": "seeding_by_Clements_Engelhardt.jpg",
    "sunset": "sunset_by_Aitzol_Berasategi.jpg",
    "infinite_sea": "Infinite-Sea_by_Aury88.jpg",
    "kleiber": "Kleiber_by_Lukas_Baubkus.jpg",
    **{f"mate_{n.lower()}": f"mate/nature/{n}.jpg" for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")},
}


def background_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def background_files() -> dict[str, Path]:
    """Name -> file of every listed photograph that is installed; a DataError with the install hint when none."""
    root = background_root()
    found = {n: root / rel for n, rel in PHOTOGRAPHS.items() if (root / rel).is_file()}
    if not found:
        raise DataError(f"no background photographs under {root}: {INSTALL_HINT}")
    return found
