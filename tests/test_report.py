"""The HTML report, loaded in a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from descriptors import pixel_descriptors, planted_photos

from pipelines import dedup, report
from pipelines.jobs import module_main
from rdcd.config import load_config

pytestmark = pytest.mark.timeout(300)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def load_in_browser(page: Path, profile: Path) -> str:
    """The DOM after Chromium loaded the page and ran its scripts."""
    result = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
            "--dump-dom", page.resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return result.stdout


def body_counts(dom: str) -> tuple[int, int]:
    body = re.search(r"<body[^>]*>", dom).group(0)
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    return total, loaded


def test_report_shows_groups_with_keepers_and_every_thumbnail_loads(tmp_path, ray_session):
    paths, groups = planted_photos(tmp_path / "images")
    pixel_descriptors(tmp_path / "desc", paths)
    out = tmp_path / "out"
    config = load_config(None, ["match.threshold=0.9", "report.borderline_pairs=6"])
    summary = dedup.run_dedup(str(tmp_path / "desc"), str(out), config)
    page = Path(summary["report"])
    dom = load_in_browser(page, tmp_path / "profile")
    total, loaded = body_counts(dom)
    members = sum(len(g) for g in groups.values())
    assert total == loaded == members + 2 * 6
    assert dom.count('class="badge">KEEP') == len(groups)
    for original in groups:
        assert re.search(rf'class="tile keeper" title="{re.escape(original)}"', dom)
    assert "Borderline pairs near the threshold 0.900" in dom
    assert f"{loaded} of {total} thumbnails loaded" in dom

    # An image that disappeared gets a placeholder, never a broken <img>.
    (tmp_path / "images" / "coffee_text.jpg").unlink()
    code = module_main(
        report, [str(out), "--set", "report.thumb_px=96", "--set", "report.borderline_pairs=6"]
    )
    assert code == 0
    dom = load_in_browser(page, tmp_path / "profile")
    total, loaded = body_counts(dom)
    missing = dom.count('class="missing"')
    assert missing == dom.count('title="coffee_text.jpg"') >= 1
    assert total == loaded == members + 2 * 6 - missing
    assert "--px:96px" in dom
