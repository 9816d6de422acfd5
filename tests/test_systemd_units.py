"""The systemd unit, the .mount/.automount/fstab examples and ``dssefs service``, checked offline
with systemd's own tools (no systemd as PID 1 needed; CI installs the ``systemd`` package).

* ``systemd-analyze verify`` must exit 0 **and print nothing**: a misspelled key or a bad value
  only warns and still exits 0 (``test_verify_catches_a_misspelled_key`` proves the check can fail).
* ``systemd-analyze security --offline=yes`` must stay at or below ``SECURITY_THRESHOLD``
  (docs/operations.md gives the score).
* No unit may use a setting that runs the daemon in its own mount namespace: the FUSE mount
  would exist only there, and the host would see an empty directory.
* The fstab lines are taken from systemd/examples/fstab and run through the real
  systemd-fstab-generator, so the documentation and the test cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fuse_fixtures import dssefs_executable

from dssefs import config, service

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "systemd" / "dssefs@.service"
EXAMPLES = ROOT / "systemd" / "examples"
EXAMPLE_UNITS = (EXAMPLES / "mnt-secure.mount", EXAMPLES / "mnt-secure.automount")

ANALYZE = shutil.which("systemd-analyze")
ESCAPE = shutil.which("systemd-escape")
SYSTEMCTL = shutil.which("systemctl")
FSTAB_GENERATOR = next((p for p in ("/usr/lib/systemd/system-generators/systemd-fstab-generator",
                                    "/lib/systemd/system-generators/systemd-fstab-generator")
                        if os.access(p, os.X_OK)), None)

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze (apt-get install systemd)")
needs_escape = pytest.mark.skipif(ESCAPE is None, reason="needs systemd-escape (apt-get install systemd)")
needs_generator = pytest.mark.skipif(FSTAB_GENERATOR is None, reason="needs systemd-fstab-generator")

#: ``systemd-analyze security`` exposure (0 safest .. 10) the template may not exceed.  systemd 252
#: scores it 4.0 ("OK"); the margin is for other systemd versions, which weigh settings differently.
#: The remaining exposure is what a FUSE mount needs (CAP_SYS_ADMIN, @mount, the network, /dev/fuse,
#: running as root) or what would need a mount namespace (see MOUNT_NAMESPACE_SETTINGS).
SECURITY_THRESHOLD = 4.5

#: Settings that make systemd start the process in a mount namespace of its own, from systemd's
#: src/core/execute.c exec_needs_mount_namespace() (v252, and the additions of later versions), or
#: that otherwise keep the mount from reaching the host.
MOUNT_NAMESPACE_SETTINGS = {
    "PrivateMounts": "a private mount namespace, by definition",
    "PrivateTmp": "private /tmp and /var/tmp are bind mounts",
    "PrivateDevices": "a private /dev is a tmpfs mount",
    "ProtectSystem": "read-only /usr, /boot, /etc are bind mounts",
    "ProtectHome": "inaccessible /home, /root, /run/user are bind mounts",
    "ReadWritePaths": "bind mounts", "ReadOnlyPaths": "bind mounts", "InaccessiblePaths": "bind mounts",
    "ExecPaths": "bind mounts", "NoExecPaths": "bind mounts",
    "BindPaths": "bind mounts", "BindReadOnlyPaths": "bind mounts",
    "TemporaryFileSystem": "tmpfs mounts",
    "MountImages": "image mounts", "ExtensionImages": "image mounts", "ExtensionDirectories": "overlay mounts",
    "RootDirectory": "a chroot with API file systems mounted", "RootImage": "an image mounted as /",
    "MountAPIVFS": "mounts /proc, /sys, /dev (with RootDirectory=)",
    "MountFlags": "slave or private propagation needs a namespace",
    "ProtectKernelTunables": "read-only /proc/sys, /sys are bind mounts",
    "ProtectKernelModules": "inaccessible /usr/lib/modules is a bind mount",
    "ProtectKernelLogs": "inaccessible /dev/kmsg, /proc/kmsg are bind mounts",
    "ProtectControlGroups": "read-only /sys/fs/cgroup is a bind mount",
    "ProtectProc": "a private /proc mount (hidepid=)", "ProcSubset": "a private /proc mount (subset=)",
    "PrivateIPC": "a private /dev/mqueue mount", "IPCNamespacePath": "a private /dev/mqueue mount",
    "LogNamespace": "the journal namespace's sockets are bind mounts",
    "DynamicUser": "a mount namespace with State/Cache/LogsDirectory=; and it drops root",
    # later systemd versions than 252
    "PrivateNetwork": "implies PrivateMounts= in later versions (and the daemon needs the network)",
    "NetworkNamespacePath": "implies PrivateMounts= in later versions",
    "PrivatePIDs": "a private /proc mount (later versions)",
    "PrivateBPF": "a private bpffs mount (later versions)",
    "BindLogSockets": "the journal sockets are bind mounts (later versions)",
    # no namespace, but the mount fails or stays invisible all the same
    "PrivateUsers": "no CAP_SYS_ADMIN in the host's user namespace, so mount(2) fails",
}

#: Hardening lines the template must keep; docs/operations.md explains each one.
HARDENING = (
    "NoNewPrivileges=yes", "CapabilityBoundingSet=CAP_SYS_ADMIN", "DevicePolicy=closed",
    "DeviceAllow=/dev/fuse rw", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "RestrictNamespaces=yes",
    "RestrictRealtime=yes", "RestrictSUIDSGID=yes", "LockPersonality=yes", "MemoryDenyWriteExecute=yes",
    "ProtectClock=yes", "ProtectHostname=yes", "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service @mount", "UMask=0077", "LimitNOFILE=65536", "LimitCORE=0",
)


def unit_settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment in a unit file (comments and continuations handled)."""
    out, section, pending = [], "", ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def namespace_settings(text: str) -> list[str]:
    """The keys of ``text`` that would give the daemon (or mount helper) its own mount namespace."""
    return [key for _, key, _ in unit_settings(text) if key in MOUNT_NAMESPACE_SETTINGS]


def analyze(*args: str) -> subprocess.CompletedProcess:
    # SYSTEMD_LOG_LEVEL=info is systemd's default; set so that a caller's debug level cannot add output.
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="info", SYSTEMD_COLORS="0")
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, env=env, timeout=60)


def verify(*paths: str | os.PathLike) -> subprocess.CompletedProcess:
    """``systemd-analyze verify`` as the tests use it.

    --man=no: a Documentation=man:... line (the generator writes one) would run man(1), and CI
    images often ship without manual pages; that would test the image, not the unit.
    --generators=no: the host's /etc/fstab and other generators must not add units to the check.
    A template is verified through an instance path (DIR/dssefs@mnt-secure.service) in the
    directory that holds DIR/dssefs@.service: verify adds DIR to the search path and instantiates
    the template, with %i/%f expanded as systemd would.
    """
    return analyze("verify", "--man=no", "--generators=no", *map(str, paths))


def instantiated_template(tmp_path: Path, text: str | None = None) -> Path:
    """The repository template with ExecStart= naming this environment's dssefs, as
    tmp_path/units/dssefs@mnt-secure.service (resolved through the template beside it)."""
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    text = TEMPLATE.read_text() if text is None else text
    (units / "dssefs@.service").write_text(text.replace(service.DEFAULT_EXECUTABLE, dssefs_executable()))
    return units / "dssefs@mnt-secure.service"


# ---- the template ------------------------------------------------------------------------------

def test_repository_template_is_the_one_install_writes():
    assert TEMPLATE.read_text() == service.UNIT_TEMPLATE


def test_template_runs_the_daemon_as_the_brief_says():
    settings = {(s, k): v for s, k, v in unit_settings(TEMPLATE.read_text())}
    exe = service.DEFAULT_EXECUTABLE
    assert settings["Service", "Type"] == "notify"
    assert settings["Service", "NotifyAccess"] == "main"
    assert settings["Service", "ExecStart"] == f"{exe} mount --foreground --config /etc/dssefs/%i.toml %f"
    assert settings["Service", "ExecStartPre"] == f"-{exe} umount --if-dead %f"
    assert settings["Service", "ExecStopPost"] == f"-{exe} umount --if-dead %f"
    assert settings["Service", "Restart"] == "on-failure"
    assert settings["Service", "KillMode"] == "mixed"
    assert settings["Service", "TimeoutStopSec"] == "15min"
    assert settings["Unit", "Before"] == "remote-fs.target"
    assert settings["Install", "WantedBy"] == "remote-fs.target"
    lines = set(TEMPLATE.read_text().splitlines())
    assert [h for h in HARDENING if h not in lines] == []


def test_no_unit_or_example_creates_a_mount_namespace():
    files = [TEMPLATE, *EXAMPLE_UNITS]
    found = {f.name: namespace_settings(f.read_text()) for f in files}
    assert found == {f.name: [] for f in files}, {
        name: [f"{k}: {MOUNT_NAMESPACE_SETTINGS[k]}" for k in keys] for name, keys in found.items() if keys}


def test_namespace_detector_flags_what_it_should():
    text = TEMPLATE.read_text()
    assert namespace_settings(text + "ProtectSystem=strict\n") == ["ProtectSystem"]
    assert namespace_settings("[Service]\nPrivateTmp = yes\nReadWritePaths=/var/cache/dssefs \\\n  /run\n") == [
        "PrivateTmp", "ReadWritePaths"]
    assert namespace_settings("[Service]\n# PrivateTmp=yes\n; ProtectHome=yes\n") == []


@needs_analyze
def test_template_verifies_without_a_message(tmp_path):
    r = verify(instantiated_template(tmp_path))
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")


@needs_analyze
def test_verify_catches_a_misspelled_key(tmp_path):
    """A typo only warns (exit status 0), so the check above must look at stderr."""
    text = TEMPLATE.read_text().replace("NoNewPrivileges=yes", "ProtecSystem=yes")
    r = verify(instantiated_template(tmp_path, text))
    assert r.returncode == 0
    assert "Unknown key 'ProtecSystem'" in r.stderr


@needs_analyze
def test_verify_catches_a_missing_executable(tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    (units / "dssefs@.service").write_text(TEMPLATE.read_text().replace(
        service.DEFAULT_EXECUTABLE, str(tmp_path / "no-such-dssefs")))
    r = verify(units / "dssefs@mnt-secure.service")
    assert r.returncode != 0 and "no-such-dssefs" in r.stderr


@needs_analyze
def test_examples_verify_without_a_message(tmp_path):
    r = verify(*EXAMPLE_UNITS)
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")


def _exposure(output: str) -> float:
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert m, output
    return float(m.group(1))


@needs_analyze
def test_security_exposure_stays_under_the_threshold(tmp_path):
    unit = instantiated_template(tmp_path)
    # --threshold takes the exposure times ten (0..100); exit status 1 above it
    r = analyze("security", "--offline=yes", f"--threshold={round(SECURITY_THRESHOLD * 10)}", str(unit))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _exposure(r.stdout) <= SECURITY_THRESHOLD


@needs_analyze
def test_security_threshold_is_enforced(tmp_path):
    """The same check fails for a unit without the hardening, so the threshold means something."""
    bare = "\n".join(line for line in TEMPLATE.read_text().splitlines()
                     if line not in HARDENING and not line.startswith("SystemCallErrorNumber=")) + "\n"
    r = analyze("security", "--offline=yes", f"--threshold={round(SECURITY_THRESHOLD * 10)}",
                str(instantiated_template(tmp_path, bare)))
    assert r.returncode != 0
    assert _exposure(r.stdout) > SECURITY_THRESHOLD


# ---- .mount / .automount / fstab examples --------------------------------------------------------

def test_example_mount_units_are_named_after_where_and_use_the_service_config():
    for unit in EXAMPLE_UNITS:
        settings = {k: v for _, k, v in unit_settings(unit.read_text())}
        where = settings["Where"]
        assert unit.stem == service.escape_path(where)
    mount = {k: v for _, k, v in unit_settings(EXAMPLE_UNITS[0].read_text())}
    assert mount["Type"] == "fuse.dssefs"
    assert mount["What"] == "s3://my-bucket/team"
    options = mount["Options"].split(",")
    assert "_netdev" in options
    assert f"config={service.config_path(service.escape_path(mount['Where']))}" in options


def fstab_entries() -> list[list[str]]:
    entries = []
    for line in (EXAMPLES / "fstab").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            entries.append(line.split())
    return entries


def test_fstab_example_lines_are_dssefs_mounts_with_matching_config_files():
    entries = fstab_entries()
    assert len(entries) == 3
    for what, where, fstype, options, dump, passno in entries:
        assert fstype == "fuse.dssefs" or fstype.startswith("fuse./"), fstype
        # mount(8) finds its helper by the type up to the last '.': a dot in the path breaks it
        assert "." not in fstype[len("fuse."):], fstype
        assert what.startswith("s3://")
        for opt in options.split(","):
            if opt.startswith("config="):
                assert opt == f"config={service.config_path(service.escape_path(where))}"
        # what dssefs sees after mount(8) drops x-* and mount.fuse3 drops _netdev, nofail, noauto
        passed = [o for o in options.split(",")
                  if not o.startswith("x-") and o not in ("_netdev", "nofail", "noauto", "auto")]
        config.parse_mount_options(",".join(passed))  # every option is one dssefs knows


@needs_generator
def test_fstab_example_through_the_fstab_generator(tmp_path):
    out, early, late = (tmp_path / "normal", tmp_path / "early", tmp_path / "late")
    for d in (out, early, late):
        d.mkdir()
    env = dict(os.environ, SYSTEMD_FSTAB=str(EXAMPLES / "fstab"),
               SYSTEMD_PROC_CMDLINE="",  # the host's kernel command line (fstab=, systemd.mount-extra=) stays out
               SYSTEMD_IN_INITRD="0", SYSTEMD_LOG_LEVEL="info")
    r = subprocess.run([FSTAB_GENERATOR, str(out), str(early), str(late)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    for what, where, fstype, options, _, _ in fstab_entries():
        name = service.escape_path(where)
        unit = {(s, k): v for s, k, v in unit_settings((out / f"{name}.mount").read_text())}
        assert unit["Mount", "What"] == what
        assert unit["Mount", "Where"] == where
        assert unit["Mount", "Type"] == fstype
        assert unit["Mount", "Options"] == options
        opts = options.split(",")
        kind = "wants" if "nofail" in opts else "requires"
        pulled = f"{name}.automount" if "x-systemd.automount" in opts else f"{name}.mount"
        assert (out / f"remote-fs.target.{kind}" / pulled).is_symlink(), sorted(p.name for p in out.rglob("*"))
        if "nofail" not in opts:  # nofail also drops the ordering before remote-fs.target
            assert unit["Unit", "Before"] == "remote-fs.target"
        if "x-systemd.automount" in opts:
            auto = {k: v for _, k, v in unit_settings((out / f"{name}.automount").read_text())}
            assert auto["Where"] == where and auto["TimeoutIdleSec"] == "10min"
            assert unit["Mount", "TimeoutSec"] == "1min 30s"
            assert not (out / "remote-fs.target.requires" / f"{name}.mount").exists()
    if ANALYZE:
        r = verify(*sorted(out.glob("*.mount")), *sorted(out.glob("*.automount")))
        assert (r.returncode, r.stderr) == (0, "")


# ---- dssefs service ------------------------------------------------------------------------------

AWKWARD_PATHS = [
    "/mnt/secure", "/mnt/s3/my-bucket", "/mnt/with space", "/mnt/ünïcödé/日本", "/mnt/.hidden", "/.dot",
    "/mnt/x.y/z..w", "/mnt/trailing/", "//mnt//double", "/mnt/./dot", "/", "/mnt/back\\slash",
    "/mnt/per%cent", "/mnt/colon:under_score~tilde", "/-leading-dash", "/mnt/tab\tnew\nline", "/mnt/a+b=c,d",
]


@needs_escape
@pytest.mark.parametrize("path", AWKWARD_PATHS)
def test_escape_path_matches_systemd_escape(path):
    r = subprocess.run([ESCAPE, "--path", "--", path], capture_output=True, text=True, check=True)
    instance = r.stdout.rstrip("\n")
    assert service.escape_path(path) == instance
    u = subprocess.run([ESCAPE, "--unescape", "--path", "--", instance], capture_output=True, text=True,
                       check=True)
    assert service.unescape_path(instance) == u.stdout.rstrip("\n")  # what %f gives the unit


@needs_escape
def test_escape_path_refuses_dot_dot_like_systemd_escape():
    r = subprocess.run([ESCAPE, "--path", "--", "/mnt/../x"], capture_output=True, text=True)
    assert r.returncode != 0
    with pytest.raises(ValueError):
        service.escape_path("/mnt/../x")


def install(tmp_path, *args: str, capsys=None) -> tuple[int, str, str]:
    rc = service.main(["install", *args, "--root", str(tmp_path / "root")])
    out, err = capsys.readouterr() if capsys else ("", "")
    return rc, out, err


BASIC = ("team", "--source", "s3://my-bucket/team", "--mountpoint", "/mnt/secure", "--kms-key-id", "alias/team")


def test_install_writes_config_unit_and_mount_point(tmp_path, capsys):
    rc, out, err = install(tmp_path, *BASIC, "--allow-other", "--cache-size", "512M", "--workers", "4",
                           "--file-mode", "0640", "--attr-timeout", "2.5", "--kms-allowed-key-ids", "old1,old2",
                           "--read-only", capsys=capsys)
    assert rc == 0, err
    root = tmp_path / "root"
    cfg = root / "etc/dssefs/mnt-secure.toml"
    unit = root / "etc/systemd/system/dssefs@.service"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "etc/dssefs").stat().st_mode) == 0o755
    assert (root / "mnt/secure").is_dir()
    assert unit.read_text() == service.UNIT_TEMPLATE.replace(service.DEFAULT_EXECUTABLE, dssefs_executable())
    # the configuration file means exactly what was given, read by the daemon's own loader
    values = config.load_file(str(cfg))
    s = config.settings_from(argparse.Namespace(), None, values, file_name=str(cfg))
    assert (s.name, s.source, s.kms_key_id) == ("team", "s3://my-bucket/team", "alias/team")
    assert (s.allow_other, s.read_only, s.cache_size, s.workers) == (True, True, 512 << 20, 4)
    assert (s.file_mode, s.attr_timeout, s.kms_allowed_key_ids) == (0o640, 2.5, ("old1", "old2"))
    assert set(values) == {"name", "source", "kms_key_id", "allow_other", "read_only", "cache_size", "workers",
                           "file_mode", "attr_timeout", "kms_allowed_key_ids"}
    assert "systemctl enable --now dssefs@mnt-secure.service" in out
    assert err == ""


def test_install_refuses_to_overwrite_without_force(tmp_path, capsys):
    assert install(tmp_path, *BASIC, capsys=capsys)[0] == 0
    cfg = tmp_path / "root/etc/dssefs/mnt-secure.toml"
    before = cfg.read_text()
    rc, out, err = install(tmp_path, *BASIC[:-1], "alias/other", capsys=capsys)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("dssefs: error: /etc/dssefs/mnt-secure.toml exists")
    assert "--force" in err
    assert cfg.read_text() == before
    rc, _, err = install(tmp_path, *BASIC[:-1], "alias/other", "--force", capsys=capsys)
    assert rc == 0, err
    assert config.load_file(str(cfg))["kms_key_id"] == "alias/other"
    assert [p.name for p in cfg.parent.iterdir()] == ["mnt-secure.toml"]  # no temporary file left


@pytest.mark.parametrize("args, key", [
    (("--cache-size", "lots"), "cache-size"),
    (("--chunk-size", "3000"), "chunk-size"),
    (("--foreign-objects", "maybe"), "foreign-objects"),
    (("--source", "http://example.com"), "source"),
])
def test_install_refuses_a_bad_value_and_writes_nothing(tmp_path, capsys, args, key):
    rc, out, err = install(tmp_path, *BASIC, *args, capsys=capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("dssefs: error: ") and f"'{key}'" in err, err
    assert not (tmp_path / "root").exists()


def test_install_refuses_bad_names_options_and_missing_keys(tmp_path, capsys):
    rc, _, err = install(tmp_path, "bad name", *BASIC[1:], capsys=capsys)
    assert rc == 2 and "'name'" in err and err.count("\n") == 1
    rc, _, err = install(tmp_path, *BASIC[:-2], capsys=capsys)
    assert rc == 2 and "--kms-key-id" in err and "--keyring" in err and err.count("\n") == 1
    rc, _, err = install(tmp_path, *BASIC, "--mountpoint", "/", capsys=capsys)
    assert rc == 2 and "cannot be /" in err
    rc, _, err = install(tmp_path, *BASIC, "--mountpoint", "/mnt/" + "x" * 300, capsys=capsys)
    assert rc == 2 and "255" in err
    for flag in (["--config", "/x.toml"], ["--foreground"], ["--name", "x"]):
        with pytest.raises(SystemExit) as e:
            install(tmp_path, *BASIC, *flag)
        assert e.value.code == 2
        assert flag[0] in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


def test_install_writes_file_options_as_absolute_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = install(tmp_path, *BASIC[:-2], "--keyring", "keyring", "--spill-dir", "spill", capsys=capsys)
    assert rc == 0, err
    values = config.load_file(str(tmp_path / "root/etc/dssefs/mnt-secure.toml"))
    assert (values["keyring"], values["spill_dir"]) == (str(tmp_path / "keyring"), str(tmp_path / "spill"))


def test_install_escapes_awkward_mount_points(tmp_path, capsys):
    mnt = "/mnt/s3/my-bucket ü"
    rc, out, err = install(tmp_path, "awkward", "--source", "file:///srv/vault", "--mountpoint", mnt + "/",
                           "--keyring", "/etc/dssefs/keyring", capsys=capsys)
    assert rc == 0, err
    instance = service.escape_path(mnt)
    assert instance == "mnt-s3-my\\x2dbucket\\x20\\xc3\\xbc"
    assert (tmp_path / "root/etc/dssefs" / f"{instance}.toml").is_file()
    assert (tmp_path / "root" / mnt.lstrip("/")).is_dir()
    assert f"'dssefs@{instance}.service'" in out  # quoted for the shell
    assert "keyring /etc/dssefs/keyring does not exist yet" in err


@needs_analyze
def test_installed_unit_verifies(tmp_path, capsys):
    assert install(tmp_path, *BASIC, capsys=capsys)[0] == 0
    r = verify(tmp_path / "root/etc/systemd/system/dssefs@mnt-secure.service")
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")


def test_install_keeps_a_different_unit_unless_forced(tmp_path, capsys):
    unit = tmp_path / "root/etc/systemd/system/dssefs@.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("# edited by hand\n")
    rc, _, err = install(tmp_path, *BASIC, capsys=capsys)
    assert rc == 1 and "systemctl edit" in err and err.count("\n") == 1
    assert unit.read_text() == "# edited by hand\n"
    assert not (tmp_path / "root/etc/dssefs").exists() or not list((tmp_path / "root/etc/dssefs").iterdir())
    assert install(tmp_path, *BASIC, "--force", capsys=capsys)[0] == 0
    assert unit.read_text().startswith("# dssefs@.service")


@pytest.mark.skipif(SYSTEMCTL is None, reason="needs systemctl")
def test_install_enable_with_root_links_the_instance(tmp_path, capsys):
    rc, out, err = install(tmp_path, *BASIC, "--enable", capsys=capsys)
    assert rc == 0, err
    link = tmp_path / "root/etc/systemd/system/remote-fs.target.wants/dssefs@mnt-secure.service"
    assert link.is_symlink() and os.readlink(link) == "/etc/systemd/system/dssefs@.service"
    assert "enabled dssefs@mnt-secure.service" in out


def test_show_and_uninstall(tmp_path, capsys):
    assert install(tmp_path, *BASIC, capsys=capsys)[0] == 0
    root = ["--root", str(tmp_path / "root")]
    assert service.main(["show", "/mnt/secure/", *root]) == 0
    out = capsys.readouterr().out
    assert "instance:     mnt-secure" in out and "unit:         dssefs@mnt-secure.service" in out
    assert "config file:  /etc/dssefs/mnt-secure.toml" in out and 'source = "s3://my-bucket/team"' in out
    assert service.main(["uninstall", "/mnt/secure", *root]) == 0
    out = capsys.readouterr().out
    assert "systemctl disable --now dssefs@mnt-secure.service" in out
    assert not (tmp_path / "root/etc/dssefs/mnt-secure.toml").exists()
    assert (tmp_path / "root/etc/systemd/system/dssefs@.service").exists()
    assert service.main(["uninstall", "/mnt/secure", *root]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dssefs: error: /etc/dssefs/mnt-secure.toml does not exist")
    assert service.main(["show", "/mnt/secure", *root]) == 1


def test_service_command_through_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dssefs", "service", "install", *BASIC, "--root", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "etc/dssefs/mnt-secure.toml").is_file()
    r = subprocess.run([sys.executable, "-m", "dssefs", "service", "install", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--kms-key-id" in r.stdout and "--mountpoint" in r.stdout
    assert "--foreground" not in r.stdout and "--config" not in r.stdout


# one command-line value per option, numeric-looking strings included (a name "2024", an account-id
# profile): what install writes must mean exactly what the same flags mean to 'dssefs mount'
EVERY_FLAG = {
    "kms_key_id": "1234", "kms_key_id_outer": "alias/outer", "kms_allowed_key_ids": "111,alias/old",
    "keyring_passphrase_file": "/etc/dssefs/pass", "endpoint_url": "http://127.0.0.1:9000",
    "region": "1", "profile": "123456789012", "path_style": None, "retry_mode": "adaptive",
    "max_attempts": "3", "chunk_size": "4M", "workers": "4", "cache_size": "1073741824",
    "small_file_prefetch": "128K", "spill_dir": "/var/cache/dssefs/x", "attr_timeout": "1e-1",
    "entry_timeout": "3", "attr_delay": "0", "allow_other": None, "read_only": None, "uid": "0",
    "gid": "1000", "file_mode": "640", "dir_mode": "0750", "foreign_objects": "read-only",
    "log_level": "debug", "kms_allowed_key_ids_outer": "alias/older-outer", "epoch_max_age": "3600",
    "epoch_max_objects": "5000", "keyrings": "/etc/dssefs/keyring-old,/etc/dssefs/keyring-2025", "stale_upload_age": "3600",
    "write_back": None, "journal_dir": "/var/lib/dssefs/journal-x", "write_behind": "16M",
}


def test_install_round_trips_every_option(tmp_path, capsys):
    argv = []
    for name, value in EVERY_FLAG.items():
        argv += ["--" + name.replace("_", "-")] + ([] if value is None else [value])
    rc, _, err = install(tmp_path, "2024", "--source", "s3://b/p", "--mountpoint", "/mnt/secure", *argv,
                         capsys=capsys)
    assert rc == 0, err
    cfg = str(tmp_path / "root/etc/dssefs/mnt-secure.toml")
    from_file = config.settings_from(argparse.Namespace(), None, config.load_file(cfg), file_name=cfg)
    p = argparse.ArgumentParser()
    config.add_arguments(p, ("mount", "store", "keys", "write"))
    from_flags = config.settings_from(p.parse_args(argv))
    for name in EVERY_FLAG:
        assert getattr(from_file, name) == getattr(from_flags, name), name
    assert (from_file.name, from_file.source) == ("2024", "s3://b/p")
    missing = {o.name for o in config.OPTIONS} - set(EVERY_FLAG) - {"name", "source", "config", "foreground",
                                                                        "keyring"}
    assert not missing, f"options without a value in EVERY_FLAG: {missing}"
