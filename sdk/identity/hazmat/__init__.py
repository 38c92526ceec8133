"""Low-level primitives under the safe identity API (as pyca/cryptography keeps ``hazmat`` apart).

    b64             strict, canonical base64url without padding (one encoding per byte string)
    json            strict JSON: no duplicate members, no NaN/Infinity, bounded size and depth
    jcs             RFC 8785 JSON Canonicalization Scheme
    multibase       base58btc / multibase / multicodec key prefixes, with length caps
    ed25519         hot-path Ed25519 verification (verified-triple cache), small-order check
    data_integrity  ``DataIntegrityProof`` / ``eddsa-jcs-2022`` sign and verify, ``hash_data``
    proof_backends  ``register_proof_backend`` for other proof types (didkit's LD proofs)
    keys            raw key material of a ``Key``: seed, libsodium secret key, X25519 private key

Most callers want ``sdk.identity`` (``issue_credential``, ``verify_presentation``...) instead.
Importing this package imports none of its modules.
"""
