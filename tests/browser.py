"""Opening a report page in a real browser (Debian's headless ``chromium``): the sections it shows, whether every
picture loaded, and a screenshot that is not blank. Tests that use it skip with the reason where chromium is
not installed (``make install-dev`` installs it where it can)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]


def rendered(page: Path, sections: set[str], tmp_path: Path) -> str:
    """The page as the browser built it (after its scripts ran); asserts that exactly ``sections`` are shown,
    every picture loaded and none is broken, and that a screenshot of the page is not blank."""
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium for the browser check of report.html (apt-get install chromium)")
    url = page.resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *FLAGS, "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True,
                         text=True, timeout=120).stdout
    shown = set(re.findall(r'<section id="([^"]+)"', dom))
    assert shown == sections, (page, sorted(shown))
    states = re.findall(r'<img [^>]*data-state="([a-z]+)"', dom)
    assert states and set(states) == {"loaded"}, (page, states)
    assert len(states) == dom.count("<img "), "a picture the page script did not reach"
    shot = tmp_path / f"{page.parent.name}-screenshot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--screenshot={shot}", "--window-size=1000,1400", url], capture_output=True,
                   timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 128).mean() > 0.01, "the screenshot is blank"
    return dom
