"""Run a command the way systemd would run one of a unit's Exec lines, without systemd as PID 1.

systemctl cannot start units on CI machines (systemd is not PID 1), so this module reproduces the
parts of a service's execution environment that decide whether the dssefs daemon can work at all:

* ``UMask=``, ``LimitNOFILE=``, ``LimitCORE=`` (umask and rlimits);
* ``CapabilityBoundingSet=`` (prctl PR_CAPBSET_DROP of every other capability; root's effective
  set after execve is then exactly the bounding set);
* ``NoNewPrivileges=`` (PR_SET_NO_NEW_PRIVS);
* ``MemoryDenyWriteExecute=`` (PR_SET_MDWE, the same kernel rule systemd's seccomp filter
  approximates; it survives execve);
* ``SystemCallFilter=`` with ``SystemCallErrorNumber=`` (a libseccomp allow-list built from
  ``systemd-analyze syscall-filter``'s expansion of the named groups, plus the calls systemd always
  permits) and ``RestrictAddressFamilies=`` (socket(2) allowed only for the listed families).

What it does not reproduce: cgroups (``DeviceAllow=``), the remaining seccomp-based options
(RestrictNamespaces, RestrictRealtime, RestrictSUIDSGID, LockPersonality, ProtectClock,
SystemCallArchitectures) and systemd's own bookkeeping (PID checks of NotifyAccess).

Usage: ``python unit_sandbox.py UNIT_JSON -- COMMAND...`` where UNIT_JSON holds the [Service]
settings (see :func:`service_settings`); tests call :func:`sandboxed`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import resource
import socket
import subprocess
import sys

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
CAP_LAST = 40
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
# systemd.exec(5), SystemCallFilter=: permitted whatever the list says
ALWAYS_ALLOWED = ("execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn")
CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
        "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10,
        "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14, "CAP_SYS_MODULE": 16,
        "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_NICE": 23,
        "CAP_SYS_RESOURCE": 24, "CAP_MKNOD": 27}


def service_settings(unit_text: str) -> dict[str, list[str]]:
    """The [Service] section as ``key -> [values]`` (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def expand_syscalls(groups: list[str]) -> set[str]:
    """Syscall names of ``@group`` and plain names, expanded with systemd-analyze (recursively)."""
    names: set[str] = set()
    seen: set[str] = set()
    todo = list(groups)
    while todo:
        item = todo.pop()
        if not item.startswith("@"):
            names.add(item)
            continue
        if item in seen:
            continue
        seen.add(item)
        text = subprocess.run(["systemd-analyze", "syscall-filter", item], capture_output=True, text=True,
                              check=True).stdout
        for line in text.splitlines()[1:]:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                todo.append(entry)
    return names


def _seccomp(allowed: set[str], families: list[int] | None, errno_name: str) -> None:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.c_void_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]

    class ArgCmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                    ("datum_b", ctypes.c_uint64)]

    code = getattr(errno, errno_name, errno.EPERM)
    ctx = lib.seccomp_init(0x00050000 | code)  # SCMP_ACT_ERRNO(code)
    assert ctx, "seccomp_init failed"
    for name in sorted(allowed | set(ALWAYS_ALLOWED)):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0 or (families is not None and name == "socket"):
            continue  # unknown on this architecture, or restricted by family below
        rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None)
        assert rc == 0, f"seccomp_rule_add({name}) = {rc}"
    if families is not None:
        nr = lib.seccomp_syscall_resolve_name(b"socket")
        for fam in families:
            cmp = ArgCmp(0, SCMP_CMP_EQ, fam, 0)
            rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 1, ctypes.byref(cmp))
            assert rc == 0, f"seccomp socket rule = {rc}"
    rc = lib.seccomp_load(ctx)
    assert rc == 0, f"seccomp_load = {rc}"


def _limit(value: str) -> int:
    return resource.RLIM_INFINITY if value == "infinity" else int(value)


def enter(settings: dict[str, list[str]]) -> None:
    """Apply the settings to this process (then the caller execs the command)."""
    libc = ctypes.CDLL(None, use_errno=True)
    get = lambda key: settings.get(key, [None])[-1]  # noqa: E731 - the last assignment wins
    if get("UMask"):
        os.umask(int(get("UMask"), 8))
    for key, which in (("LimitNOFILE", resource.RLIMIT_NOFILE), ("LimitCORE", resource.RLIMIT_CORE)):
        if get(key):
            n = _limit(get(key))
            try:
                resource.setrlimit(which, (n, n))
            except ValueError:  # a container's hard limit is below it (systemd could raise it)
                hard = resource.getrlimit(which)[1]
                resource.setrlimit(which, (hard, hard))
    if get("CapabilityBoundingSet"):
        keep = {CAPS[c] for c in get("CapabilityBoundingSet").split()}
        for cap in range(CAP_LAST + 1):
            if cap not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                if ctypes.get_errno() != errno.EINVAL:  # EINVAL: the kernel does not know it
                    raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {cap}")
    if get("NoNewPrivileges") == "yes":
        assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    if get("MemoryDenyWriteExecute") == "yes":
        assert libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0, ctypes.get_errno()
    groups = " ".join(settings.get("SystemCallFilter", [])).split()
    if groups:
        families = None
        if get("RestrictAddressFamilies"):
            families = [getattr(socket, f) for f in get("RestrictAddressFamilies").split()]
        _seccomp(expand_syscalls(groups), families, get("SystemCallErrorNumber") or "EPERM")


def sandboxed(settings: dict[str, list[str]], argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` under ``settings``."""
    return [sys.executable, os.path.abspath(__file__), json.dumps(settings), "--", *argv]


def exec_line(value: str) -> list[str]:
    """An Exec*= value without its prefix characters (``-``, ``@``, ``+``, ...), split."""
    return re.sub(r"^[-@:+!]+", "", value).split()


if __name__ == "__main__":
    sep = sys.argv.index("--")
    settings = json.loads(sys.argv[1])
    command = sys.argv[sep + 1:]
    enter(settings)
    os.execv(command[0], command)
