"""The bearer token every state-changing endpoint requires (``KESTREL_API_TOKEN``)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def token_refusal(api_token: str, headers: Mapping[str, str], what: str) -> tuple[int, str, str] | None:
    """(status, error, message) when the request may not change state; None when its token is right.

    ``what`` names the feature: "verdicts are" gives "verdicts are off: set ...".

    >>> token_refusal("", {}, "verdicts are")[2]
    'verdicts are off: set KESTREL_API_TOKEN on the worker'
    >>> wrong, right = {"Authorization": "Bearer x"}, {"Authorization": "Bearer s3"}
    >>> token_refusal("s3", wrong, "v")[:2], token_refusal("s3", right, "v")
    ((401, 'unauthorized'), None)
    """
    if not api_token:
        return 403, "disabled", f"{what} off: set KESTREL_API_TOKEN on the worker"
    given = headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_token}".encode()):
        return 401, "unauthorized", "missing or wrong bearer token"
    return None
