"""Password hashing with the standard library's scrypt.

Hashes are self-describing strings, ``scrypt$n$r$p$salthex$hashhex``, so the
cost parameters can be raised later without breaking stored hashes. This
module knows nothing about users or the database.
"""

import hashlib
import hmac
import secrets
from functools import cache

_N, _R, _P = 2**14, 8, 1
_SALT_BYTES = 16
MIN_PASSWORD_LENGTH = 8


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * n * r * p)


def hash_password(password: str) -> str:
    """Hash a password with a fresh random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password, salt, _N, _R, _P)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


@cache
def _decoy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def verify_password(password: str, stored: str | None) -> bool:
    """Check a password against a stored hash; ``None`` (no password set) never matches.

    A missing hash still costs one scrypt run, so response time does not reveal
    whether an account exists or has a password.
    """
    try:
        scheme, n, r, p, salt, expected = (stored or _decoy_hash()).split("$")
        if scheme != "scrypt":
            return False
        actual = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
        return stored is not None and hmac.compare_digest(actual, bytes.fromhex(expected))
    except ValueError:
        # A malformed stored hash is a failed login, not a crash of the login form.
        return False
