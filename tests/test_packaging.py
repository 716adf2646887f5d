"""The installed project is usable from a kohya sd-scripts checkout: `networks.lora_x` is a namespace
portion that merges with kohya's own `networks/` folder (no __init__.py on either side)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_networks_has_no_init():
    assert not (REPO / "networks" / "__init__.py").exists()
    assert not (REPO / "library").exists(), "kohya installs a package named `library`: never ship one"


def test_lora_x_merges_with_a_kohya_networks_folder(tmp_path):
    kohya = tmp_path / "sd-scripts"
    (kohya / "networks").mkdir(parents=True)
    (kohya / "networks" / "lora.py").write_text("KOHYA = True\n")
    code = ("import sys; sys.path.insert(0, '.')\n"
            "import importlib\n"
            "kohya = importlib.import_module('networks.lora')\n"
            "ours = importlib.import_module('networks.lora_x')\n"
            "assert kohya.KOHYA and callable(ours.create_network) and callable(ours.create_network_from_weights)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=kohya, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
