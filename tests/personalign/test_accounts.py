import pytest

from personalign.errors import NotFoundError, UserError


def test_sign_in_checks_stored_hashed_passwords(services):
    accounts = services.accounts
    accounts.create_user("alice", "correct horse")
    assert accounts.authenticate("alice", "correct horse")
    assert not accounts.authenticate("alice", "wrong password")
    assert not accounts.authenticate("nobody", "correct horse")
    assert accounts.usernames() == ["alice"]


def test_single_user_mode_uses_one_local_user(services):
    assert services.accounts.user_id(None) == services.accounts.user_id(None)
    assert services.accounts.usernames() == []


def test_bad_accounts_are_user_errors(services):
    with pytest.raises(UserError):
        services.accounts.create_user("alice", "short")
    with pytest.raises(NotFoundError):
        services.accounts.user_id("ghost")
