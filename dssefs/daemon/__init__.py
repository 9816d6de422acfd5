"""The mount lifecycle: ``dssefs mount`` and ``dssefs umount``.

``mount`` validates its input, clears a dead mount left by a crash, forks a daemon (unless
``--foreground``) and exits 0 only once the file system answers; the daemon reports readiness
through a pipe and, when ``$NOTIFY_SOCKET`` is set, with ``READY=1`` (systemd ``Type=notify``).
SIGTERM/SIGINT: store every dirty file, unmount, exit 0.  ``umount`` sends SIGTERM to the daemon
recorded in the pid file and waits until it is gone.  ``status`` asks the daemon over its
control socket what it is doing.

The package, by job: :mod:`.request` (arguments, options, configuration file), :mod:`.serve` (the
daemon's life: build, mount, serve, flush, unmount), :mod:`.notify` (systemd's notify protocol),
:mod:`.control` (the status socket), :mod:`.mounts` and :mod:`.paths` (mount table and runtime
files), :mod:`.logs`, :mod:`.commands` (the command-line entry points).
"""

from .commands import main, mount_command, status_command, umount_command

__all__ = ["main", "mount_command", "status_command", "umount_command"]
