from __future__ import annotations

import inspect

import pytest

import balancer
from balancer import errors

#: The public names of design/CONTRACT.md (the list shared/tools/contract_check.py checks).
CONTRACT_NAMES = (
    "Account",
    "Secret",
    "ParsedAccounts",
    "Rejected",
    "parse_account_map",
    "UseapiAccountSource",
    "StaticAccountSource",
    "Balancer",
    "SyncBalancer",
    "Lease",
    "BalancerStatistics",
    "ChannelStatistics",
    "MemoryBackend",
    "RedisBackend",
    "BalancerError",
    "AuthError",
    "ConfigNotFoundError",
    "SourceError",
    "AccountMapError",
    "NoAccountsError",
    "NoCapacityError",
    "StaleAccountMapError",
    "LeaseError",
    "BackendUnavailableError",
)
#: Names that may still be under construction elsewhere.
PENDING = {"RedisBackend", "SyncBalancer"}

ERRORS = (
    "AuthError",
    "ConfigNotFoundError",
    "SourceError",
    "AccountMapError",
    "NoAccountsError",
    "NoCapacityError",
    "StaleAccountMapError",
    "LeaseError",
    "BackendUnavailableError",
)


class TestAll:
    def test_sorted_and_unique(self):
        """__all__ is one sorted list without duplicates."""
        assert balancer.__all__ == sorted(balancer.__all__)
        assert len(set(balancer.__all__)) == len(balancer.__all__)

    def test_covers_the_contract(self):
        """Every contract name (but those still pending) is exported in __all__."""
        assert set(CONTRACT_NAMES) - PENDING <= set(balancer.__all__)

    def test_pending_names_exported_once_present(self):
        """A pending contract name that exists is exported too."""
        for name in PENDING:
            if hasattr(balancer, name):
                assert name in balancer.__all__

    def test_every_name_importable(self):
        """Every name in __all__ is an attribute of the package."""
        missing = [name for name in balancer.__all__ if not hasattr(balancer, name)]
        assert missing == []

    @pytest.mark.parametrize("name", balancer.__all__)
    def test_module_is_the_package(self, name: str):
        """Every exported class and function presents itself as living in `balancer`."""
        member = getattr(balancer, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert member.__module__ == "balancer"

    def test_star_import(self):
        """`from balancer import *` gives exactly __all__."""
        namespace: dict[str, object] = {}
        exec("from balancer import *", namespace)  # noqa: S102 - the statement under test
        assert set(namespace) - {"__builtins__"} == set(balancer.__all__)


class TestErrors:
    @pytest.mark.parametrize("name", ERRORS)
    def test_subclass_of_balancer_error(self, name: str):
        """Every runtime error derives from BalancerError and is exported."""
        error = getattr(balancer, name)
        assert issubclass(error, balancer.BalancerError)
        assert name in balancer.__all__

    def test_balancer_error_is_an_exception(self):
        """BalancerError is an ordinary Exception, not a BaseException."""
        assert issubclass(balancer.BalancerError, Exception)

    def test_no_capacity_is_a_timeout(self):
        """NoCapacityError is also a TimeoutError, so `except TimeoutError` catches it."""
        assert issubclass(balancer.NoCapacityError, TimeoutError)
        assert issubclass(balancer.NoCapacityError, balancer.BalancerError)
        with pytest.raises(TimeoutError):
            raise balancer.NoCapacityError(1.5, channel="c1")

    def test_errors_module_lists_every_error(self):
        """balancer.errors exports the base and every error class of the contract."""
        assert set(errors.__all__) == {"BalancerError", *ERRORS}
        assert errors.__all__ == sorted(errors.__all__)

    def test_every_error_class_in_errors_module_is_public(self):
        """No BalancerError subclass is hidden from the package namespace."""
        for name, value in vars(errors).items():
            if inspect.isclass(value) and issubclass(value, errors.BalancerError):
                assert getattr(balancer, name) is value

    @pytest.mark.parametrize(
        ("error", "text"),
        [
            (balancer.NoCapacityError(2, channel="c1"), "c1"),
            (balancer.NoCapacityError(0.5), "any channel"),
            (balancer.StaleAccountMapError(12.0, 10), "12.0"),
            (balancer.StaleAccountMapError(None, 10), "ever fetched"),
            (balancer.NoAccountsError("no channel", channel="x"), "no channel"),
        ],
    )
    def test_messages(self, error: Exception, text: str):
        """Error messages are built from their fields."""
        assert text in str(error)


class TestVersion:
    def test_version(self):
        """The package has a version string."""
        assert isinstance(balancer.__version__, str) and balancer.__version__
