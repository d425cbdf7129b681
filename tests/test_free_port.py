"""tests/helpers.run_on_free_port: the rendezvous port of fairseq's own launcher in the 2-GPU tests."""

import socket
import sys

from . import helpers

# binds the port of the --distributed-init-method it is given, as a rank's TCPStore does (exit 1 if taken)
BIND = ("import socket, sys; s = socket.socket(); "
        "s.bind(('localhost', int(sys.argv[sys.argv.index('--distributed-init-method') + 1].rsplit(':', 1)[1]))); "
        "s.listen(); print('bound', s.getsockname()[1])")


def test_run_on_free_port_retries_on_a_port_in_use(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("localhost", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        fresh = helpers.free_port()
        ports = iter([taken, fresh])
        monkeypatch.setattr(helpers, "free_port", lambda: next(ports))
        proc = helpers.run_on_free_port([sys.executable, "-c", BIND])
        assert proc.returncode == 0 and proc.stdout.split() == ["bound", str(fresh)], proc.stderr[-500:]
        # a failure other than "address in use" is not retried; the attempts are bounded
        calls = []
        monkeypatch.setattr(helpers, "free_port", lambda: calls.append(1) or taken)
        proc = helpers.run_on_free_port([sys.executable, "-c", BIND], attempts=2)
        assert proc.returncode != 0 and "Address already in use" in proc.stderr and len(calls) == 2
        calls.clear()
        proc = helpers.run_on_free_port([sys.executable, "-c", "raise SystemExit(3)"])
        assert proc.returncode == 3 and len(calls) == 1


def test_free_port_is_bindable():
    port = helpers.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
