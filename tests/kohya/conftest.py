"""tests/kohya: kohya-ss sd-scripts' real trainers and tools, in kohya's own pinned venv, with this
project installed the way the README tells kohya users (sd_scripts_lorax.testing.kohya).

The venv and the full-size checkpoints are built once per machine under ~/.cache/sd-scripts-lorax/
($SD_SCRIPTS_LORAX_CACHE); sd-scripts comes from ../shared/kohya-sd-scripts ($KOHYA_SD_SCRIPTS) and
is copied to a temp folder. `make test` runs with `--dist loadscope`: a module's tests stay on one
xdist worker, in file order (test_kohya_train's stages build on each other); workspaces of different
workers share the cached venv under a lock (installs never overlap runs).
"""

import pytest

from sd_scripts_lorax.testing.kohya.workspace import Workspace


@pytest.fixture(scope="session")
def kohya_ws(tmp_path_factory) -> Workspace:
    """kohya's venv (cached), a temp copy of sd-scripts, this project pip-installed into the venv."""
    ws = Workspace(tmp_path_factory.mktemp("kohya"))
    ws.make_venv()
    ws.copy_kohya()
    ws.dry_run = ws.dry_run_install()  # before the install, so it sees what a kohya user's first install does
    ws.install_project()
    return ws
