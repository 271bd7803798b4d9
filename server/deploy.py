"""The aggregation server as an operator runs it (`fedrec server`): Flower's SuperLink with TLS,
SuperNode authentication and a persistent database, and our ServerApp submitted to it with
`flwr run`. Plain functions that build Flower's command lines and files; Flower does the work.

The server's state folder (`--state DIR`) holds everything that must outlive a restart:
  superlink.db      the SuperLink's database (registered SuperNodes, runs); a restarted
                    SuperLink keeps its registered devices
  superlink.log     the SuperLink's log
  flwr/config.toml  the `flwr` CLI's connection to it (FLWR_HOME): address and CA certificate
  store/            what the ServerApp reads: the public catalog and the enrolment CA's public key
  server.json       where it listens, written by `start`, read by `register` and `run`
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from fedrec.server.pki import check_certificate
from fedrec.shared.errors import RunFailed, UserFileError
from fedrec.shared.processes import flower_env, stop_group, tool, wait_listening

CONNECTION = "fedrec"
PROJECT = Path(__file__).resolve().parents[1]   # the Flower app: pyproject.toml's [tool.flwr.app]


def local_address(host: str) -> str:
    """Where the `flwr` CLI on the server itself dials the SuperLink: loopback when it listens on
    every address (or loopback), else the one address it listens on."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "127.0.0.1", "localhost") else host


def prepare_state(state: Path, ca: Path, catalog: Path, host: str, port: int) -> dict:
    """Check the TLS files, copy what the ServerApp reads into state/store, and point the `flwr`
    CLI at the SuperLink (the certificate must name the address it dials)."""
    state, ca = Path(state).resolve(), Path(ca).resolve()
    for needed in (Path(catalog), ca / "enrolment-ca.pub"):
        if not needed.is_file():
            raise UserFileError(f"{needed}: no such file (the catalog comes from `fedrec store`, the enrolment "
                                "CA's public key from `fedrec certs ca`)")
    dial = local_address(host)
    check_certificate(ca / "server.crt", ca / "ca.crt", host=dial, key_path=ca / "server.key")
    _check_port_free(host, port)
    store = state / "store"
    store.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(catalog, store / "catalog.npz")
    shutil.copyfile(ca / "enrolment-ca.pub", store / "enrolment-ca.pub")
    (state / "flwr").mkdir(exist_ok=True)
    (state / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = {_toml_string(f"{dial}:{port}")}\nroot-certificates = {_toml_string(str(ca / "ca.crt"))}\n')
    info = {"host": host, "port": port, "dial": dial, "ca": str(ca), "store": str(store)}
    (state / "server.json").write_text(json.dumps(info, indent=1))
    return info


def _toml_string(value: str) -> str:
    """A TOML basic string: JSON's escaping, without turning non-ASCII into surrogate escapes TOML refuses."""
    return json.dumps(value, ensure_ascii=False)


def superlink_argv(state: Path, ca: Path, host: str, port: int) -> list[str]:
    state, ca = Path(state).resolve(), Path(ca).resolve()
    return [tool("flower-superlink"), "--ssl-ca-certfile", str(ca / "ca.crt"), "--ssl-certfile", str(ca / "server.crt"),
            "--ssl-keyfile", str(ca / "server.key"), "--enable-supernode-auth", "--database", str(state / "superlink.db"),
            "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]


def start_superlink(state: Path, ca: Path, catalog: Path, host: str = "127.0.0.1", port: int = 8000,
                    timeout: float = 120.0) -> subprocess.Popen:
    """The SuperLink in its own process group (stop it with stop_group), once it accepts
    connections; its output goes to state/superlink.log."""
    info = prepare_state(state, ca, catalog, host, port)
    log = open(Path(state) / "superlink.log", "ab")
    env = {**flower_env(state), "PYTHONUNBUFFERED": "1"}   # its log is read as it runs
    proc = subprocess.Popen(superlink_argv(state, ca, host, port), stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
        wait_listening(port, proc, timeout, Path(state) / "superlink.log", host=info["dial"])
    except BaseException:   # Ctrl-C or a failed start: never leave it running in its own session
        stop_group(proc)
        raise
    return proc


def _check_port_free(host: str, port: int) -> None:
    """Something already listening there would pass the readiness check while ours dies."""
    import socket
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise RunFailed(f"cannot listen on {host}:{port}: {err.strerror} (another SuperLink running?)") from None


def server_info(state: Path) -> dict:
    info = Path(state) / "server.json"
    if not info.is_file():
        raise RunFailed(f"{info}: missing; start the SuperLink first with `fedrec server start --state {state} ...`")
    return json.loads(info.read_text())


def _flwr(state: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("flwr"), *args], capture_output=True, text=True, env=flower_env(state),
                          timeout=timeout, cwd=PROJECT)


def register(state: Path, public_key: Path) -> int:
    """Register a device's SuperNode authentication key (CA/devices/NAME.pub, kept by `fedrec certs
    enrol`); returns its node id. Only registered keys may connect while --enable-supernode-auth is on."""
    server_info(state)
    if not Path(public_key).is_file():
        raise UserFileError(f"{public_key}: no such file (a device's NAME.pub, kept by `fedrec certs enrol`)")
    try:
        out = _flwr(state, "supernode", "register", str(Path(public_key).resolve()), CONNECTION, "--format", "json",
                    timeout=120)
    except subprocess.TimeoutExpired:
        raise RunFailed("the SuperLink did not answer in 120 s (is `fedrec server start` running?)") from None
    try:
        reply = json.loads(out.stdout[out.stdout.index("{"):])
        return int(reply["node-id"])
    except (ValueError, KeyError):
        raise RunFailed(f"registering {public_key} failed: {(out.stdout + out.stderr).strip()[-500:]}") from None


def run_config_file(state: Path, values: dict) -> Path:
    """The ServerApp's settings as a TOML file for `flwr run --run-config` (no shell quoting)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            lines.append(f"{key} = {_toml_string(str(value))}")
    path = Path(state).resolve() / "run-config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def flower_app() -> Path:
    """The Flower app `flwr run` builds and submits: this source checkout (pyproject.toml's [tool.flwr.app])."""
    if not (PROJECT / "pyproject.toml").is_file():
        raise UserFileError(f"`fedrec server run` submits the Flower app of a source checkout (its pyproject.toml names the "
                        f"ServerApp and the ClientApp); {PROJECT} is an installed package without one: run it from a clone")
    return PROJECT


def submit_argv(state: Path, values: dict) -> list[str]:
    return [tool("flwr"), "run", str(flower_app()), CONNECTION, "--run-config", str(run_config_file(state, values)),
            "--stream"]
