"""A local, faithful fake of Apple's APNs provider API (HTTP/2 over TLS).

It speaks real HTTP/2 (``h2``, ALPN ``h2``) over TLS with a self-signed CA it
generates, so the real ``aioapns`` client can be pointed at it. It checks what
Apple checks -- the ES256 provider token (``kid`` / ``iss`` / ``iat``), the
``apns-*`` headers, the device token, the payload -- and answers with Apple's
statuses and ``{"reason": ...}`` bodies, echoing ``apns-id`` on every response.

Pointing aioapns at it::

    fake = ApnsFake(topics=["com.example.app"])
    await fake.start()
    private_pem, public_pem = ApnsFake.generate_key()
    fake.add_key("TEAMID1234", "KEYID12345", public_pem)
    client = APNs(key=private_pem, key_id="KEYID12345", team_id="TEAMID1234",
                  topic="com.example.app", ssl_context=fake.client_ssl_context(),
                  max_connection_attempts=1)
    fake.configure_client(client)   # pool.protocol_class -> 127.0.0.1:<port>

Faults: :meth:`ApnsFake.fail_next` (status + reason), :meth:`fail_next_without_body`
(status, no body: aioapns never resolves such a send), :meth:`hang_next` (no
answer at all) and :meth:`accept_then_hang` (delivered, but no answer). Every
request is recorded in :attr:`attempts`; the accepted ones (what would reach a phone)
also in :attr:`received`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import ipaddress
import json
import logging
import re
import secrets
import shutil
import ssl
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import jwt
from aioapns import APNs
from aioapns.connection import APNsProductionClientProtocol, APNsTLSClientProtocol
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hpack.exceptions import HPACKDecodingError
from hpack.hpack import decode_integer
from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple

from tellback_server.dev.recording import Recorder

log = logging.getLogger("tellback.dev.apns_fake")

HOST = "127.0.0.1"
MAX_PAYLOAD_BYTES = 4096
MAX_VOIP_PAYLOAD_BYTES = 5120
MAX_COLLAPSE_ID_BYTES = 64
PROVIDER_TOKEN_MAX_AGE_S = 3600.0
PROVIDER_TOKEN_FUTURE_SKEW_S = 300.0

#: Reasons used by :meth:`ApnsFake.fail_next` when none is given.
DEFAULT_REASONS: dict[int, str] = {
    400: "BadDeviceToken",
    403: "InvalidProviderToken",
    404: "BadPath",
    405: "MethodNotAllowed",
    410: "Unregistered",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}

#: ``apns-push-type`` values Apple accepts.
PUSH_TYPES = frozenset(
    {
        "alert",
        "background",
        "location",
        "voip",
        "complication",
        "fileprovider",
        "mdm",
        "liveactivity",
        "pushtotalk",
        "widgets",
        "controls",
    }
)
#: Push types whose topic is the bundle id plus a suffix.
TOPIC_SUFFIXES: dict[str, str] = {
    "voip": ".voip",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "liveactivity": ".push-type.liveactivity",
    "pushtotalk": ".voip-ptt",
    "location": ".location-query",
    "widgets": ".push-type.widgets",
    "controls": ".push-type.controls",
}

_HEX = frozenset("0123456789abcdefABCDEF")
_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_TOPIC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
_DEVICE_PREFIX = "/3/device/"
_CA_FILE = "apns-fake-ca.pem"
_CERT_FILE = "apns-fake-cert.pem"
_KEY_FILE = "apns-fake-key.pem"

FailureMode = Literal["body", "no-body", "hang", "accept-hang"]


@dataclass(frozen=True, slots=True)
class ApnsNotification:
    """One request as the fake saw it, and how it answered."""

    token: str
    headers: dict[str, str]  # every header, pseudo-headers (":path") included
    payload: Any  # the parsed JSON body, None when it was empty or not JSON
    body: bytes
    apns_id: str  # the apns-id the fake answered with (echoed, or generated)
    status: int  # HTTP status answered; 0 for hang_next, 200 for accept_then_hang's
    reason: str | None
    team_id: str | None  # from the provider token, when it verified
    key_id: str | None
    received_at: float  # time.monotonic()
    received_wall: float  # time.time()
    connection_id: int
    stream_id: int

    @property
    def topic(self) -> str | None:
        return self.headers.get("apns-topic")

    @property
    def push_type(self) -> str | None:
        return self.headers.get("apns-push-type")

    @property
    def accepted(self) -> bool:
        return self.status == 200


@dataclass(slots=True)
class _Failure:
    status: int
    reason: str | None
    remaining: int | None  # None: until clear_failures()
    retry_after: int | None
    token: str | None
    mode: FailureMode


@dataclass(frozen=True, slots=True)
class _Auth:
    reason: str | None
    team_id: str | None = None
    key_id: str | None = None
    iat: float = 0.0


@dataclass(slots=True)
class _Key:
    team_id: str
    public_key: ec.EllipticCurvePublicKey


@dataclass(slots=True)
class _Stream:
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)


def _now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _load_cert_material(directory: Path) -> bool:
    """True when a usable CA + leaf pair is already in ``directory``."""
    paths = [directory / name for name in (_CA_FILE, _CERT_FILE, _KEY_FILE)]
    if not all(p.is_file() for p in paths):
        return False
    try:
        cert = x509.load_pem_x509_certificate(paths[1].read_bytes())
    except ValueError:
        return False
    return cert.not_valid_after_utc > _now_utc() + dt.timedelta(days=1)


def _write_cert_material(directory: Path) -> None:
    """A CA and a leaf for 127.0.0.1 / ::1 / localhost, signed by it (EC P-256)."""
    now = _now_utc() - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tellback dev APNs fake CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=364))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _CA_FILE).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / _CERT_FILE).write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / _KEY_FILE
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _public_key(pem: str | bytes) -> ec.EllipticCurvePublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    key: Any
    if b"PRIVATE KEY" in data:
        key = serialization.load_pem_private_key(data, password=None).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("APNs keys are EC P-256 (ES256) keys")
    return key


@functools.cache
def _huffman_byte_table() -> list[tuple[int, bytes, bool]]:
    """hpack's 4-bit Huffman state machine folded into 8-bit steps (65,536 entries).

    Entry ``(state << 8) | byte`` -> (next state or -1 on an invalid code,
    bytes emitted, whether the string may end here).
    """
    table: list[tuple[int, bytes, bool]] = []
    for state in range(256):
        for byte in range(256):
            mid, flags1, out1 = HUFFMAN_TABLE[state * 16 + (byte >> 4)]
            end, flags2, out2 = HUFFMAN_TABLE[mid * 16 + (byte & 0x0F)]
            if (flags1 | flags2) & HUFFMAN_FAIL:
                table.append((-1, b"", False))
                continue
            emitted = bytearray()
            if flags1 & HUFFMAN_EMIT_SYMBOL:
                emitted.append(out1)
            if flags2 & HUFFMAN_EMIT_SYMBOL:
                emitted.append(out2)
            table.append((end, bytes(emitted), bool(flags2 & HUFFMAN_COMPLETE)))
    return table


def _decode_huffman(data: bytes) -> bytes:
    """Same result and errors as ``hpack.huffman_table.decode_huffman``, about 3x faster."""
    if not data:
        return b""
    table = _huffman_byte_table()
    state = 0
    complete = True
    out = bytearray()
    for byte in data:
        state, emitted, complete = table[(state << 8) | byte]
        if state < 0:
            raise HPACKDecodingError("Invalid Huffman string")
        if emitted:
            out += emitted
    if not complete:
        raise HPACKDecodingError("Incomplete Huffman string")
    return bytes(out)


class _FastDecoder(hpack.Decoder):
    """hpack's Decoder with the byte-wise Huffman decoder above (request paths and
    apns-ids are Huffman-coded literals: decoding them was a quarter of the fake's CPU)."""

    def _decode_literal(
        self, data: bytes | memoryview, should_index: bool
    ) -> tuple[HeaderTuple, int]:
        if isinstance(data, memoryview):
            data = data.tobytes()
        if should_index:
            indexed_name = data[0] & 0x3F
            name_len = 6
            not_indexable = False
        else:
            indexed_name = data[0] & 0x0F
            name_len = 4
            not_indexable = bool(data[0] & 0x10)
        name: bytes
        if indexed_name:
            index, consumed = decode_integer(data, name_len)
            name = self.header_table.get_by_index(index)[0]
            total_consumed = consumed
            length = 0
        else:
            data = data[1:]
            length, consumed = decode_integer(data, 7)
            name = data[consumed : consumed + length]
            if len(name) != length:
                raise HPACKDecodingError("Truncated header block")
            if data[0] & 0x80:
                name = _decode_huffman(name)
            total_consumed = consumed + length + 1
        data = data[consumed + length :]
        length, consumed = decode_integer(data, 7)
        value = data[consumed : consumed + length]
        if len(value) != length:
            raise HPACKDecodingError("Truncated header block")
        if data[0] & 0x80:
            value = _decode_huffman(value)
        total_consumed += length + consumed
        header = NeverIndexedHeaderTuple(name, value) if not_indexable else HeaderTuple(name, value)
        if should_index:
            self.header_table.add(name, value)
        return header, total_consumed


class _PlainEncoder(hpack.Encoder):
    """Responses are two short headers: skip Huffman-coding them (optional in HPACK)."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _Connection(asyncio.Protocol):
    """One client connection: HTTP/2 framing via h2, requests handed to the fake."""

    def __init__(self, fake: ApnsFake, connection_id: int) -> None:
        self.fake = fake
        self.connection_id = connection_id
        self.transport: asyncio.Transport | None = None
        # Header validation/normalisation is h2's own protocol hygiene, not what APNs
        # clients are tested for; skipping it keeps the per-request cost small.
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        decoder = _FastDecoder()
        decoder.max_header_list_size = self.h2.decoder.max_header_list_size
        decoder.max_allowed_table_size = self.h2.decoder.max_allowed_table_size
        self.h2.decoder = decoder
        self.h2.encoder = _PlainEncoder()
        self.streams: dict[int, _Stream] = {}
        self.pending: dict[int, bytes] = {}  # response bodies waiting for flow-control window
        self.closed = asyncio.get_running_loop().create_future()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.fake._connections.add(self)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.fake.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 8192,
            },
        )
        self.h2.initiate_connection()
        extra = self.fake.connection_window - 65535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)
        self.streams.clear()
        self.pending.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = _Stream(list(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and len(stream.body) <= 1 << 20:
                    stream.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                done = self.streams.pop(event.stream_id, None)
                if done is not None:
                    self.fake._handle(self, event.stream_id, done)
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
                self.pending.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._send_pending()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.flush()
                if self.transport is not None:
                    self.transport.close()
                return
        self.flush()

    # responses

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def respond(
        self, stream_id: int, status: int, apns_id: str, body: bytes | None, retry_after: int | None
    ) -> None:
        headers = [(b":status", str(status).encode()), (b"apns-id", apns_id.encode())]
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        if body:
            headers.append((b"content-type", b"application/json; charset=utf-8"))
            headers.append((b"content-length", str(len(body)).encode()))
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not body)
            if body:
                self.pending[stream_id] = body
                self._send_pending()
        except h2.exceptions.StreamClosedError:
            self.pending.pop(stream_id, None)

    def respond_later(
        self, stream_id: int, status: int, apns_id: str, body: bytes | None, retry_after: int | None
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.respond(stream_id, status, apns_id, body, retry_after)
        self.flush()

    def _send_pending(self) -> None:
        for stream_id in list(self.pending):
            body = self.pending[stream_id]
            try:
                window = min(
                    self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
                )
                if window <= 0:
                    continue
                chunk, rest = body[:window], body[window:]
                self.h2.send_data(stream_id, chunk, end_stream=not rest)
            except (h2.exceptions.StreamClosedError, h2.exceptions.FlowControlError):
                del self.pending[stream_id]
                continue
            if rest:
                self.pending[stream_id] = rest
            else:
                del self.pending[stream_id]

    def shutdown(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        self.flush()
        self.transport.close()


class ApnsFake(Recorder[ApnsNotification, _Failure]):
    """Fake APNs on ``127.0.0.1``: HTTP/2 + TLS, provider-token auth, Apple's errors.

    Args:
        port: TCP port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        topics: allowed ``apns-topic`` values (bundle ids; ``.voip`` etc. suffixes
            for the matching push types are implied). ``None`` accepts any topic.
        cert_dir: where the CA / certificate / key PEM files live. Existing valid
            files are reused (stable :attr:`ca_file` across runs); ``None`` uses a
            temporary directory removed when the fake is garbage-collected.
        verify_signatures: ``False`` accepts a provider token signed by any key
            (its ``kid`` / ``iss`` / ``iat`` are still checked for shape and age).
        token_max_age: provider-token age (seconds since ``iat``) after which
            requests get 403 ExpiredProviderToken (Apple: 60 minutes).
        max_concurrent_streams: HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS advertised.
        connection_window: connection-level receive window opened at start (WINDOW_UPDATE
            on stream 0). With HTTP/2's default 65,535 bytes, ~400 concurrent 150-byte
            pushes exhaust it before acknowledgements arrive and aioapns fails those sends
            with FlowControlError; production servers open a larger window.
        latency: seconds to wait before each answer (simulated network/APNs time).
        max_records: keep at most this many entries in :attr:`received` /
            :attr:`attempts` (oldest dropped); counts stay exact. ``None``: keep all.
        on_request: called with every :class:`ApnsNotification` as it is answered.
    """

    host = HOST

    label = "ApnsFake"
    accepted_noun = "accepted notifications"
    attempt_noun = "requests"

    def __init__(
        self,
        *,
        port: int = 0,
        topics: Iterable[str] | None = None,
        cert_dir: str | Path | None = None,
        verify_signatures: bool = True,
        token_max_age: float = PROVIDER_TOKEN_MAX_AGE_S,
        max_concurrent_streams: int = 1000,
        connection_window: int = 16 * 1024 * 1024,
        latency: float = 0.0,
        max_records: int | None = None,
        on_request: Callable[[ApnsNotification], None] | None = None,
    ) -> None:
        self._requested_port = port
        self.topics: set[str] | None = set(topics) if topics is not None else None
        self.verify_signatures = verify_signatures
        self.token_max_age = token_max_age
        self.max_concurrent_streams = max_concurrent_streams
        self.connection_window = connection_window
        self.latency = latency
        self.max_records = max_records
        self.on_request = on_request

        self._init_recorder()
        self.unregistered: dict[str, int] = {}  # token -> timestamp (ms since the epoch)

        self._keys: dict[str, _Key] = {}
        self._auth_cache: dict[str, _Auth] = {}
        self._connections: set[_Connection] = set()
        self._next_connection_id = 0
        self._server: asyncio.Server | None = None
        self._port: int | None = None

        if cert_dir is None:
            directory = Path(tempfile.mkdtemp(prefix="tellback-apns-fake-"))
            weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        else:
            directory = Path(cert_dir)
        if not _load_cert_material(directory):
            _write_cert_material(directory)
        self.cert_dir = directory
        #: PEM file of the CA that signed the fake's certificate: trust this.
        self.ca_file = str(directory / _CA_FILE)
        self.cert_file = str(directory / _CERT_FILE)
        self.key_file = str(directory / _KEY_FILE)

    # lifecycle

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ApnsFake is not started")
        return self._port

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> ApnsFake:
        if self._server is not None:
            return self
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["h2"])
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection, HOST, self._requested_port, ssl=context, reuse_address=True
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        """Stop listening, GOAWAY and close every connection (aborted after 1 s)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.shutdown()
        if connections:
            _, still_open = await asyncio.wait([c.closed for c in connections], timeout=1.0)
            for connection in connections:
                if not connection.closed.done() and connection.transport is not None:
                    connection.transport.abort()
            if still_open:
                await asyncio.wait(still_open, timeout=1.0)
        await server.wait_closed()
        self._cancel_waiters()

    async def __aenter__(self) -> ApnsFake:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def _new_connection(self) -> _Connection:
        self._next_connection_id += 1
        return _Connection(self, self._next_connection_id)

    @property
    def connection_count(self) -> int:
        """Currently open client connections."""
        return len(self._connections)

    # credentials and state

    @staticmethod
    def generate_key() -> tuple[str, str]:
        """A new APNs-style signing key: (private PKCS#8 ``.p8`` PEM, public PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        public = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        return private, public

    @staticmethod
    def generate_key_id() -> str:
        """Ten upper-case alphanumerics, the shape of Apple's key and team ids."""
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return "".join(secrets.choice(alphabet) for _ in range(10))

    @staticmethod
    def make_token() -> str:
        """A random, well-formed device token (32 bytes, 64 hex digits)."""
        return secrets.token_hex(32)

    def add_key(self, team_id: str, key_id: str, public_key_pem: str | bytes) -> None:
        """Trust provider tokens with ``kid`` = key_id and ``iss`` = team_id.

        ``public_key_pem`` may also be the private ``.p8`` PEM (its public half is used).
        """
        self._keys[key_id] = _Key(team_id, _public_key(public_key_pem))
        self._auth_cache.clear()

    def remove_key(self, key_id: str) -> None:
        """Revoke a key: its tokens get 403 InvalidProviderToken from now on."""
        self._keys.pop(key_id, None)
        self._auth_cache.clear()

    def add_topic(self, topic: str) -> None:
        if self.topics is None:
            self.topics = set()
        self.topics.add(topic)

    def unregister(self, token: str, timestamp_ms: int | None = None) -> None:
        """Answer 410 Unregistered (with ``timestamp``, ms since the epoch) for ``token``."""
        self.unregistered[token] = timestamp_ms if timestamp_ms is not None else _now_ms()

    def reregister(self, token: str) -> None:
        self.unregistered.pop(token, None)

    # fault injection

    def fail_next(
        self,
        status: int,
        reason: str | None = None,
        count: int | None = 1,
        retry_after: int | None = None,
        token: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (for ``token`` only, if given) with an error.

        The body is ``{"reason": reason}`` (plus ``timestamp`` for 410), ``retry-after``
        is sent when given. ``count=None`` keeps failing until :meth:`clear_failures`.
        Injected answers take precedence over every check; they are recorded in
        :attr:`attempts`.
        """
        if reason is None:
            if status not in DEFAULT_REASONS:
                raise ValueError(f"no default APNs reason for status {status}; pass one")
            reason = DEFAULT_REASONS[status]
        self._add_failure(_Failure(status, reason, count, retry_after, token, "body"))

    def fail_next_without_body(
        self, status: int = 500, count: int | None = 1, token: str | None = None
    ) -> None:
        """Answer with ``status`` and ``apns-id`` but NO body (aioapns then never resolves)."""
        self._add_failure(_Failure(status, None, count, None, token, "no-body"))

    def hang_next(self, count: int | None = 1, token: str | None = None) -> None:
        """Never answer the next ``count`` requests (the stream stays open)."""
        self._add_failure(_Failure(0, None, count, None, token, "hang"))

    def accept_then_hang(self, count: int | None = 1, token: str | None = None) -> None:
        """Accept the next ``count`` requests (checked as usual; a valid one is in
        :attr:`received`: it reached the phone) and never answer them: the sender cannot
        tell it arrived, the window in which at-least-once delivery sends twice."""
        self._add_failure(_Failure(0, None, count, None, token, "accept-hang"))

    def reset(self) -> None:
        """Forget records, failures and unregistered tokens (keys and topics stay)."""
        self._reset_records()
        self.unregistered.clear()

    def _describe(self, record: ApnsNotification) -> str:
        return f"{record.status} {record.reason}"

    # client helpers (aioapns)

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this fake's CA, offering ALPN h2."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.set_alpn_protocols(["h2"])
        return context

    def client_protocol_class(
        self, base: type[APNsTLSClientProtocol] | None = None
    ) -> type[APNsTLSClientProtocol]:
        """An aioapns protocol class whose ``APNS_SERVER``/``APNS_PORT`` are this fake."""
        if base is None:
            base = APNsProductionClientProtocol
        return type(
            "ApnsFakeClientProtocol", (base,), {"APNS_SERVER": HOST, "APNS_PORT": self.port}
        )

    def configure_client(self, client: APNs) -> None:
        """Point an ``aioapns.APNs`` client at this fake (its pool's protocol class)."""
        client.pool.protocol_class = self.client_protocol_class(client.pool.protocol_class)

    # request handling (called by _Connection on StreamEnded)

    def _handle(self, connection: _Connection, stream_id: int, stream: _Stream) -> None:
        received_at = time.monotonic()
        received_wall = time.time()
        raw = stream.headers
        headers = {k.decode("ascii", "replace"): v.decode("utf-8", "replace") for k, v in raw}
        path = headers.get(":path", "")
        token = path[len(_DEVICE_PREFIX) :] if path.startswith(_DEVICE_PREFIX) else ""
        body = bytes(stream.body)
        apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()

        status: int
        reason: str | None
        retry_after: int | None = None
        timestamp: int | None = None
        send_body = True
        team_id: str | None = None
        key_id: str | None = None
        payload: Any = None

        failure = self._take_failure(token) if self._failures else None
        if failure is not None and failure.mode != "accept-hang":
            status, reason, retry_after = failure.status, failure.reason, failure.retry_after
            send_body = failure.mode == "body"
            if status == 410 and send_body:
                timestamp = self.unregistered.get(token, _now_ms())
            payload = _parse_json(body)
        else:
            auth = self._check_auth(headers.get("authorization"), received_wall)
            team_id, key_id = auth.team_id, auth.key_id
            payload = _parse_json(body)
            status, reason = self._validate(raw, headers, path, token, body, payload, auth)
            if status == 200 and token in self.unregistered:
                status, reason, timestamp = 410, "Unregistered", self.unregistered[token]

        record = ApnsNotification(
            token=token,
            headers=headers,
            payload=payload,
            body=body,
            apns_id=apns_id,
            status=status,
            reason=reason,
            team_id=team_id,
            key_id=key_id,
            received_at=received_at,
            received_wall=received_wall,
            connection_id=connection.connection_id,
            stream_id=stream_id,
        )
        self._record(record, record.accepted)

        if failure is not None and failure.mode in {"hang", "accept-hang"}:
            return
        response: bytes | None = None
        if send_body and status != 200:
            error: dict[str, Any] = {"reason": reason}
            if timestamp is not None:
                error["timestamp"] = timestamp
            response = json.dumps(error, separators=(",", ":")).encode()
        if self.latency > 0:
            asyncio.get_running_loop().call_later(
                self.latency,
                connection.respond_later,
                stream_id,
                status,
                apns_id,
                response,
                retry_after,
            )
        else:
            connection.respond(stream_id, status, apns_id, response, retry_after)

    def _validate(  # noqa: PLR0912 (one branch per Apple reason, in Apple's order)
        self,
        raw: list[tuple[bytes, bytes]],
        headers: dict[str, str],
        path: str,
        token: str,
        body: bytes,
        payload: Any,
        auth: _Auth,
    ) -> tuple[int, str | None]:
        if headers.get(":method") != "POST":
            return 405, "MethodNotAllowed"
        if not path.startswith(_DEVICE_PREFIX):
            return 404, "BadPath"
        if not token:
            return 400, "MissingDeviceToken"
        if len(headers) != len(raw):
            return 400, "DuplicateHeaders"
        if auth.reason is not None:
            return 403, auth.reason
        apns_id = headers.get("apns-id")
        if apns_id is not None and not _UUID_RE.fullmatch(apns_id):
            return 400, "BadMessageId"
        topic = headers.get("apns-topic")
        if not topic:
            return 400, "MissingTopic"
        if not _TOPIC_RE.fullmatch(topic):
            return 400, "BadTopic"
        push_type = headers.get("apns-push-type")
        if push_type is not None and push_type not in PUSH_TYPES:
            return 400, "InvalidPushType"
        priority = headers.get("apns-priority")
        if priority is not None and priority not in {"1", "5", "10"}:
            return 400, "BadPriority"
        expiration = headers.get("apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return 400, "BadExpirationDate"
        collapse_id = headers.get("apns-collapse-id")
        if collapse_id is not None and len(collapse_id.encode()) > MAX_COLLAPSE_ID_BYTES:
            return 400, "BadCollapseId"
        if len(token) < 64 or len(token) > 200 or not _HEX.issuperset(token):
            return 400, "BadDeviceToken"
        if not body:
            return 400, "PayloadEmpty"
        limit = MAX_VOIP_PAYLOAD_BYTES if push_type == "voip" else MAX_PAYLOAD_BYTES
        if len(body) > limit:
            return 413, "PayloadTooLarge"
        if not isinstance(payload, dict):
            # Apple documents no reason for a body that is not a JSON object; the fake's choice.
            return 400, "BadPayload"
        if not self._topic_allowed(topic, push_type):
            return 400, "DeviceTokenNotForTopic"
        return 200, None

    def _topic_allowed(self, topic: str, push_type: str | None) -> bool:
        suffix = TOPIC_SUFFIXES.get(push_type or "")
        if suffix is not None:
            if not topic.endswith(suffix):
                return False
            return self.topics is None or topic[: -len(suffix)] in self.topics
        return self.topics is None or topic in self.topics

    def _check_auth(self, authorization: str | None, now: float) -> _Auth:
        if not authorization:
            return _Auth("MissingProviderToken")
        auth = self._auth_cache.get(authorization)
        if auth is None:
            auth = self._verify_provider_token(authorization, now)
            if len(self._auth_cache) >= 4096:
                self._auth_cache.clear()
            self._auth_cache[authorization] = auth
        if auth.reason is None and now - auth.iat > self.token_max_age:
            return _Auth("ExpiredProviderToken", auth.team_id, auth.key_id, auth.iat)
        return auth

    def _verify_provider_token(self, authorization: str, now: float) -> _Auth:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _Auth("InvalidProviderToken")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return _Auth("InvalidProviderToken")
        key_id = header.get("kid")
        if header.get("alg") != "ES256" or not isinstance(key_id, str):
            return _Auth("InvalidProviderToken")
        key = self._keys.get(key_id)
        try:
            if key is not None:
                claims = jwt.decode(
                    token,
                    key.public_key,
                    algorithms=["ES256"],
                    options={
                        "verify_iat": False,
                        "verify_exp": False,
                        "verify_nbf": False,
                        "require": ["iss", "iat"],
                    },
                )
            elif not self.verify_signatures:
                claims = jwt.decode(
                    token, options={"verify_signature": False, "require": ["iss", "iat"]}
                )
            else:
                return _Auth("InvalidProviderToken", key_id=key_id)
        except jwt.InvalidTokenError:
            return _Auth("InvalidProviderToken", key_id=key_id)
        team_id, iat = claims.get("iss"), claims.get("iat")
        if not isinstance(team_id, str) or not isinstance(iat, int | float):
            return _Auth("InvalidProviderToken", key_id=key_id)
        if key is not None and key.team_id != team_id:
            return _Auth("InvalidProviderToken", team_id, key_id)
        if iat > now + PROVIDER_TOKEN_FUTURE_SKEW_S:
            return _Auth("InvalidProviderToken", team_id, key_id)
        return _Auth(None, team_id, key_id, float(iat))


def _parse_json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _now_ms() -> int:
    return int(time.time() * 1000)
