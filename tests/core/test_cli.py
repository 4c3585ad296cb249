"""The README's first command: the demo on a random full-size SD1.5-shaped model."""

from __future__ import annotations

import subprocess
import sys

import pytest
from comfy_env import ROOT, merges_file


@pytest.mark.slow
def test_demo_erases_and_reports_every_site(clip_tokenizer, tmp_path):
    out = tmp_path / "demo.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "erasure_core", "demo", "--targets", "Van Gogh", "--preserve", "",
         "--merges", merges_file(), "--save", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    rows = [line for line in run.stdout.splitlines() if line.startswith("diffusion_model.")]
    assert "32 K/V sites" in run.stdout and len(rows) == 32 and out.exists()
    shares = [float(line.split()[-2].rstrip("%")) for line in rows]
    assert max(shares) < 10.0  # the targets' K/V moved most of the way onto the anchor's
    assert run.stdout.splitlines()[-1].startswith("result: the erasure WORKED")
    assert "erase: 32/32" in run.stderr  # progress goes to stderr
