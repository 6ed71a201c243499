"""No secret in any output the whole suite captured.

Every test's captured stdout, stderr and logging (setup, call and teardown; the server's
structured logs of every in-process app included) is searched for secrets by their
shapes: admin, agent and session tokens and identity secrets (``tba_``, ``tbg_``,
``tbs_``, ``tbi_``), webhook signing secrets (``whsec_``), identity tokens (JWTs), PEM
private keys (APNs p8, FCM service accounts), and the key and S3 secret the tests run
with. A shape matches any such secret, whichever test created it, in this process or in
a server process whose output a test printed. A match fails the run, naming the test,
the kind of secret and what came before it on its line, never the secret.

The one place a token is meant to be shown is the CLI's one-time display of a new admin
token, on the line after "(shown once; store it now)"; that line is skipped.

Push tokens have no shape of their own (an APNs token is 64 hex digits), so they are
searched by value: every token the APNs and FCM fakes made in this process is recorded,
and a run of 64 hex digits, or of an FCM token's form, that is one of them is a leak.

``tests/reliability/test_secrets_in_logs.py`` does the same for one real
``tellback serve`` through a full scenario, with every value it created (message
bodies too, which have no shape to search for).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tellback_server.dev.apns_fake import ApnsFake
from tellback_server.dev.fcm_fake import FcmFake
from tests.conftest import S3_SECRET_KEY
from tests.server.conftest import SECRET

SHAPES: dict[str, re.Pattern[str]] = {
    "admin, agent or session token, or identity secret": re.compile(
        r"\btb[agsi]_[A-Za-z0-9_-]{40,}"
    ),
    "webhook signing secret": re.compile(r"\bwhsec_[A-Za-z0-9+/]{40,}"),
    "identity token (JWT)": re.compile(
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}"
    ),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "the tests' TELLBACK_SECRET_KEY": re.compile(re.escape(SECRET)),
    "the tests' S3 secret key": re.compile(re.escape(S3_SECRET_KEY)),
}
# Push tokens the fakes made in this process (pytest_configure wraps their make_token).
PUSH_TOKENS: set[str] = set()
_PUSH_TOKEN_RUN = re.compile(
    r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])|[A-Za-z0-9_-]{22}:APA91b[A-Za-z0-9_-]{134}"
)
SHOWN_ONCE = "(shown once; store it now)"
# The console renderer colours keys and values: `\x1b[35mtbs_...` has no word boundary
# before the token until the colour codes are gone.
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def find_secrets(text: str) -> list[str]:
    """The kinds of secret in ``text``, one entry per match, in order."""
    return [kind for kind, _ in _matches(text)]


def _matches(text: str) -> list[tuple[str, str]]:
    """(kind, where) per match; ``where`` is the line up to the secret (which it omits)."""
    found: list[tuple[str, str]] = []
    shown = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = _COLOUR.sub("", raw)
        if not shown:
            for kind, shape in SHAPES.items():
                for match in shape.finditer(line):
                    before = line[: match.start()][-100:].strip()
                    found.append((kind, f"line {number}: {before} <the secret>"))
            for match in _PUSH_TOKEN_RUN.finditer(line):
                if match.group() in PUSH_TOKENS:
                    before = line[: match.start()][-100:].strip()
                    found.append(("push token", f"line {number}: {before} <the token>"))
        shown = SHOWN_ONCE in line
    return found


@dataclass(frozen=True)
class Leak:
    nodeid: str
    when: str
    section: str
    kind: str
    where: str


class SecretScan:
    def __init__(self) -> None:
        self.leaks: list[Leak] = []
        self.scanned = 0

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for section, text in report.sections:
            # A phase's report repeats the earlier phases' sections: each is read once.
            if not (section.startswith("Captured ") and section.endswith(report.when)):
                continue
            self.scanned += len(text)
            self.leaks += [
                Leak(report.nodeid, report.when, section, kind, where)
                for kind, where in _matches(text)
            ]

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.leaks:
            terminalreporter.write_line(
                f"secret scan: no secret in {self.scanned / 1e6:.1f} MB of captured output"
            )
            return
        terminalreporter.section("secrets in captured output", red=True)
        for leak in self.leaks:
            terminalreporter.write_line(f"{leak.nodeid} ({leak.section}): {leak.kind}")
            terminalreporter.write_line(f"    {leak.where}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.leaks and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _recorded(make: Callable[[], str]) -> Callable[[], str]:
    def make_and_record() -> str:
        token = make()
        PUSH_TOKENS.add(token)
        return token

    return make_and_record


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SecretScan(), "tellback-secret-scan")
    for fake in (ApnsFake, FcmFake):
        fake.make_token = staticmethod(_recorded(fake.make_token))  # type: ignore[method-assign]
