"""Default launcher: a local child process in its own process group.

The process is started with vfork+exec (never a bare fork of the kernel), in a
new session, so a signal to its group reaches everything it started. Its
stdout and stderr go where the kernel says (its per-instance log files).

No ``preexec_fn``, ever: it makes :class:`subprocess.Popen` fork() instead of
vfork(), and the fork handlers of grpcio then crash the child (SIGSEGV,
SIGABRT) when other threads are inside gRPC, as the kernel's always are.
What a ``preexec_fn`` would do in the child is done by exec wrappers that
set it up on themselves and then exec the command, so the command keeps the
pid Popen returned: ``setpriv --pdeathsig KILL`` for ``die_with_kernel``
(PR_SET_PDEATHSIG survives execve), ``/bin/sh`` writing its own pid into the
instance's cgroup for ``cgroup`` (:func:`hsu.process.cgroup_argv`) and
``prlimit`` for ``rlimits`` (:func:`hsu.process.rlimits_argv`); the soft
limit of open files the kernel gives back is set by that shell when there is
one (``ulimit -S -n``), else by ``prlimit``. Without any, the command runs as
is.

Exit detection does not poll (see :class:`hsu.process.PidfdHandle`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping

import hsu
from hsu.errors import LaunchError
from hsu.ports import Launcher, LaunchSpec, Register
from hsu.process import PidfdHandle, cgroup_argv, rlimits_argv

#: (name, PATH) -> where ``shutil.which`` found it: looked up once, not at
#: each of a thousand spawns (checked again before use, see :func:`_tool`)
_tools: dict[tuple[str, str], str] = {}


def _tool(where: str, name: str, purpose: str) -> str:
    """The path of util-linux's ``name``, searched on the kernel's PATH."""
    key = (name, os.environ.get("PATH", ""))
    path = _tools.get(key)
    if path is not None and os.access(path, os.X_OK):
        return path
    path = shutil.which(name)
    if path is None:
        raise LaunchError(
            f"{where}: cannot set {purpose}: {name!r} (package util-linux) "
            "not found on the kernel's PATH"
        )
    _tools[key] = path
    return path


#: (name, cwd, the child's PATH) -> the executable :func:`_resolve` found, so a
#: thousand spawns of one command do not each search the PATH
_resolved: dict[tuple[str, str, str], str] = {}


def _resolve(where: str, spec: LaunchSpec, env: Mapping[str, str]) -> str:
    """The absolute path exec would run for ``spec.argv[0]``, or the LaunchError
    Popen would end in: a name with a '/' is relative to the unit's cwd, any
    other is searched on the PATH of the child's environment, as execvp does.
    What it found last for the same name, cwd and PATH is taken again while it
    is still an executable file (a name found earlier on the PATH than it
    would not be seen: as a shell's command hash, until it is gone)."""
    name = spec.argv[0]
    cwd = spec.cwd or ""
    key = (name, cwd, env.get("PATH", "") if "/" not in name else "")
    known = _resolved.get(key)
    if known is not None and os.path.isfile(known) and os.access(known, os.X_OK):
        return known
    if "/" in name:
        candidates = [os.path.join(cwd, name)]
    else:
        candidates = [os.path.join(cwd, d, name) for d in os.get_exec_path(env)]
    denied = False
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            found = _resolved[key] = os.path.abspath(path)
            return found
        denied = denied or os.path.exists(path)
    if denied:
        raise LaunchError(f"{where}: {name!r} is not executable")
    raise LaunchError(f"{where}: executable {name!r} not found (command: {' '.join(spec.argv)})")


def _argv(where: str, spec: LaunchSpec, env: Mapping[str, str]) -> list[str]:
    """The command, behind the wrappers its spec needs (none: as it is).

    At most three execs before the command: ``setpriv`` (die_with_kernel),
    ``/bin/sh`` (cgroup) and ``prlimit`` (rlimits). The soft limit of open
    files the kernel hands back (``nofile_soft``) is set by the cgroup's shell
    when there is one and nothing else needs ``prlimit``: one exec less per
    instance."""
    try:
        limits = rlimits_argv(spec.rlimits)
    except ValueError as exc:
        raise LaunchError(f"{where}: {exc}") from None
    # the kernel raised its own soft limit: the command gets the original
    nofile_soft = spec.nofile_soft if "nofile" not in spec.rlimits else None
    if nofile_soft is not None and (limits or not spec.cgroup):
        limits.append(f"--nofile={nofile_soft}:")
        nofile_soft = None
    if not limits and not spec.die_with_kernel and not spec.cgroup:
        return list(spec.argv)
    wrappers: list[str] = []
    if spec.die_with_kernel:
        # first, so the signal is armed before anything else runs
        wrappers += [_tool(where, "setpriv", "die_with_kernel"), "--pdeathsig", "KILL", "--"]
    if spec.cgroup:
        # before the command: what it starts is in the cgroup from the start
        wrappers += cgroup_argv(spec.cgroup, nofile_soft)
    if limits:
        wrappers += [_tool(where, "prlimit", "rlimits"), *limits, "--"]
    return [*wrappers, _resolve(where, spec, env), *spec.argv[1:]]


class SubprocessLauncher:
    async def launch(self, spec: LaunchSpec) -> PidfdHandle:
        where = f"unit {spec.unit!r}"
        # one stat() before a vfork+exec; not worth a thread
        if spec.cwd is not None and not os.path.isdir(spec.cwd):  # noqa: ASYNC240
            raise LaunchError(f"{where}: working directory {spec.cwd!r} does not exist")
        env = dict(spec.env)
        # a few stat() calls at most, as exec itself would make
        argv = _argv(where, spec, env)
        try:
            # vfork+exec takes a millisecond or two: not worth a thread
            proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.DEVNULL,
                stdout=spec.stdout if spec.stdout is not None else subprocess.DEVNULL,
                stderr=spec.stderr if spec.stderr is not None else subprocess.DEVNULL,
                env=env,
                cwd=spec.cwd,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError:
            raise LaunchError(
                f"{where}: executable {spec.argv[0]!r} not found (command: {' '.join(spec.argv)})"
            ) from None
        except PermissionError:
            raise LaunchError(f"{where}: {spec.argv[0]!r} is not executable") from None
        except (OSError, subprocess.SubprocessError) as exc:
            # the cause stays: the kernel tells an EMFILE from the rest
            raise LaunchError(f"{where}: cannot start {spec.argv[0]!r}: {exc}") from exc
        return PidfdHandle(proc.pid, child=True, owned=True, popen=proc)

    def attach(self, pid: int) -> PidfdHandle:
        return PidfdHandle.attach(pid, owned=True)


@hsu.hookimpl
def hsu_register_launchers(register: Register[Launcher]) -> None:
    register("subprocess", SubprocessLauncher(), default=True)
