"""The control plane's address: where it listens, and how a client finds it.

A kernel serves its API (``hsu.kernel.v1.Kernel`` and its own
``hsu.core.v1.Core``) on a unix socket in its state dir, mode 0600 in a
0700 directory, so only its own user (and root) can connect. Clients find
it in this order: what the command line says (``--control ADDRESS``,
``--kernel NAME``, ``--deployment FILE``: its state dir), ``$HSU_CONTROL``,
``$HSU_KERNEL_ADDRESS`` (what a kernel gives the HSUs it starts), and last
the per-user *runtime directory*,
where every running kernel leaves one small file naming its control
address: ``$HSU_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/hsu``, else
``/tmp/hsu-<uid>``, each created 0700 and refused when another user owns it
(as tmux does with its socket directory).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from hsu.errors import HsuError

#: the socket's name in the state dir
SOCKET_NAME = "control.sock"
#: sun_path holds 108 bytes, the terminating NUL included
MAX_UNIX_PATH = 107
#: a running kernel's entry in the runtime dir: ``<deployment>.control``
SUFFIX = ".control"


def secure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700, whatever the umask.

    Refuses a directory another user owns, or a symlink: the state dir holds
    the control socket, the state file and the logs.
    """
    missing = []
    parent = path
    while not os.path.lexists(parent) and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for component in reversed(missing):
        # each one made here is private, whatever the umask (``.hsu/`` too)
        with contextlib.suppress(FileExistsError):
            component.mkdir(mode=0o700)
        os.chmod(component, 0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise HsuError(f"{path}: not a directory (a symlink or a file is not trusted)")
    if st.st_uid != os.geteuid():
        raise HsuError(
            f"{path}: owned by uid {st.st_uid}, not by this user ({os.geteuid()}); refusing it"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def runtime_dir(env: dict[str, str] | None = None, *, create: bool = False) -> Path:
    """The per-user directory where running kernels name their control address."""
    env = dict(os.environ) if env is None else env
    if env.get("HSU_RUNTIME_DIR"):
        path = Path(env["HSU_RUNTIME_DIR"])
    elif env.get("XDG_RUNTIME_DIR"):
        path = Path(env["XDG_RUNTIME_DIR"], "hsu")
    else:
        path = Path(f"/tmp/hsu-{os.geteuid()}")
    return secure_dir(path) if create else path


def default_socket(state_dir: Path, deployment: str) -> str:
    """``unix:<state dir>/control.sock``, or one in the runtime dir when the
    state dir's path is too long for a socket."""
    path = state_dir.absolute() / SOCKET_NAME
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        return f"unix:{path}"
    import hashlib  # here: `hsu ping --control ADDRESS` does not need it

    digest = hashlib.sha256(os.fsencode(state_dir.absolute())).hexdigest()[:12]
    short = runtime_dir(create=True) / f"{deployment[:40]}-{digest}.sock"
    if len(os.fsencode(short)) > MAX_UNIX_PATH:
        raise HsuError(
            f"{path}: too long for a unix socket ({MAX_UNIX_PATH} bytes), and so is {short};"
            " set kernel.control to a shorter unix:PATH"
        )
    return f"unix:{short}"


def is_loopback(address: str) -> bool:
    """A unix socket, or a host that is a loopback address (or ``localhost``)."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    import ipaddress  # not for a client's lookup (`hsu status`, docs/benchmarks.md)
    import socket

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(f[4][0]).is_loopback for f in found)


def check_exposure(what: str, address: str, insecure: bool, authenticated: bool = False) -> bool:
    """Refuse ``address`` off loopback unless callers are authenticated (an
    authenticator is enabled, docs/auth.md) or the deployment says ``insecure``.

    Returns True when the address leaves the machine unauthenticated (and
    ``insecure`` allowed it).
    """
    if is_loopback(address) or authenticated:
        return False
    if not insecure:
        raise HsuError(
            f"kernel.{what}: {address} is reachable from other machines and nothing"
            " authenticates callers; use a loopback or unix: address, turn auth on"
            " (auth.authenticators, docs/auth.md), or set kernel.insecure: true"
        )
    return True


def unix_path(address: str) -> str | None:
    return address[5:] if address.startswith("unix:") else None


def prepare_socket(address: str, *, private_dir: bool = True) -> None:
    """Before binding: the socket's directory is private (unless not
    ``private_dir``: the caller checked it), and a stale socket goes.

    A live socket (a kernel answers there) is an error rather than stolen.
    """
    path = unix_path(address)
    if path is None:
        return
    if private_dir:
        secure_dir(Path(path).parent)
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise HsuError(f"{path}: exists and is not a socket; refusing to replace it")
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a kernel that died left it
    else:
        raise HsuError(f"{path}: another kernel listens there; is this deployment running?")
    finally:
        probe.close()


def lock_socket(address: str) -> None:
    """After binding: the socket is 0600 whatever the umask."""
    path = unix_path(address)
    if path is not None:
        os.chmod(path, 0o600)


def publish(deployment: str, address: str) -> Path | None:
    """Name this kernel's control address in the runtime dir; returns the entry."""
    try:
        entry = runtime_dir(create=True) / f"{deployment}{SUFFIX}"
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(address + "\n")
        os.replace(tmp, entry)
    except (OSError, HsuError):
        return None  # finding it is a convenience; --control always works
    return entry


def unpublish(entry: Path | None, address: str) -> None:
    """Remove the entry if it still names ``address`` (another kernel of the
    same name may have replaced it)."""
    if entry is None:
        return
    with contextlib.suppress(OSError):
        if entry.read_text().strip() == address:
            entry.unlink()


def _alive(address: str) -> bool:
    path = unix_path(address)
    if path is None:
        return True
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def running() -> dict[str, str]:
    """Deployment name -> control address of each kernel in the runtime dir."""
    try:
        directory = runtime_dir()
        st = os.lstat(directory)
    except OSError:
        return {}
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        return {}  # not ours, or not private: trust nothing in it
    found: dict[str, str] = {}
    for entry in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            address = entry.read_text().strip()
        except OSError:
            continue
        if address and _alive(address):
            found[entry.name[: -len(SUFFIX)]] = address
    return found


def discover(name: str | None = None) -> str:
    """The control address of the running kernel (named ``name``)."""
    kernels = running()
    if name is not None:
        if name in kernels:
            return kernels[name]
        known = ", ".join(sorted(kernels)) or "none"
        raise HsuError(f"no running kernel named {name!r} (running: {known})")
    if len(kernels) == 1:
        return next(iter(kernels.values()))
    if not kernels:
        raise HsuError(
            "no running kernel found: start one with `hsu run DEPLOYMENT`, or name its"
            " control address with --control (or $HSU_CONTROL)"
        )
    raise HsuError(
        f"{len(kernels)} kernels run ({', '.join(sorted(kernels))}): pick one with"
        " --kernel NAME or --control ADDRESS"
    )


def resolve(
    explicit: str | None = None,
    *,
    kernel: str | None = None,
    deployment: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """The control address a client should call (see the module's docstring)."""
    env = dict(os.environ) if env is None else env
    if explicit:
        return explicit
    if kernel:
        return discover(kernel)
    if deployment:  # a flag, so before the environment
        return control_of(deployment)
    for var in ("HSU_CONTROL", "HSU_KERNEL_ADDRESS"):
        if env.get(var):
            return env[var]
    return discover()


def control_of(path: str) -> str:
    """The control address a deployment file's kernel listens on."""
    from hsu._kernel.config.model import load_deployment

    dep = load_deployment(path)
    raw = dep.sections.get("kernel") or {}
    control = raw.get("control") if isinstance(raw, dict) else None
    if control:
        return str(control)
    state = raw.get("state_dir") if isinstance(raw, dict) else None
    state_dir = Path(dep.base_dir, state or f".hsu/{dep.name}")
    return default_socket(state_dir, dep.name)
