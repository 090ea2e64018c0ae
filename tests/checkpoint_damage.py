"""Damage a checkpoint as a failing disk would (shared by the tests of every checkpoint read)."""

from pathlib import Path

import numpy as np


def overwrite_data(directory: Path) -> None:
    """Overwrite 4 KB every 16 KB of every file larger than 8 KB under ``directory``, sizes unchanged.

    Only a content check can notice this. OCDBT data files can hold regions no longer referenced (damage there
    changes nothing that is restored), so every data file is hit repeatedly to be sure to reach live data.
    """
    rng = np.random.default_rng(0)
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.stat().st_size > 8192:
            with open(p, "r+b") as f:
                for offset in range(4096, p.stat().st_size - 4096, 16384):
                    f.seek(offset)
                    f.write(rng.bytes(4096))
