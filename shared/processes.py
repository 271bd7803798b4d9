"""Flower's processes as fedrec starts them (deployment and its tests): which executable, which
environment, when it is ready, how it stops. Used by the server and the device commands alike."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedrec.shared.errors import RunFailed


def tool(name: str) -> str:
    """A Flower executable from this environment (not whatever PATH finds first)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def flower_env(state: Path | None = None) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}   # else Flower re-installs torch for every run
    if state is not None:
        env["FLWR_HOME"] = str(Path(state).resolve() / "flwr")
    return env


def wait_listening(port: int, proc: subprocess.Popen, timeout: float, log: Path, host: str = "127.0.0.1") -> None:
    """Until something accepts on host:port; RunFailed if the process exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"the SuperLink exited with code {proc.returncode}; see {log}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RunFailed(f"the SuperLink did not accept connections on port {port} within {timeout:.0f} s; see {log}")


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process started with start_new_session=True and everything in its group (Flower's
    SuperExec and app children too, even when the leader is already gone)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:   # children that outlive the leader
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


