"""Low-level primitives under the safe identity API (as pyca/cryptography keeps ``hazmat`` apart).

    b64     strict, canonical base64url without padding (one encoding per byte string)
    json    strict JSON: no duplicate members, no NaN/Infinity, bounded size and depth

Most callers want ``sdk.identity`` (``issue_credential``, ``verify_presentation``...) instead.
"""
