"""A read-only install works: numba's cache then goes to NUMBA_CACHE_DIR (or the user cache), not the package."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import maskclip_apro.kernels as kernels

SCRIPT = """
import numpy as np, torch
import os
import maskclip_apro.kernels.gp_tree as gp_tree
assert gp_tree.__file__.startswith({root!r}), gp_tree.__file__
try:
    open(os.path.join({root!r}, "kernels", "probe"), "w")
    raise SystemExit("the package directory is writable: the test proves nothing")
except PermissionError:
    pass
guide = np.random.default_rng(0).random((1, 3, 5, 4))
expected = gp_tree.grid_weights(torch.from_numpy(guide)).numpy()
assert np.allclose(gp_tree.grid_weights_cpu(guide), expected, rtol=0, atol=1e-15)
print("ok")
"""


def _without_dac_override() -> None:
    """As root, permission bits bind only without CAP_DAC_OVERRIDE: drop it from the child's bounding set."""
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


def test_kernels_run_from_a_read_only_package(tmp_path):
    site = tmp_path / "site"
    package = site / "maskclip_apro"
    shutil.copytree(Path(kernels.__file__).parent, package / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (package / "__init__.py").write_text("")  # the real one imports the whole pipeline; not needed here
    cache = tmp_path / "numba_cache"
    for path in [package, *package.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    env = {**os.environ, "PYTHONPATH": str(site), "NUMBA_CACHE_DIR": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT.format(root=str(package))], env=env, capture_output=True, text=True,
            timeout=300, preexec_fn=_without_dac_override, cwd=tmp_path,
        )
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
        assert not any(package.rglob("*.nbi")), "numba wrote its cache into the package"
        assert any(cache.rglob("*.nbi")), "numba wrote no cache to NUMBA_CACHE_DIR"
    finally:
        for path in [package, *package.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
