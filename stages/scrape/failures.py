"""Why a request failed, as the reason key of its error record (`http_404`, `timeout`, `robots_disallowed`, ...)."""

from __future__ import annotations

from scrapy import Request
from scrapy.exceptions import IgnoreRequest
from scrapy.spidermiddlewares.httperror import HttpError
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TCPTimedOutError
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.python.failure import Failure

# failures of a followed (non-paper) link that say only "nothing here": counted, not recorded as errors
QUIET_LINK_FAILURES = ("http_404", "http_410", "robots_disallowed", "offsite", "offsite_redirect")


def failure_reason(failure: Failure) -> tuple[str, str]:
    """(reason key, detail) for a failed request."""
    exc = failure.value
    request = getattr(failure, "request", None)
    if isinstance(exc, HttpError):
        return f"http_{exc.response.status}", f"HTTP {exc.response.status}"
    if isinstance(exc, IgnoreRequest):
        msg = str(exc)
        if msg.startswith("Offsite redirect"):
            return "offsite_redirect", msg
        if msg.startswith("Page cap reached"):
            return "page_cap", msg
        if "robots.txt" in msg:
            return "robots_disallowed", msg
        if "offsite" in msg.lower():
            redirected = bool(request is not None and request.meta.get("redirect_urls"))
            return ("offsite_redirect" if redirected else "offsite"), f"{msg} ({request.url if request else ''})"
        return "ignored", msg
    name = type(exc).__name__  # scrapy >= 2.14 wraps Twisted's errors in its own Download*Error classes
    if isinstance(exc, (TxTimeoutError, TCPTimedOutError)) or "Timeout" in name or name == "TimeoutError":
        return "timeout", f"{name}: {exc}"
    if isinstance(exc, DNSLookupError) or name == "CannotResolveHostError":
        return "dns_error", f"{name}: {exc}"
    if isinstance(exc, ConnectionRefusedError) or name == "DownloadConnectionRefusedError":
        return "connection_refused", f"{name}: {exc}"
    if name == "ResponseDataLossError":
        return "data_loss", f"{name}: {exc}"
    return "download_error", f"{type(exc).__name__}: {exc}"


def original_url(request: Request) -> str:
    return (request.meta.get("redirect_urls") or [request.url])[0]
