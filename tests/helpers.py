"""Running the stock fairseq command-line tools from tests."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_moe_infer")
ASSETS = os.path.join(REPO, "assets")
TINY_LM = os.path.join(ASSETS, "tiny", "lm")
TINY_MT = os.path.join(ASSETS, "tiny", "mt")
MT_CKPT = os.path.join(ASSETS, "checkpoints", "mt_moe", "checkpoint.pt")
LM_CKPT = os.path.join(ASSETS, "checkpoints", "lm_moe", "checkpoint.pt")
# fairseq-generate of the bundled MT model on the tiny test set (~48 sentences), dynamic gating, beam 5
MT_ARGS = [TINY_MT, "--user-dir", USER_DIR, "--task", "moe_translation", "--path", MT_CKPT, "--source-lang", "src",
           "--target-lang", "tgt", "--gen-subset", "test", "--beam", "5", "--max-tokens", "2048",
           "--post-process", "sentencepiece", "--moe-gating", "dynamic", "--cpu"]


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


def free_port() -> int:
    """A TCP port on localhost that the OS reports free now (bound to port 0, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_IN_USE = ("EADDRINUSE", "Address already in use")


def run_on_free_port(cmd, attempts: int = 3, **kwargs) -> subprocess.CompletedProcess:
    """Run a fairseq tool that spawns its own ranks (``--distributed-world-size N`` on one host) with
    ``--distributed-init-method tcp://localhost:PORT`` on a port the OS reports free.

    Without it fairseq's ``infer_init_method`` (``_infer_single_node_init``) draws the rendezvous port
    with ``random.randint(10000, 60000)``, which can be one another job on the host already listens on
    (seen on the H200: EADDRINUSE). A port can still be taken between the probe and the rank's bind,
    so a run that fails with "address in use" is retried on a new port (``attempts`` runs at most).
    ``kwargs`` go to :func:`subprocess.run` (default: ``capture_output=True, text=True``).
    """
    kwargs = {"capture_output": True, "text": True, **kwargs}
    for _ in range(attempts):
        proc = subprocess.run([str(c) for c in cmd] + ["--distributed-init-method", f"tcp://localhost:{free_port()}"],
                              **kwargs)
        if proc.returncode == 0 or not any(m in (proc.stdout or "") + (proc.stderr or "") for m in PORT_IN_USE):
            return proc
    return proc


def with_default_sigint() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: a process started from a shell's
    background job (``pytest &`` without ``timeout``) inherits SIGINT ignored (POSIX), so Python
    installs no ``KeyboardInterrupt`` handler in the child and the signal would do nothing."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
