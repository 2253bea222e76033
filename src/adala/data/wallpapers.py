"""Real high-resolution images from Debian's ``plasma-workspace-wallpapers`` (offline, up to 5120×2880).

The package installs one folder per wallpaper, ``/usr/share/wallpapers/<Name>/contents/images/<W>x<H>.<ext>``,
each in several sizes; we take the largest. About a dozen are photographs, the rest artwork. They are the only
offline images large enough that a 448²–1344² crop is real high-resolution content rather than an upsampled
thumbnail, which is what alignment at the sizes users run needs.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from ..errors import DataError

ROOT_ENV = "ADALA_WALLPAPERS"
DEFAULT_ROOT = Path("/usr/share/wallpapers")
INSTALL_HINT = "apt-get install plasma-workspace-wallpapers (make data does it as root)"
# The photographs among the wallpapers; everything else there is artwork (also used for training).
PHOTOGRAPHS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
               "Kite", "OneStandsOut", "Path", "Shell", "summer_1am")
_SIZE = re.compile(r"^(\d+)x(\d+)\.(jpe?g|png)$", re.IGNORECASE)


def wallpaper_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


@lru_cache(maxsize=4)
def _scan(root: Path) -> tuple[tuple[str, Path], ...]:
    found = []
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            images = folder / "contents" / "images"
            if not images.is_dir():
                continue
            sized = [(int(m.group(1)) * int(m.group(2)), p) for p in images.iterdir() if (m := _SIZE.match(p.name))]
            if sized:
                found.append((folder.name, max(sized)[1]))
    return tuple(found)


def wallpaper_files() -> dict[str, Path]:
    """Wallpaper name -> its largest image file; a DataError with the install hint when there are none."""
    root = wallpaper_root()
    found = dict(_scan(root))
    if not found:
        raise DataError(f"no wallpapers under {root}: {INSTALL_HINT}")
    return found


def is_photograph(name: str) -> bool:
    return name in PHOTOGRAPHS
