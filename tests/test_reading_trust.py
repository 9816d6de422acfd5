"""Reading without ceremony: the object says how it is wrapped, one configuration file says which
keys are trusted (per layer), and every refusal names what to change."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fuse_fixtures import fuse_available

pytestmark = pytest.mark.s3


def run(args, env, check=True):
    proc = subprocess.run([sys.executable, "-m", "dssefs", *args], env=env, capture_output=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"dssefs {' '.join(args)} -> {proc.returncode}\n{proc.stderr.decode()}")
    return proc


def one_line(proc) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def user(moto_server, tmp_path):
    """A new user's environment: their own config directory, the default keyring created by a
    first write to a local store (as the README's first command does), no system file."""
    cfg = tmp_path / "cfg"
    env = dict(os.environ, **moto_server.env, XDG_CONFIG_HOME=str(cfg), XDG_DATA_HOME=str(tmp_path / "data"),
               DSSEFS_SYSTEM_CONFIG=str(tmp_path / "etc" / "config.toml"))
    (tmp_path / "note").write_bytes(b"local note")
    run(["put", str(tmp_path / "note"), f"file://{tmp_path}/store/note"], env)
    assert (cfg / "dssefs" / "keyring").exists()
    keys = [moto_server.client("kms").create_key()["KeyMetadata"]["Arn"] for _ in range(2)]
    return env, cfg / "dssefs" / "config.toml", keys, tmp_path


def _put_kms(env, tmp_path, uri, data, inner, outer=None):
    (tmp_path / "src").write_bytes(data)
    run(["put", str(tmp_path / "src"), uri, "--kms-key-id", inner]
        + (["--kms-key-id-outer", outer] if outer else []), env)


def test_kms_objects_read_once_the_key_is_trusted_in_the_config(user, bucket):
    env, cfg, (a1, _a2), tmp = user
    uri = f"s3://{bucket}/report.pdf"
    _put_kms(env, tmp, uri, b"%PDF report", a1)
    # nothing trusted yet: one line naming the key and the exact config line or flag
    err = one_line(run(["cat", uri], env, check=False))
    assert a1 in err and "--kms-allowed-key-ids" in err
    assert f'kms_allowed_key_ids = ["{a1}"] in {cfg}' in err
    assert "'local'" not in err  # the default keyring's existence plays no part
    cfg.write_text(f'kms_allowed_key_ids = ["{a1}"]\n')
    assert run(["cat", uri], env).stdout == b"%PDF report"
    assert run(["get", uri, "-"], env).stdout == b"%PDF report"
    assert run(["verify", f"s3://{bucket}/"], env).returncode == 0
    # the keyring objects still read with no flag: the object names its provider
    assert run(["cat", f"file://{tmp}/store/note"], env).stdout == b"local note"
    # a trusted key is not a writing key: without --kms-key-id a put uses the default keyring
    (tmp / "w").write_bytes(b"w")
    run(["put", str(tmp / "w"), f"s3://{bucket}/w"], env)
    assert json.loads(run(["inspect", f"s3://{bucket}/w", "--json"], env).stdout)["key_provider"] == "local"


def test_split_custody_from_the_config_refuses_same_key_and_swapped(user, bucket):
    env, cfg, (a1, a2), tmp = user
    _put_kms(env, tmp, f"s3://{bucket}/good", b"genuine", a1, a2)
    _put_kms(env, tmp, f"s3://{bucket}/same", b"forged", a1)  # a writer holding a1 only
    _put_kms(env, tmp, f"s3://{bucket}/swapped", b"forged", a2, a1)
    cfg.write_text(f'kms_allowed_key_ids = ["{a1}"]\nkms_allowed_key_ids_outer = ["{a2}"]\n')
    assert run(["cat", f"s3://{bucket}/good"], env).stdout == b"genuine"
    for name in ("same", "swapped"):
        proc = run(["cat", f"s3://{bucket}/{name}"], env, check=False)
        assert "layer" in one_line(proc) and proc.stdout == b""
    # a key named for both layers is refused as a configuration error, naming both options
    cfg.write_text(f'kms_allowed_key_ids = ["{a1}"]\nkms_allowed_key_ids_outer = ["{a2}", "{a1}"]\n')
    err = one_line(run(["cat", f"s3://{bucket}/good"], env, check=False))
    assert "--kms-allowed-key-ids" in err and "--kms-allowed-key-ids-outer" in err


@pytest.mark.parametrize("text,mode,expect", [
    ("kms_allowed_key_ids = [\"a\"\n", 0o644, "not valid TOML"),
    ("trusted_keys = [\"x\"]\n", 0o644, "'trusted_keys' is not an option"),
    ("kms_allowed_key_ids = [\"alias/x\"]\n", 0o666, "writable by every user"),
    ("aws_secret_access_key = \"x\"\n", 0o600, "is a secret"),
    ("keyrings = 3\n", 0o644, "write a list of strings"),
])
def test_bad_user_config_gives_one_line(user, bucket, text, mode, expect):
    env, cfg, _keys, tmp = user
    cfg.write_text(text)
    os.chmod(cfg, mode)
    err = one_line(run(["cat", f"s3://{bucket}/x"], env, check=False))
    assert expect in err and str(cfg) in err, err


def test_config_show_names_each_source(user, tmp_path):
    env, cfg, (a1, a2), tmp = user
    system = tmp / "etc" / "config.toml"
    system.parent.mkdir()
    system.write_text(f'kms_allowed_key_ids = ["{a2}"]\nregion = "us-east-1"\nkeyrings = ["rings/a"]\n')
    cfg.write_text(f'kms_allowed_key_ids = ["{a1}"]\n')
    out = json.loads(run(["config", "show", "--json", "--epoch-max-objects", "5"], env).stdout)
    rows = {r["option"]: r for r in out["options"]}
    assert rows["kms_allowed_key_ids"] == {"option": "kms_allowed_key_ids", "value": [a1],
                                           "from": f"configuration file {cfg}"}
    assert rows["region"]["from"] == f"configuration file {system}"
    assert rows["keyrings"]["value"] == [str(tmp / "etc" / "rings" / "a")]  # relative to its file
    assert rows["epoch_max_objects"]["from"] == "cli" and rows["kms_key_id"]["from"] == "default"
    assert out["files"]["read"] == [str(system), str(cfg)]
    assert a1 in out["trusted_for_reading"]["kms_inner"]
    text = run(["config", "show"], env).stdout.decode()
    assert "trusted for reading" in text and str(cfg) in text


def test_mount_with_the_default_keyring_reads_trusted_kms_objects(user, bucket, mount_factory):
    if not fuse_available():
        pytest.skip("needs /dev/fuse")
    env, cfg, (a1, _a2), tmp = user
    _put_kms(env, tmp, f"s3://{bucket}/from-kms", b"kms data", a1)
    cfg.write_text(f'kms_allowed_key_ids = ["{a1}"]\n')
    # the mount writes with the default keyring (no KMS flag) and trusts a1 from the user's file
    m = mount_factory(tmp / "mnt", f"s3://{bucket}", "--keyring", str(cfg.parent / "keyring"),
                      "--spill-dir", str(tmp / "spill"),
                      env={"XDG_CONFIG_HOME": env["XDG_CONFIG_HOME"],
                           "DSSEFS_SYSTEM_CONFIG": env["DSSEFS_SYSTEM_CONFIG"]})
    m.start()
    assert (m / "from-kms").read_bytes() == b"kms data"
    (m / "new").write_bytes(b"keyring data")
    assert m.stop() == 0
    desc = json.loads(run(["inspect", f"s3://{bucket}/new", "--json"], env).stdout)
    assert desc["key_provider"] == "local"
