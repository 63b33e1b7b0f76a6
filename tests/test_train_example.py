"""examples/train_tiny_gpt.py: both implementations train, and agree, from the same seed."""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_tiny_gpt.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_gpt", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_text_is_there():
    text = (ROOT / "examples" / "data" / "kjv_genesis_exodus.txt").read_text(encoding="utf-8")
    assert 300_000 < len(text) < 1_000_000 and text.startswith("Ge1:1 In the beginning God created")
    assert (ROOT / "examples" / "data" / "README.md").exists()  # provenance and licence


def test_first_steps_agree_between_eager_and_tfkernels():
    example = _load_example()
    cfg = example.PRESETS["test"]
    data = example.CharData()
    eager = example.train("eager", cfg, seed=3, progress=False, data=data)
    fused = example.train("tfkernels", cfg, seed=3, progress=False, data=data)
    assert len(eager["losses"]) == len(fused["losses"]) == cfg.steps
    assert all(math.isfinite(x) for x in fused["losses"])
    assert abs(eager["losses"][0] - math.log(data.vocab_size)) < 0.5  # starts near uniform
    for step, (a, b) in enumerate(zip(eager["losses"], fused["losses"])):
        assert abs(a - b) < 2e-4 * max(1.0, abs(a)), f"step {step}: eager {a} vs tfkernels {b}"
    assert fused["losses"][-1] < fused["losses"][0]  # it learns
    # Same parameter names in both: the tfkernels modules keep torch's state_dict keys.
    names = {example._eager_to_tfkernels_key(k) for k in eager["model"].state_dict()}
    assert names == set(fused["model"].state_dict())


@pytest.mark.slow
def test_command_line_runs_both_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "test", "--steps", "3", "--no-progress",
                          "--plot", str(png)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    for expected in ["eager: final loss", "tfkernels: final loss", "tokens/s", "peak RSS", "max |loss(eager)"]:
        assert expected in out.stdout, out.stdout
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
