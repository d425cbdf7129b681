"""The registry of wrapped fairseq functions: each is installed once, and each names a test that exercises it."""

import ast
import os

import fairseq_moe_infer  # noqa: F401 (installs the wraps)
from fairseq_moe_infer.fairseq_patches import PATCHES, _resolve, install_all

from .helpers import REPO


def test_every_listed_wrap_is_installed_once():
    import sys

    listed = [p for p in PATCHES if not p.cli_only or p.target.split(":")[0] in sys.modules]
    before = {p.target: getattr(*_resolve(p.target)) for p in listed}
    install_all()  # idempotent: nothing wrapped twice
    for p in listed:
        fn = getattr(*_resolve(p.target))
        assert getattr(fn, "_moe_wrapped", False), p.target
        assert fn is before[p.target], p.target
        assert p.why and p.wrapper.__doc__ and p.target.split(":")[1].split(".")[-1] in p.wrapper.__doc__


def test_every_wrap_names_a_test_that_exists():
    for p in PATCHES:
        path, name = p.test.split("::")
        tree = ast.parse(open(os.path.join(REPO, path)).read())
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, p.test
