"""Verifies rolecheck access tokens with PyJWT, an implementation independent of the
one that signs them, against the JWK Set fetched over HTTP.

stdin: {"jwks_url": ..., "issuer": ..., "audience": ..., "tokens": [...]}
stdout: one JSON object per token, in order:
  {"ok": true, "header": {...}, "payload": {...}} or {"ok": false, "error": "..."}
"""

import json
import sys

import jwt


def main() -> None:
    request = json.load(sys.stdin)
    client = jwt.PyJWKClient(request["jwks_url"], cache_keys=False, cache_jwk_set=False)
    results = []
    for token in request["tokens"]:
        try:
            signing_key = client.get_signing_key_from_jwt(token)
            payload = jwt.decode(
                token,
                signing_key.key,
                algorithms=[signing_key.algorithm_name],
                audience=request["audience"],
                issuer=request["issuer"],
                options={"require": ["exp", "iat", "nbf", "sub", "jti", "iss", "aud"]},
            )
            header = jwt.get_unverified_header(token)
            results.append({"ok": True, "header": header, "payload": payload})
        except Exception as err:  # every failure is a verdict, reported to the test
            results.append({"ok": False, "error": f"{type(err).__name__}: {err}"})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
