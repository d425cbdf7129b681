"""One ``--user-dir`` registers everything, from the source checkout and from a regular install."""

import os
import subprocess
import sys

from .helpers import REPO, USER_DIR

PROBE = """
import argparse, os, sys
if len(sys.argv) > 2:  # hide an editable install of the checkout (its finder or path entry)
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != sys.argv[2]]
from fairseq import utils
utils.import_user_module(argparse.Namespace(user_dir=sys.argv[1]))
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.tasks import TASK_REGISTRY
import fairseq_moe_infer, fairseq_moe_infer.tasks, fairseq_moe_infer.criterions
print(sorted(k for k in TASK_REGISTRY if k.startswith("moe_")), sorted(k for k in CRITERION_REGISTRY if k.startswith("moe_")),
      sorted(k for k in ARCH_MODEL_REGISTRY if "moe" in k))
print(fairseq_moe_infer.__file__, fairseq_moe_infer.tasks.__file__, fairseq_moe_infer.criterions.__file__)
"""
EXPECTED = ("['moe_language_modeling', 'moe_translation'] ['moe_cross_entropy', 'moe_label_smoothed_cross_entropy'] "
            "['transformer_lm_moe', 'transformer_lm_moe_small', 'transformer_moe', 'transformer_moe_small']")


def _probe(user_dir, cwd, hide_checkout=False):
    cmd = [sys.executable, "-c", PROBE, user_dir] + ([REPO] if hide_checkout else [])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-2:]


def test_user_dir_from_source_checkout(tmp_path):
    registries, files = _probe(USER_DIR, tmp_path)
    assert registries == EXPECTED
    module, tasks, criterions = files.split()
    assert tasks == os.path.join(REPO, "tasks", "__init__.py")
    assert criterions == os.path.join(REPO, "criterions", "__init__.py")


def test_user_dir_from_regular_install(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(target),
                    REPO], check=True, capture_output=True, timeout=600)
    installed = target / "fairseq_moe_infer"
    assert (installed / "tasks" / "moe_translation.py").exists()
    registries, files = _probe(str(installed), tmp_path, hide_checkout=True)
    assert registries == EXPECTED
    assert all(f.startswith(str(installed)) for f in files.split())


def test_python_m_prints_user_dir(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fairseq_moe_infer"], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().splitlines()[-1] == USER_DIR
