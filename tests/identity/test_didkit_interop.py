"""didkit 0.3.3 interop, both directions, and the guard against its crash at interpreter exit.

didkit-issued VC-JWTs and Ed25519Signature2018/2020 LD credentials verify with our
``verify_credential``; our VC-JWTs verify in didkit. Skipped when didkit is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("didkit")

from sdk.identity import didkit_backend as db  # noqa: E402
from sdk.identity.credentials import issue_credential, verify_credential  # noqa: E402
from sdk.identity.hazmat.proof_backends import register_proof_backend  # noqa: E402
from sdk.identity.keys import Key  # noqa: E402
from sdk.identity.presentations import create_presentation, verify_presentation  # noqa: E402
from sdk.identity.trust import TrustPolicy  # noqa: E402

ANY = TrustPolicy.ANY

pytestmark = pytest.mark.interop

V1 = "https://www.w3.org/2018/credentials/v1"


@pytest.fixture(scope="module", autouse=True)
def didkit_session():
    """Guard the interpreter exit for this session and route LD proofs to didkit while here."""
    db.install_exit_guard()
    assert db.register_backend()
    yield
    for proof_type in db.LD_PROOF_TYPES:
        register_proof_backend(proof_type, None)


@pytest.fixture(scope="module")
def issuer():
    return Key.generate()


@pytest.fixture(scope="module")
def holder():
    return Key.generate()


def v1_credential(issuer: Key, subject: str, **extra) -> dict:
    return {
        "@context": [V1],
        "id": "urn:uuid:7f1e1a0c-0000-4000-8000-000000000001",
        "type": ["VerifiableCredential"],
        "issuer": issuer.did,
        "issuanceDate": "2024-01-01T00:00:00Z",
        "expirationDate": "2099-01-01T00:00:00Z",
        "credentialSubject": {"id": subject},  # LD signing needs terms the v1 context defines
        **extra,
    }


@pytest.fixture(scope="module")
def didkit_jwt(issuer, holder):
    return db.issue_jwt_credential(v1_credential(issuer, holder.did), issuer)


@pytest.fixture(scope="module", params=sorted(db.LD_PROOF_TYPES))
def didkit_ld(request, issuer, holder):
    cred = db.issue_ld_credential(v1_credential(issuer, holder.did), issuer, proof_type=request.param)
    assert cred["proof"]["type"] == request.param
    return cred


# -- didkit -> ours --------------------------------------------------------------------------------

def test_didkit_jwt_verifies_here(didkit_jwt, issuer, holder):
    result = verify_credential(didkit_jwt, trust=ANY)
    assert result.verified, result.messages
    assert result.proof_format == "jwt"
    assert result.issuer == issuer.did
    assert result.subject == holder.did
    assert result.verification_method == issuer.verification_method


def test_tampered_didkit_jwt_fails_here(didkit_jwt):
    header, payload, sig = didkit_jwt.split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    result = verify_credential(f"{header}.{payload}.{flipped}", trust=ANY)
    assert not result.verified
    assert result.errors == ["bad_signature"]


def test_didkit_ld_verifies_here(didkit_ld, issuer, holder):
    result = verify_credential(didkit_ld, trust=ANY)
    assert result.verified, result.messages
    assert result.proof_format == didkit_ld["proof"]["type"]
    assert result.issuer == issuer.did and result.subject == holder.did


@pytest.mark.parametrize(
    "field, value",
    [("credentialSubject", {"id": "did:example:mallory"}),
     ("expirationDate", "2099-01-02T00:00:00Z"),
     ("issuanceDate", "2023-01-01T00:00:00Z"),
     ("id", "urn:uuid:7f1e1a0c-0000-4000-8000-000000000002")],
)
def test_tampered_didkit_ld_fails_here(didkit_ld, field, value):
    tampered = {**didkit_ld, field: value}
    result = verify_credential(tampered, trust=ANY)
    assert not result.verified
    assert "bad_signature" in result.errors


def test_type_added_after_signing_is_caught(didkit_ld):
    """JSON-LD drops types the @context does not define, so the LD proof never signed them."""
    inflated = {**didkit_ld, "type": ["VerifiableCredential", "DeviceCredential"]}
    raw = db._sync(lambda: db._call("verify_credential", json.dumps(inflated), "{}"))
    assert json.loads(raw)["errors"] == []  # didkit alone accepts the inflated credential
    result = verify_credential(inflated, trust=ANY)
    assert not result.verified
    assert result.errors == ["malformed"]
    assert "DeviceCredential" in result.messages[0]


def test_ld_proof_by_a_key_not_the_issuers(didkit_ld):
    forged = {**didkit_ld, "issuer": Key.generate().did}
    result = verify_credential(forged, trust=ANY)
    assert not result.verified
    assert result.errors == ["key_not_authorized"]


def test_we_are_stricter_than_didkit_on_expiry(issuer, holder):
    expired = db.issue_ld_credential(
        v1_credential(issuer, holder.did, expirationDate="2020-01-01T00:00:00Z"), issuer
    )
    ok, errors = db.verify_ld_credential(expired)  # didkit 0.3.3 checks the proof only
    assert ok and errors == []
    result = verify_credential(expired, trust=ANY)
    assert not result.verified and result.errors == ["expired"]


def test_ld_credential_with_untrusted_or_unknown_method_is_rejected_offline(didkit_ld):
    web = json.loads(json.dumps(didkit_ld))
    web["issuer"] = "did:web:example.com"
    web["proof"]["verificationMethod"] = "did:web:example.com#key-1"
    ok, errors = db.verify_ld_credential(web)
    assert not ok and "did:key" in errors[0]


def test_our_presentation_can_carry_a_didkit_ld_credential(didkit_ld, holder):
    vp = create_presentation([didkit_ld], holder, challenge="n-1", domain="mesh.local")
    result = verify_presentation(vp, challenge="n-1", domain="mesh.local", trust=ANY)
    assert result.verified, result.messages
    assert result.credentials[0].proof_format == didkit_ld["proof"]["type"]
    wrong = verify_presentation(vp, challenge="n-2", domain="mesh.local", trust=ANY)
    assert not wrong.verified and "wrong_challenge" in wrong.errors


# -- ours -> didkit --------------------------------------------------------------------------------

def test_our_jwt_verifies_in_didkit(issuer, holder):
    ours = issue_credential(v1_credential(issuer, holder.did), issuer, proof_format="jwt")
    assert isinstance(ours, str)
    assert db.verify_jwt_credential(ours) == (True, [])


def test_our_tampered_jwt_fails_in_didkit(issuer, holder):
    ours = issue_credential(v1_credential(issuer, holder.did), issuer, proof_format="jwt")
    header, payload, sig = ours.split(".")
    other = issue_credential(v1_credential(issuer, "did:example:mallory"), issuer, proof_format="jwt")
    ok, errors = db.verify_jwt_credential(f"{header}.{other.split('.')[1]}.{sig}")
    assert not ok and errors


def test_jwt_signed_with_another_key_fails_in_didkit(issuer, holder):
    # kid names the issuer's key but the signature is by a stranger's key
    stranger = Key.generate()
    from sdk.identity.jwt_vc import credential_to_claims, sign_jwt

    token = sign_jwt(credential_to_claims(v1_credential(issuer, holder.did)), stranger,
                     kid=issuer.verification_method)
    ok, _ = db.verify_jwt_credential(token)
    assert not ok


# -- didkit presentations (the benchmark's yardstick) ----------------------------------------------

def test_didkit_presentation_round_trip(issuer, holder):
    cred = db.issue_ld_credential(v1_credential(issuer, holder.did), issuer)
    vp = db.issue_ld_presentation(
        {"@context": [V1], "type": ["VerifiablePresentation"], "holder": holder.did,
         "verifiableCredential": [cred]},
        holder, challenge="c-1", domain="mesh.local",
    )
    assert db.verify_ld_presentation(vp, challenge="c-1", domain="mesh.local") == (True, [])
    ok, errors = db.verify_ld_presentation(vp, challenge="c-2", domain="mesh.local")
    assert not ok and errors


async def test_async_api_on_the_callers_loop(issuer, holder):
    cred = await db.aissue_ld_credential(v1_credential(issuer, holder.did), issuer)
    assert await db.averify_ld_credential(cred) == (True, [])
    tampered = {**cred, "issuanceDate": "2024-01-02T00:00:00Z"}
    ok, errors = await db.averify_ld_credential(tampered)
    assert not ok and errors


# -- the exit crash guard --------------------------------------------------------------------------

GUARDED_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from sdk.identity import Key, didkit_backend as db
    key = Key.generate()
    cred = {"@context": ["https://www.w3.org/2018/credentials/v1"], "type": ["VerifiableCredential"],
            "issuer": key.did, "issuanceDate": "2024-01-01T00:00:00Z", "credentialSubject": {"id": key.did}}
    async def main():
        signed = await db.aissue_ld_credential(cred, key)
        assert (await db.averify_ld_credential(signed))[0]
    asyncio.run(main())
    signed = db.issue_ld_credential(cred, key, proof_type="Ed25519Signature2020")
    assert db.verify_ld_credential(signed)[0]
    print("child-ok")
    sys.exit(3)  # the guard must keep the process's own exit status
    """
)


@pytest.mark.slow
def test_guard_keeps_exit_clean_and_status_intact():
    """Unguarded, such a child aborts or segfaults at exit in a good share of runs."""
    for _ in range(4):
        proc = subprocess.run([sys.executable, "-c", GUARDED_CHILD],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert "child-ok" in proc.stdout
        assert "Fatal Python error" not in proc.stderr


@pytest.mark.slow
def test_cli_verifies_a_didkit_ld_credential(tmp_path, issuer, holder):
    """The CLI routes LD proofs to didkit and exits cleanly (the guard runs in a real process)."""
    path = tmp_path / "ld.json"
    path.write_text(json.dumps(db.issue_ld_credential(v1_credential(issuer, holder.did), issuer)))
    cmd = [sys.executable, "-c", "from sdk.cli import main; main()", "vc", "verify", str(path), "--any-issuer", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["verified"] and out["proof_format"] == "Ed25519Signature2018"
