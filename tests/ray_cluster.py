"""Ray runtimes for tests, and finding their processes again: every process of a runtime
started with MARK=<a fresh directory> in its environment has it (Ray's servers, and the
workers, which inherit the raylet's), so a test stops exactly what it started."""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

MARK = "NPLLAMA_TEST_RAY"


def marked_processes(mark: str) -> list[int]:
    """Processes whose environment holds MARK=mark (this one excepted)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and int(pid) != os.getpid():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def wait_gone(mark: str, seconds: float = 30) -> list[int]:
    deadline = time.time() + seconds
    while marked_processes(mark) and time.time() < deadline:
        time.sleep(0.2)
    return marked_processes(mark)


def free_port() -> int:
    """A free loopback port outside 10002-19999 (Ray's default range for its worker ports)."""
    for _ in range(100):
        port = 20000 + secrets.randbelow(30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def ray_cli() -> list[str]:
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    return [here if os.path.exists(here) else shutil.which("ray")]


def reread_ray_auth() -> None:
    """Ray reads RAY_AUTH_MODE and the token once per process (when it is first imported):
    a driver in this process reads them again after os.environ changed (Ray >= 2.5x)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def two_node_cluster():
    """A real two-node Ray cluster on this machine: `ray start --head` and `ray start
    --address` on loopback, one CPU each, token authentication with a fresh random token.
    Yields (address, env): env is what a driver process needs (the token); this process's
    own os.environ gets the token too while the cluster runs. Stops only its own processes."""
    mark = tempfile.mkdtemp(prefix="npr")          # short: Ray's sockets live under it
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    env = dict(os.environ, **auth, **{MARK: mark})
    address = f"127.0.0.1:{free_port()}"
    saved = {k: os.environ.get(k) for k in auth}
    try:
        common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        subprocess.run(ray_cli() + ["start", "--head", f"--port={address.split(':')[1]}", "--include-dashboard=false",
                                    f"--temp-dir={mark}"] + common, env=env, check=True, capture_output=True,
                       timeout=180)
        subprocess.run(ray_cli() + ["start", f"--address={address}"] + common, env=env, check=True,
                       capture_output=True, timeout=180)
        os.environ.update(auth)
        reread_ray_auth()
        yield address, {k: v for k, v in env.items() if k != MARK}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        reread_ray_auth()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in marked_processes(mark):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if not wait_gone(mark, 10):
                break
        left = marked_processes(mark)
        shutil.rmtree(mark, ignore_errors=True)
        assert not left, f"the cluster's processes {left} outlived it"
