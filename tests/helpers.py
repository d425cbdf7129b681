"""Running the stock fairseq command-line tools from tests."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_moe_infer")
ASSETS = os.path.join(REPO, "assets")
TINY_LM = os.path.join(ASSETS, "tiny", "lm")
TINY_MT = os.path.join(ASSETS, "tiny", "mt")


def tool(name: str) -> list:
    """The console script ``fairseq-<name>`` of this interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), f"fairseq-{name}")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", f"fairseq_cli.{name.replace('-', '_')}"]


def run(name: str, args, cwd=None, stdin: str = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a fairseq tool with the weights-only safety of torch left on (no override variable)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    return subprocess.run(tool(name) + [str(a) for a in args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def ok(proc: subprocess.CompletedProcess) -> str:
    """stdout + stderr of a successful run (fails the test with the tail otherwise)."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    return text
