"""Local fakes of external services for tests, benchmarks and `tellback dev push-sink`.

* :class:`ApnsFake` -- Apple's APNs provider API (HTTP/2 + TLS, provider-token auth).
* :class:`FcmFake` -- Google's FCM HTTP v1 API and its OAuth 2.0 token endpoint.

Both bind 127.0.0.1 only, start/stop inside a running event loop (``async with``),
record what they receive and can be told to fail. Nothing here is used by the
server at runtime.
"""

from tellback_server.dev.apns_fake import ApnsFake, ApnsNotification
from tellback_server.dev.fcm_fake import FcmFake, FcmMessage

__all__ = ["ApnsFake", "ApnsNotification", "FcmFake", "FcmMessage"]
