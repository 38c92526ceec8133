"""`autoglm id|vc|vp|status-list` driven through Typer's CliRunner against real files and crypto."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.identity.keys import Key

PASS = "cli passphrase"
URL = "https://issuer.example/status/1"


@pytest.fixture
def cli(tmp_path):
    """Invoke the CLI with a keystore and passphrase in the environment; returns a runner fn."""
    runner = CliRunner()
    env = {"AUTOGLM_KEYSTORE": str(tmp_path / "ks.json"), "AUTOGLM_PASSPHRASE": PASS}

    def run(*args, input=None, **overrides):
        return runner.invoke(app, [str(a) for a in args], env={**env, **overrides}, input=input)

    run.tmp = tmp_path
    run.keystore = tmp_path / "ks.json"
    return run


@pytest.fixture
def issuer(cli):
    result = cli("id", "new", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["did"]


@pytest.fixture
def holder(cli, issuer):
    result = cli("id", "new", "--name", "holder", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["did"]


def ok_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def failed(result, reason):
    """Exit 1 and one stderr line naming ``reason`` (followed by at most one ``hint:`` line)."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) in (1, 2), result.stderr
    assert len(lines) == 1 or lines[1].startswith("hint: "), result.stderr
    assert lines[0].startswith(f"error: {reason}:"), lines[0]
    return lines[0]


# -- id ----------------------------------------------------------------------------------------------

def test_id_new_writes_encrypted_0600_keystore(cli, issuer):
    assert issuer.startswith("did:key:z6Mk")
    assert stat.S_IMODE(cli.keystore.stat().st_mode) == 0o600
    doc = json.loads(cli.keystore.read_text())
    assert doc["public"] == {"default": issuer}
    assert "ciphertext" in doc["cipher"]


def test_id_new_refuses_duplicate_name_and_keeps_store(cli, issuer):
    before = cli.keystore.read_bytes()
    failed(cli("id", "new"), "keystore_exists")
    assert cli.keystore.read_bytes() == before


def test_id_new_prompts_for_passphrase(cli):
    result = cli("id", "new", "--json", input="typed secret\ntyped secret\n", AUTOGLM_PASSPHRASE="")
    did = ok_json_from_prompt(result)
    shown = ok_json(cli("id", "show", "--json", AUTOGLM_PASSPHRASE="typed secret"))
    assert shown["did"] == did and shown["unlocked"] is True


def ok_json_from_prompt(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])["did"]


def test_id_show_locked_and_unlocked(cli, issuer, holder):
    locked = ok_json(cli("id", "show", "--json", AUTOGLM_PASSPHRASE=""))
    assert locked["unlocked"] is False
    assert locked["keys"] == {"default": issuer, "holder": holder}
    unlocked = ok_json(cli("id", "show", "--json", "--key-name", "holder", "--document"))
    assert unlocked["unlocked"] and unlocked["did"] == holder
    assert unlocked["document"]["id"] == holder
    readable = cli("id", "show")
    assert readable.exit_code == 0 and issuer in readable.stdout and holder in readable.stdout


def test_wrong_passphrase_is_one_line_and_never_touches_store(cli, issuer):
    before = cli.keystore.read_bytes()
    failed(cli("vc", "issue", "--subject", issuer, AUTOGLM_PASSPHRASE="nope"), "wrong_passphrase")
    failed(cli("id", "new", "--name", "x", AUTOGLM_PASSPHRASE="nope"), "wrong_passphrase")
    assert cli.keystore.read_bytes() == before
    as_json = cli("id", "show", "--json", AUTOGLM_PASSPHRASE="nope")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {
        "ok": False, "reason": "wrong_passphrase", "error": json.loads(as_json.stdout)["error"]
    }


def test_corrupt_keystore(cli, issuer):
    cli.keystore.write_text(cli.keystore.read_text()[:40])
    failed(cli("vc", "issue", "--subject", issuer), "corrupt_keystore")


# -- vc ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["eddsa-jcs-2022", "jwt"])
def test_vc_issue_and_verify(cli, issuer, holder, fmt):
    out = cli.tmp / f"cred-{fmt}"
    issued = ok_json(cli("vc", "issue", "-s", holder, "-t", "DeviceCredential", "-c", "gpu=true",
                         "--format", fmt, "-o", out, "--no-status", "--json"))
    assert issued["issuer"] == issuer and out.exists()
    checked = ok_json(cli("vc", "verify", out, "--any-issuer", "--json"))
    assert checked["verified"] and checked["issuer"] == issuer and checked["subject"] == holder
    assert checked["types"] == ["VerifiableCredential", "DeviceCredential"]
    assert checked["proof_format"] == fmt
    readable = cli("vc", "verify", out, "--any-issuer")
    assert readable.exit_code == 0 and "verified" in readable.stdout


def test_vc_issue_to_stdout_from_file(cli, issuer, holder):
    src = cli.tmp / "unsigned.json"
    src.write_text(json.dumps({
        "@context": ["https://www.w3.org/2018/credentials/v1"], "type": ["VerifiableCredential"],
        "issuanceDate": "2024-01-01T00:00:00Z", "credentialSubject": {"id": holder},
    }))
    result = cli("vc", "issue", src)
    assert result.exit_code == 0, result.output
    signed = json.loads(result.stdout)
    assert signed["issuer"] == issuer and signed["proof"]["cryptosuite"] == "eddsa-jcs-2022"
    dst = cli.tmp / "signed.json"
    dst.write_text(result.stdout)
    assert ok_json(cli("vc", "verify", dst, "--any-issuer", "--json"))["verified"]


def test_vc_verify_rejects_tampering(cli, issuer, holder):
    out = cli.tmp / "c.json"
    ok_json(cli("vc", "issue", "-s", holder, "-o", out, "--json"))
    doc = json.loads(out.read_text())
    doc["credentialSubject"]["id"] = issuer
    out.write_text(json.dumps(doc))
    failed(cli("vc", "verify", out), "bad_signature")
    as_json = cli("vc", "verify", out, "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["errors"] == ["bad_signature"]


def test_vc_verify_expiry_with_now(cli, holder):
    out = cli.tmp / "c.json"
    ok_json(cli("vc", "issue", "-s", holder, "--valid-from", "2030-01-01T00:00:00Z",
                "--valid-until", "2030-02-01T00:00:00Z", "-o", out, "--json"))
    failed(cli("vc", "verify", out), "not_yet_valid")
    assert ok_json(cli("vc", "verify", out, "--now", "2030-01-15T00:00:00Z", "--any-issuer", "--json"))["verified"]
    failed(cli("vc", "verify", out, "--now", "2030-03-01T00:00:00Z"), "expired")


def test_vc_verify_trust_policy(cli, issuer, holder):
    out = cli.tmp / "c.json"
    ok_json(cli("vc", "issue", "-s", holder, "-t", "DeviceCredential", "-o", out, "--no-status", "--json"))
    assert ok_json(cli("vc", "verify", out, "--trust", f"{issuer}=DeviceCredential", "--json"))["verified"]
    failed(cli("vc", "verify", out, "--trust", f"{issuer}=InferenceAccessCredential"), "untrusted_issuer")
    policy = cli.tmp / "trust.json"
    policy.write_text(json.dumps([{"issuer": Key.generate().did, "types": ["*"]}]))
    failed(cli("vc", "verify", out, "--trust-file", policy), "untrusted_issuer")


def test_vc_bad_inputs(cli, issuer):
    failed(cli("vc", "verify", cli.tmp / "missing.json"), "file_not_found")
    junk = cli.tmp / "junk.txt"
    junk.write_text("hello world")
    failed(cli("vc", "verify", junk), "malformed")
    failed(cli("vc", "issue", "--subject", issuer, "--format", "ldp"), "invalid_input")
    failed(cli("vc", "issue"), "invalid_input")


# -- status-list -------------------------------------------------------------------------------------

def test_status_list_revocation_flow(cli, issuer, holder):
    sl = cli.tmp / "sl.json"
    cred = cli.tmp / "c.json"
    ok_json(cli("status-list", "create", URL, "-o", sl, "--size", "1024", "--json"))
    ok_json(cli("vc", "issue", "-s", holder, "--status-url", URL, "--status-index", "42",
                "-o", cred, "--json"))
    failed(cli("vc", "verify", cred), "status_unavailable")  # status check needs the list
    assert ok_json(cli("vc", "verify", cred, "--status-list", sl, "--any-issuer", "--json"))["verified"]
    assert ok_json(cli("status-list", "check", sl, "42", "--json"))["bits"] == {"42": False}

    ok_json(cli("status-list", "set", sl, "42", "--json"))
    failed(cli("vc", "verify", cred, "--status-list", sl), "revoked")
    failed(cli("vc", "verify", cred, "--status-list", f"{URL}={sl}"), "revoked")
    failed(cli("status-list", "check", sl, "41", "42"), "revoked")
    assert ok_json(cli("vc", "verify", cred, "--no-status", "--any-issuer", "--json"))["verified"]

    ok_json(cli("status-list", "clear", sl, "42", "--json"))
    assert ok_json(cli("vc", "verify", cred, "--status-list", sl, "--any-issuer", "--json"))["verified"]


def test_status_list_jwt_and_foreign_key(cli, issuer, holder):
    sl = cli.tmp / "sl.jwt"
    ok_json(cli("status-list", "create", URL, "-o", sl, "--size", "64", "--format", "jwt", "--json"))
    ok_json(cli("status-list", "set", sl, "3", "--json"))
    assert sl.read_text().count(".") == 2  # still a VC-JWT after re-signing
    failed(cli("status-list", "check", sl, "3"), "revoked")
    failed(cli("status-list", "set", sl, "4", "--key-name", "holder"), "key_not_authorized")
    failed(cli("status-list", "set", sl, "64"), "invalid_input")
    failed(cli("status-list", "create", URL, "-o", sl), "file_exists")


# -- vp ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["eddsa-jcs-2022", "jwt"])
def test_vp_create_and_verify(cli, issuer, holder, fmt):
    c1, c2, vp = cli.tmp / "c1.json", cli.tmp / "c2.jwt", cli.tmp / f"vp-{fmt}"
    ok_json(cli("vc", "issue", "-s", holder, "-t", "DeviceCredential", "-o", c1, "--no-status", "--json"))
    ok_json(cli("vc", "issue", "-s", holder, "-t", "InferenceAccessCredential", "--format", "jwt",
                "-o", c2, "--json"))
    created = ok_json(cli("vp", "create", c1, c2, "--challenge", "n-1", "--domain", "mesh.local",
                          "--key-name", "holder", "--format", fmt, "-o", vp, "--json"))
    assert created["holder"] == holder and created["credentials"] == 2
    checked = ok_json(cli("vp", "verify", vp, "--challenge", "n-1", "--domain", "mesh.local",
                          "--trust", f"{issuer}=DeviceCredential,InferenceAccessCredential", "--json"))
    assert checked["verified"] and checked["holder"] == holder
    kinds = [c["types"][-1] for c in checked["credentials"]]
    assert kinds == ["DeviceCredential", "InferenceAccessCredential"]
    failed(cli("vp", "verify", vp, "--challenge", "n-2", "--domain", "mesh.local"), "wrong_challenge")
    failed(cli("vp", "verify", vp, "--challenge", "n-1", "--domain", "evil.example"), "wrong_domain")


def test_vp_by_someone_else_than_the_subject(cli, issuer, holder):
    c1, vp = cli.tmp / "c1.json", cli.tmp / "vp.json"
    ok_json(cli("vc", "issue", "-s", holder, "-o", c1, "--json"))
    ok_json(cli("vp", "create", c1, "--challenge", "n", "-o", vp, "--json"))  # default key, not holder
    failed(cli("vp", "verify", vp, "--challenge", "n"), "holder_mismatch")


def test_help_lists_the_identity_groups(cli):
    top = cli("--help")
    assert top.exit_code == 0
    for group in ("id", "vc", "vp", "status-list"):
        assert group in top.stdout
        sub = cli(group, "--help")
        assert sub.exit_code == 0, sub.output
    issue = cli("vc", "issue", "--help")
    assert "~/.autoglm/keystore.json" in issue.stdout and "AUTOGLM_PASSPHRASE" in issue.stdout


def test_vc_verify_without_trust_does_not_say_verified(cli, issuer, holder):
    out = cli.tmp / "self-issued.json"
    ok_json(cli("vc", "issue", "-s", holder, "-t", "AdminCredential", "-o", out, "--json"))
    readable = cli("vc", "verify", out)
    assert readable.exit_code == 1, readable.output
    assert "signature valid, issuer NOT checked" in readable.stdout and "verified" not in readable.stdout
    assert readable.stderr.splitlines()[0] == (
        "error: issuer_not_checked: credential signature valid, issuer NOT checked (no --trust)")
    assert "--any-issuer" in readable.stderr.splitlines()[1]
    as_json = cli("vc", "verify", out, "--json")
    checked = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and checked["signature_valid"] and not checked["ok"]
    assert not checked["verified"] and checked["issuer_checked"] is False
    assert checked["error"]["reason"] == "issuer_not_checked"
    trusted = ok_json(cli("vc", "verify", out, "--any-issuer", "--json"))
    assert trusted["verified"] and trusted["issuer_checked"]
    failed(cli("vc", "verify", out, "--trust", f"{holder}=AdminCredential"), "untrusted_issuer")
    failed(cli("vc", "verify", out, "--any-issuer", "--trust", f"{issuer}=*"), "invalid_input")


def test_world_readable_keystore_is_refused_with_a_chmod_hint(cli, issuer):
    os.chmod(cli.keystore, 0o644)
    try:
        result = cli("vc", "issue", "--subject", issuer)
        failed(result, "insecure_permissions")
        assert "chmod 600" in result.stderr
    finally:
        os.chmod(cli.keystore, 0o600)
    ok_json(cli("vc", "issue", "--subject", issuer, "--json"))
