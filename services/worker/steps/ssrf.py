"""The SSRF guard for `http` steps: which URLs and addresses a step may reach.

A workflow author (or, through `input:`, a trigger event) chooses the URL, and
the worker sits inside the network, so by default an `http` step may only
reach public addresses:

* the scheme is `http` or `https`;
* the host is resolved (without blocking the loop) and refused if ANY address
  is loopback, private, link-local, multicast, reserved, unspecified, not
  globally routable (CGNAT, documentation ranges, ...) or a cloud metadata
  address; IPv4 addresses embedded in IPv6 (`::ffff:a.b.c.d`, 6to4, NAT64,
  Teredo) are judged by the IPv4 address they carry;
* `HttpPolicy.allow_private` turns the address check off, and hosts in
  `HttpPolicy.allowed_hosts` (the `WEFT_HTTP_ALLOWED_HOSTS` setting) are exempt
  by *name* (an allowed `127.0.0.1` does not allow `localhost`); an entry with
  a port (`billing.internal:8443`, `[fd00::1]:80`) exempts that port only.

DNS rebinding: `check_url` runs before each request (and each redirect hop)
for a clear early refusal, and `GuardedNetworkBackend` resolves and checks
again at connect time and then connects to exactly the address it checked.
The URL, and so the Host header, SNI and certificate check, keep the original
host name. There is no window between "checked" and "connected to".
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from weft.steps import NonRetryableError, RetryableError

__all__ = [
    "HttpPolicy",
    "SsrfBlocked",
    "HostResolutionError",
    "Resolver",
    "system_resolver",
    "address_problem",
    "check_url",
    "parse_url",
    "AddressGuard",
    "GuardedNetworkBackend",
    "GuardedTransport",
    "METADATA_ADDRESSES",
    "safe_url",
    "parse_allowed_hosts",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

ALLOWED_SCHEMES = frozenset({"http", "https"})

# Instance metadata / platform endpoints that hand out credentials.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer (a public-looking address)
    )
)

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
# Letters, digits, '.', '-', '_' for names; ':' only inside IPv6 literals. No
# zone ids ('%'), no percent-escapes, no spaces: nothing getaddrinfo might
# read differently from us.
_HOST_CHARS = re.compile(r"^[A-Za-z0-9._:-]+$")


@dataclass(frozen=True)
class HttpPolicy:
    allow_private: bool = False  # allow loopback/private/link-local targets
    allowed_hosts: frozenset[str] = frozenset()  # names (or IPs, or host:port) exempt from the address check
    max_redirects: int = 5
    timeout: float = 30.0
    max_response_bytes: int = 10 * 1024 * 1024

    def __post_init__(self) -> None:
        if isinstance(self.allowed_hosts, str):
            raise TypeError("HttpPolicy.allowed_hosts must be a collection of host names, not a string")
        object.__setattr__(self, "allowed_hosts", frozenset(parse_allowed_hosts(self.allowed_hosts)))
        if self.max_redirects < 0:
            raise ValueError("HttpPolicy.max_redirects must be >= 0")
        if not self.timeout > 0:
            raise ValueError("HttpPolicy.timeout must be > 0")
        if self.max_response_bytes <= 0:
            raise ValueError("HttpPolicy.max_response_bytes must be > 0")


class SsrfBlocked(NonRetryableError):
    """An `http` step tried to reach a URL or address the policy forbids."""

    def __init__(self, host: str, reason: str, *, url: str = ""):
        target = f"host {host!r}" if host else f"URL {url!r}"
        super().__init__(f"http step: refused to connect to {target}: {reason}")
        self.host = host
        self.reason = reason
        self.url = url


class HostResolutionError(RetryableError):
    """The host name did not resolve (DNS can recover, so this is retryable)."""

    def __init__(self, host: str, reason: str):
        super().__init__(f"http step: cannot resolve host {host!r}: {reason}")
        self.host = host
        self.reason = reason


def _normalise_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _split_entry(entry: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]:port' or a bare IPv6 literal -> (normalised host, port or None)."""
    text = entry.strip()
    port: str | None = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{entry!r} is not host, host:port or [ipv6]:port")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    host = _normalise_host(host)
    if not host or not _HOST_CHARS.match(host):
        raise ValueError(f"{entry!r} is not a host name or IP address")
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r} has a bad port (1-65535)")
    return host, int(port)


def _entry_key(host: str, port: int | None) -> str:
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_allowed_hosts(value: str | Any) -> tuple[str, ...]:
    """'a.internal, b:8443' (or a collection) -> normalised entries; ValueError names a bad one."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not str(item).strip():
            continue
        key = _entry_key(*_split_entry(str(item)))
        if key not in out:
            out.append(key)
    return tuple(out)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip.teredo is not None:
        return "Teredo", ip.teredo[1]
    for net in _NAT64:
        if ip in net:
            return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_problem(address: str | IPAddress) -> str | None:
    """Why this address may not be reached under the default policy, or None if it may."""
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return f"{ip} carries a zone id"
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            form, v4 = embedded
            inner = address_problem(v4)
            return f"{ip} embeds {v4} ({form}), which {inner.split(' ', 1)[1]}" if inner else None
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    for attr, what in (
        ("is_unspecified", "an unspecified"),
        ("is_loopback", "a loopback"),
        ("is_link_local", "a link-local"),
        ("is_multicast", "a multicast"),
        ("is_reserved", "a reserved"),
        ("is_private", "a private"),
    ):
        if getattr(ip, attr):
            return f"{ip} is {what} address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return f"{ip} is a site-local address"
    if not ip.is_global:
        return f"{ip} is not a globally routable address"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, via the loop's (threaded) getaddrinfo."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise HostResolutionError(host, str(exc)) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class AddressGuard:
    """Applies an HttpPolicy: URL checks before a request, address checks at connect."""

    def __init__(self, policy: HttpPolicy, resolver: Resolver | None = None):
        self.policy = policy
        self.resolver: Resolver = resolver or system_resolver

    def exempt(self, host: str, port: int | None = None) -> bool:
        if self.policy.allow_private:
            return True
        name = _normalise_host(host)
        allowed = self.policy.allowed_hosts
        return name in allowed or (port is not None and _entry_key(name, port) in allowed)

    async def resolve(self, host: str, port: int) -> list[str]:
        """Resolve `host` and return its addresses, refusing it if any address is forbidden."""
        if not host or not _HOST_CHARS.match(host):
            raise SsrfBlocked(host, "not a valid host name or IP address")
        literal = _normalise_host(host)
        try:
            addresses = [str(ipaddress.ip_address(literal))]
        except ValueError:
            addresses = await self.resolver(host, port)
        if not addresses:
            raise HostResolutionError(host, "no addresses")
        if not self.exempt(host, port):
            for address in addresses:
                problem = address_problem(address)
                if problem:
                    raise SsrfBlocked(host, problem)
        return addresses

    async def check_url(self, url: str | httpx.URL) -> list[str]:
        """Refuse `url` unless its scheme and every address of its host are allowed.

        Returns the addresses the host resolved to (empty for exempt hosts,
        which are not resolved here).
        """
        parsed = parse_url(url)
        if parsed.scheme not in ALLOWED_SCHEMES:
            raise SsrfBlocked(
                "", f"scheme {parsed.scheme!r} is not allowed (only http and https)", url=safe_url(parsed)
            )
        try:
            host = parsed.raw_host.decode("ascii")
        except UnicodeDecodeError:
            raise SsrfBlocked("", "host is not ASCII after IDNA encoding", url=safe_url(parsed)) from None
        if not host:
            raise SsrfBlocked("", "URL has no host", url=safe_url(parsed))
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if self.exempt(host, port):
            return []
        return await self.resolve(host, port)


def parse_url(url: str | httpx.URL, params: Any = None) -> httpx.URL:
    """httpx's reading of `url` (the one the request will use), or SsrfBlocked if it has none."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        return parsed.copy_merge_params(params) if params else parsed
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise SsrfBlocked("", f"not a valid URL ({exc})", url=str(url)) from None


async def check_url(
    url: str | httpx.URL, policy: HttpPolicy | None = None, *, resolver: Resolver | None = None
) -> list[str]:
    """`AddressGuard(policy, resolver).check_url(url)`: raise SsrfBlocked or return the addresses."""
    return await AddressGuard(policy or HttpPolicy(), resolver).check_url(url)


def safe_url(url: httpx.URL) -> str:
    """The URL without credentials or query string, fit for an error message."""
    try:
        return str(url.copy_with(username=None, password=None, query=None, fragment=None))
    except Exception:  # a URL odd enough to fail here is still worth naming by scheme
        return f"{url.scheme}://..."


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Resolves and checks at connect time, then connects to the checked address.

    httpcore hands us the URL's host; we resolve it ourselves, refuse it if any
    address is forbidden, and open the TCP connection to the address itself.
    TLS (SNI and certificate verification) still uses the host name, because
    httpcore calls `start_tls(server_hostname=<url host>)` on our stream.
    """

    def __init__(self, guard: AddressGuard, inner: httpcore.AsyncNetworkBackend | None = None):
        self._guard = guard
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._guard.resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise SsrfBlocked("", "unix sockets are not allowed", url=path)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, with its connection pool built on GuardedNetworkBackend.

    httpx has no public knob for the network backend, so we replace the pool it
    builds. No proxies (`trust_env=False`): a proxy would make the connection,
    and the check, somewhere else.
    """

    def __init__(self, guard: AddressGuard, *, ssl_context: ssl.SSLContext | None = None):
        ctx = ssl_context or default_ssl_context()
        super().__init__(verify=ctx, trust_env=False)
        if not hasattr(self, "_pool"):  # pragma: no cover - a future httpx changed its insides
            raise RuntimeError("httpx.AsyncHTTPTransport has no _pool: the SSRF guard cannot be installed")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ctx,
            max_connections=10,
            max_keepalive_connections=10,
            network_backend=GuardedNetworkBackend(guard),
        )


_SSL_CONTEXT: list[ssl.SSLContext] = []


def default_ssl_context() -> ssl.SSLContext:
    """One verifying context per process: loading the CA bundle costs milliseconds."""
    if not _SSL_CONTEXT:
        _SSL_CONTEXT.append(httpx.create_ssl_context())
    return _SSL_CONTEXT[0]
