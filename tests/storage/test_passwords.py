import pytest

from storage.passwords import hash_password, verify_password


def test_hash_is_self_describing_scrypt_with_random_salt() -> None:
    first, second = hash_password("correct horse"), hash_password("correct horse")
    scheme, n, r, p, salt, digest = first.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert len(bytes.fromhex(salt)) == 16 and bytes.fromhex(digest)
    assert first != second


def test_verify_accepts_only_the_right_password() -> None:
    stored = hash_password("correct horse")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horsE", stored)
    assert not verify_password("", stored)


def test_no_stored_hash_never_matches() -> None:
    assert not verify_password("", None)
    assert not verify_password("anything at all", None)


@pytest.mark.parametrize(
    "stored", ["", "garbage", "bcrypt$1$2$3$00$00", "scrypt$x$8$1$00$00", "scrypt$16384$8$1$zz$00"]
)
def test_malformed_stored_hash_is_a_failed_login(stored: str) -> None:
    assert not verify_password("whatever", stored)
