"""
``balancer fake-server``: serve the fake useapi account API on loopback until Ctrl-C.

The token it accepts is ``--token``, else the ``USEAPI_TOKEN`` value that
:mod:`balancer.cli.main` read, else :data:`DEFAULT_FAKE_TOKEN`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..testing import FakeUseapi, make_accounts, make_v2_accounts
from .console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error, interrupt_on
from .demo.model import demo_limits

__all__ = ["DEFAULT_FAKE_TOKEN", "run_fake_server"]

#: The token ``balancer fake-server`` accepts when neither ``--token`` nor USEAPI_TOKEN is set.
DEFAULT_FAKE_TOKEN = "test-api-token"


def _load_map(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise TypeError(f"{path}: the account map must be a JSON object")
    return raw


def _token(given: str | None, env_token: str) -> tuple[str, str]:
    """The token to accept, and where it came from (for the banner)."""
    if given:
        return given, "as given by --token"
    if env_token:
        return env_token, "from USEAPI_TOKEN"
    return DEFAULT_FAKE_TOKEN, f"{DEFAULT_FAKE_TOKEN!r} (the default)"


def run_fake_server(args: argparse.Namespace, *, env_token: str) -> int:
    """The ``fake-server`` command: serve until interrupted."""
    try:
        v1 = _load_map(args.map) or make_accounts(6, max_jobs=demo_limits(6))
        v2 = _load_map(args.v2_map) or make_v2_accounts(3, max_jobs=[2, 4, 8])
    except (OSError, ValueError, TypeError) as exc:
        error(f"cannot load the map: {exc}")
        return EXIT_USAGE
    token, where = _token(args.token, env_token)
    env = f"USEAPI_TOKEN={DEFAULT_FAKE_TOKEN} " if token == DEFAULT_FAKE_TOKEN else ""
    fake = FakeUseapi(v1, v2_accounts=v2, token=token, port=args.port)
    try:
        fake.start()
    except OSError as exc:
        error(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}")
        return EXIT_FAILED
    with interrupt_on("SIGTERM"):
        return _serve(fake, v1, v2, where, env)


def _serve(fake: FakeUseapi, v1: dict[str, Any], v2: dict[str, Any], where: str, env: str) -> int:
    print(f"fake useapi listening on {fake.base_url}", flush=True)
    print(f"  GET {fake.base_url}/v1/pixverse/account   ({len(v1)} channels)")
    print(f"  GET {fake.base_url}/v2/pixverse/accounts  ({len(v2)} accounts)")
    print(f"  API token: {where}")
    print(f"  try: {env}balancer accounts --base-url {fake.base_url}")
    print("Ctrl-C to stop.", flush=True)
    try:
        fake.wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return EXIT_OK
