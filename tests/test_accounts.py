from __future__ import annotations

import dataclasses
import pickle
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.accounts import Account, ParsedAccounts, Rejected, Secret, parse_account_map
from balancer.errors import AccountMapError

DISCORD = "discord-token-SECRET-0123456789abcdef"
JWT = "jwt-token-SECRET-fedcba9876543210"
PASSWORD = "password-SECRET-hunter2"


def v1_entry(channel: str | None = None, *, max_jobs: object = 3, **extra: object):
    entry: dict[str, object] = {"server": "111", "discord": DISCORD, "maxJobs": max_jobs}
    if channel is not None:
        entry["channel"] = channel
    entry.update(extra)
    return entry


def v2_entry(email: str | None = None, *, max_jobs: object = 3, **extra: object):
    entry: dict[str, object] = {
        "maxJobs": max_jobs,
        "jwt": {"token": JWT, "expires": 123},
        "password": PASSWORD,
    }
    if email is not None:
        entry["email"] = email
    entry.update(extra)
    return entry


def assert_no_secret(parsed: ParsedAccounts) -> None:
    for rejected in parsed.rejected:
        for secret in (DISCORD, JWT, PASSWORD, "SECRET"):
            assert secret not in rejected.reason
            assert secret not in repr(rejected)


class TestSecret:
    def test_str_and_repr_are_masked(self):
        """str() and repr() show a fixed mask, never the value."""
        secret = Secret(DISCORD)
        assert str(secret) == "Secret('********')"
        assert repr(secret) == "Secret('********')"
        assert DISCORD not in str(secret) + repr(secret)

    def test_format_and_fstring_are_masked(self):
        """format(), f-strings, %-formatting and format specs all stay masked."""
        secret = Secret(DISCORD)
        rendered = [
            f"{secret}",
            f"{secret!r}",
            f"{secret!s}",
            f"{secret:>40}",
            format(secret, ""),
            "%s %r" % (secret, secret),  # noqa: UP031
            "{}".format(secret),  # noqa: UP032
        ]
        for text in rendered:
            assert "********" in text
            assert DISCORD not in text
        assert f"{secret:>40}".endswith("Secret('********')")

    def test_masked_inside_containers(self):
        """A secret inside a list or dict stays masked when the container prints."""
        assert DISCORD not in repr([Secret(DISCORD)]) + str({"k": Secret(DISCORD)})

    def test_reveal_returns_value(self):
        """reveal() is the one way to read the credential."""
        assert Secret(DISCORD).reveal() == DISCORD

    def test_equality_compares_values(self):
        """Secrets with equal values are equal; a secret never equals a plain str."""
        assert Secret("a") == Secret("a")
        assert Secret("a") != Secret("b")
        assert Secret("a") != "a"
        assert "a" != Secret("a")

    def test_hashable(self):
        """Equal secrets hash alike, so they work as set members and dict keys."""
        assert hash(Secret("a")) == hash(Secret("a"))
        assert len({Secret("a"), Secret("a"), Secret("b")}) == 2

    def test_pickle_round_trip_keeps_value(self):
        """A pickled secret comes back with its value, for worker processes."""
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            copy = pickle.loads(pickle.dumps(Secret(DISCORD), protocol=protocol))
            assert isinstance(copy, Secret)
            assert copy.reveal() == DISCORD

    @pytest.mark.parametrize("value", [None, 123, b"bytes", ["x"], Secret("x")])
    def test_non_str_raises_type_error(self, value: Any):
        """Secret() only wraps a str."""
        with pytest.raises(TypeError):
            Secret(value)

    def test_bool_reflects_emptiness(self):
        """An empty secret is falsy, any other is truthy."""
        assert not Secret("")
        assert Secret("x")


class TestAccount:
    def test_valid_account(self):
        """A well-formed account keeps its fields and masks its token in repr."""
        account = Account(channel="c1", server="s", discord=Secret(DISCORD), max_jobs=3)
        assert account.channel == "c1"
        assert account.discord.reveal() == DISCORD
        assert DISCORD not in repr(account)
        assert DISCORD not in str(account)

    def test_frozen(self):
        """Accounts are immutable."""
        account = Account(channel="c1", server=None, discord=Secret("t"), max_jobs=1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            account.max_jobs = 5  # type: ignore[misc]

    def test_plain_str_token_raises_type_error(self):
        """The token must be wrapped in a Secret."""
        with pytest.raises(TypeError):
            Account(channel="c1", server=None, discord=DISCORD, max_jobs=1)  # type: ignore[arg-type]

    @pytest.mark.parametrize("max_jobs", [True, 2.0, "3", None])
    def test_non_int_max_jobs_raises_type_error(self, max_jobs: Any):
        """max_jobs must be a real int, not a bool, float or str."""
        with pytest.raises(TypeError):
            Account(channel="c1", server=None, discord=Secret("t"), max_jobs=max_jobs)

    @pytest.mark.parametrize("max_jobs", [0, -1])
    def test_max_jobs_below_one_raises_value_error(self, max_jobs: int):
        """max_jobs must be at least 1."""
        with pytest.raises(ValueError):
            Account(channel="c1", server=None, discord=Secret("t"), max_jobs=max_jobs)

    def test_empty_channel_raises_value_error(self):
        """The channel must be a non-empty str."""
        with pytest.raises(ValueError):
            Account(channel="", server=None, discord=Secret("t"), max_jobs=1)

    def test_pickle_round_trip(self):
        """Accounts cross process boundaries with their token intact."""
        account = Account(channel="c1", server="s", discord=Secret(DISCORD), max_jobs=2)
        assert pickle.loads(pickle.dumps(account)) == account


class TestParseAccountMapV1:
    def test_valid_map(self):
        """Every good entry becomes an Account keyed by its channel."""
        parsed = parse_account_map({"c1": v1_entry("c1"), "c2": v1_entry("c2", max_jobs=10)})
        assert parsed.rejected == []
        assert set(parsed.accounts) == {"c1", "c2"}
        account = parsed.accounts["c2"]
        assert account == Account("c2", "111", Secret(DISCORD), 10)

    @pytest.mark.parametrize("payload", [[], [{"c1": {}}], "text", "", None, 0, 5, 2.5, True])
    def test_non_object_payload_raises(self, payload: object):
        """A payload that is not a JSON object raises AccountMapError."""
        with pytest.raises(AccountMapError):
            parse_account_map(payload)

    def test_unknown_schema_raises_value_error(self):
        """Only v1 and v2 exist."""
        with pytest.raises(ValueError):
            parse_account_map({}, schema="v3")

    def test_empty_object_gives_no_accounts(self):
        """An empty map parses to no accounts and no rejections."""
        parsed = parse_account_map({})
        assert parsed.accounts == {}
        assert parsed.rejected == []

    @pytest.mark.parametrize(
        ("entry", "reason"),
        [
            ("not an object", "object"),
            (["list"], "object"),
            (None, "object"),
            (7, "object"),
            (v1_entry("bad", max_jobs=0), "at least 1"),
            (v1_entry("bad", max_jobs=-1), "at least 1"),
            (v1_entry("bad", max_jobs="5"), "integer"),
            (v1_entry("bad", max_jobs=2.5), "integer"),
            (v1_entry("bad", max_jobs=True), "integer"),
            (v1_entry("bad", max_jobs=None), "integer"),
            ({"channel": "bad", "discord": DISCORD}, "missing maxJobs"),
            (v1_entry("other"), "disagrees"),
            (v1_entry("bad", discord=12345), "discord"),
        ],
    )
    def test_bad_entry_rejected_rest_kept(self, entry: object, reason: str):
        """A bad entry is rejected with a reason and the other entries are kept."""
        parsed = parse_account_map({"good": v1_entry("good"), "bad": entry})
        assert set(parsed.accounts) == {"good"}
        assert [r.key for r in parsed.rejected] == ["bad"]
        assert reason in parsed.rejected[0].reason
        assert_no_secret(parsed)

    @pytest.mark.parametrize("key", ["", "   "])
    def test_empty_key_rejected(self, key: str):
        """An empty or blank key is rejected."""
        parsed = parse_account_map({key: v1_entry(), "good": v1_entry()})
        assert set(parsed.accounts) == {"good"}
        assert parsed.rejected == [Rejected(key, parsed.rejected[0].reason)]

    def test_non_string_key_rejected(self):
        """A non-str key (possible from Python callers) is rejected, not raised."""
        parsed = parse_account_map({7: v1_entry(), "good": v1_entry()})
        assert set(parsed.accounts) == {"good"}
        assert [r.key for r in parsed.rejected] == ["7"]

    def test_max_jobs_above_documented_max_accepted(self):
        """maxJobs above upstream's documented 10 is accepted as given."""
        parsed = parse_account_map({"c1": v1_entry(max_jobs=11)})
        assert parsed.accounts["c1"].max_jobs == 11

    def test_entry_without_channel_takes_key(self):
        """An entry without a channel field is keyed and named by its map key."""
        parsed = parse_account_map({"c1": {"maxJobs": 2}})
        account = parsed.accounts["c1"]
        assert account.channel == "c1"
        assert account.server is None
        assert account.discord == Secret("")

    def test_reasons_never_contain_token(self):
        """Rejection reasons name types and numbers, never the entry's credentials."""
        payload = {
            f"k{i}": v1_entry(max_jobs=bad, discord=DISCORD)
            for i, bad in enumerate([0, -5, "x", 1.5, True, None, [DISCORD], {"t": DISCORD}])
        }
        payload["mismatch"] = v1_entry("other")
        payload["badtoken"] = v1_entry(discord=[DISCORD])
        parsed = parse_account_map(payload)
        assert parsed.accounts == {}
        assert len(parsed.rejected) == len(payload)
        assert_no_secret(parsed)

    def test_ten_thousand_entries(self):
        """A large map parses completely."""
        payload = {f"c{i}": v1_entry(f"c{i}", max_jobs=1 + i % 10) for i in range(10_000)}
        parsed = parse_account_map(payload)
        assert len(parsed.accounts) == 10_000
        assert parsed.accounts["c9999"].max_jobs == 10

    def test_accepts_any_mapping(self):
        """A read-only mapping parses like a dict."""
        parsed = parse_account_map(MappingProxyType({"c1": v1_entry()}))
        assert set(parsed.accounts) == {"c1"}


class TestParseAccountMapV2:
    def test_v2_takes_jwt_token_and_drops_password(self):
        """v2 keeps jwt.token as the credential, sets server None and keeps no password."""
        parsed = parse_account_map({"a@x.io": v2_entry("a@x.io", max_jobs=8)}, schema="v2")
        account = parsed.accounts["a@x.io"]
        assert account == Account("a@x.io", None, Secret(JWT), 8)
        assert PASSWORD.encode() not in pickle.dumps(parsed)

    def test_v2_entry_without_email_takes_key(self):
        """A v2 entry without email is named by its key."""
        parsed = parse_account_map({"a@x.io": v2_entry()}, schema="v2")
        assert parsed.accounts["a@x.io"].channel == "a@x.io"

    def test_v2_max_jobs_above_documented_max_accepted(self):
        """maxJobs above the documented v2 maximum of 8 is accepted."""
        parsed = parse_account_map({"a@x.io": v2_entry(max_jobs=9)}, schema="v2")
        assert parsed.accounts["a@x.io"].max_jobs == 9

    @pytest.mark.parametrize(
        ("entry", "reason"),
        [
            (v2_entry("other@x.io"), "disagrees"),
            (v2_entry(max_jobs=0), "at least 1"),
            (v2_entry(max_jobs="8"), "integer"),
            (v2_entry(jwt="token-as-string"), "jwt"),
            (v2_entry(jwt={"token": 5}), "jwt.token"),
            ([], "object"),
        ],
    )
    def test_v2_bad_entry_rejected(self, entry: object, reason: str):
        """A bad v2 entry is rejected with a reason and the rest kept."""
        parsed = parse_account_map({"ok@x.io": v2_entry(), "bad@x.io": entry}, schema="v2")
        assert set(parsed.accounts) == {"ok@x.io"}
        assert reason in parsed.rejected[0].reason
        assert_no_secret(parsed)


# -- fuzzing -----------------------------------------------------------------

SECRETS = st.text(alphabet="0123456789abcdef", min_size=4, max_size=12).map(lambda s: f"SECRET-{s}")
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
ENTRIES = st.fixed_dictionaries(
    {},
    optional={
        "server": st.text(max_size=6) | JSON_VALUES,
        "channel": st.text(max_size=6) | JSON_VALUES,
        "email": st.text(max_size=6) | JSON_VALUES,
        "discord": SECRETS | JSON_VALUES,
        "maxJobs": st.integers(min_value=-2, max_value=12) | JSON_VALUES,
        "jwt": st.fixed_dictionaries({}, optional={"token": SECRETS | JSON_VALUES}) | JSON_VALUES,
        "password": SECRETS,
    },
)
PAYLOADS = st.dictionaries(st.text(max_size=6), ENTRIES | JSON_VALUES, max_size=8) | JSON_VALUES


class TestParseAccountMapFuzz:
    @settings(max_examples=200, deadline=None, database=None)
    @given(payload=PAYLOADS, schema=st.sampled_from(["v1", "v2"]))
    def test_never_raises_and_accounts_for_every_key(self, payload: Any, schema: str):
        """Any payload either raises AccountMapError or splits its keys into accepted and rejected."""
        try:
            parsed = parse_account_map(payload, schema=schema)
        except AccountMapError as exc:
            assert not isinstance(payload, dict)
            assert "SECRET" not in str(exc)
            return
        accepted = set(parsed.accounts)
        rejected = [r.key for r in parsed.rejected]
        assert len(rejected) == len(set(rejected))
        assert accepted.isdisjoint(rejected)
        assert accepted | set(rejected) == set(payload)
        for key, account in parsed.accounts.items():
            assert account.channel == key
            assert account.max_jobs >= 1
            assert (account.server is None) if schema == "v2" else True
        for entry in parsed.rejected:
            assert "SECRET" not in entry.reason
