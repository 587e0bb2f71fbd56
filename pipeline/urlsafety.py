"""Which hosts the download stage may fetch: not loopback, private, link-local, cloud-metadata or other
special addresses unless the config allows their network (`download.allow_networks`).

The check runs before any connection, on every request img2dataset makes (redirects included): the
target host is resolved and every address it resolves to must be allowed; the connection then checks
the host again right before connecting. A name that resolves differently between that check and the
connect (DNS rebinding within milliseconds) is not covered: put the crawler behind an egress firewall
for that.

The same connections also bound the whole response in time: headers and body must arrive within the
request's timeout, so a server that sends its body one byte at a time (each read within the timeout)
cannot hold a download thread for ever.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import time
import urllib.parse
import urllib.request

# Cloud metadata services (AWS/GCP/Azure/OpenStack, AWS IPv6, Alibaba, Oracle).
METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200",
                                                "192.0.0.192")}


class BlockedAddress(ValueError):
    """Raised instead of connecting; img2dataset records its text, which starts with 'blocked'."""


def address_problem(ip: str, allow: tuple = ()) -> str | None:
    """Why an address may not be fetched (None: it may)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if any(addr in ipaddress.ip_network(n, strict=False) for n in allow):
        return None
    if addr in METADATA:
        return "cloud metadata service"
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(addr, f"is_{kind}"):
            return kind.replace("_", "-")
    if addr in ipaddress.ip_network("100.64.0.0/10"):
        return "shared (carrier-grade NAT)"
    return None


def check_host(host: str, port: int | None, allow: tuple = ()) -> None:
    """Resolve host; raise BlockedAddress if any address it resolves to is not allowed."""
    try:
        infos = socket.getaddrinfo(host, port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return  # unresolvable: the connection fails on its own (connection_error)
    for info in infos:
        ip = info[4][0]
        why = address_problem(ip, allow)
        if why:
            raise BlockedAddress(f"blocked: {host} resolves to {ip} ({why}); "
                                 f"allow its network in download.allow_networks to fetch it")


class _DeadlineReader(io.RawIOBase):
    """A response's socket reads, each waiting at most until the response's deadline."""

    def __init__(self, raw, sock, deadline: float, timeout: float):
        super().__init__()
        self.raw, self.sock, self.deadline, self.timeout = raw, sock, deadline, timeout

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out: the response took longer than {self.timeout:g} s")
        self.sock.settimeout(min(left, self.timeout))
        return self.raw.readinto(b)

    def close(self) -> None:
        self.raw.close()
        super().close()


class DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, deadline: float, timeout: float, **kw):
        super().__init__(sock, *args, **kw)
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline, timeout))


def _guarded(base):
    class Guarded(base):
        allow: tuple = ()

        def connect(self):
            if not getattr(self, "_tunnel_host", None):  # through a proxy the target was checked in *_open
                check_host(self.host, self.port, self.allow)
            super().connect()
            if isinstance(self.timeout, (int, float)):  # the whole response within the timeout
                self.response_class = functools.partial(DeadlineResponse, deadline=time.monotonic() + self.timeout,
                                                        timeout=self.timeout)
    return Guarded


GuardedHTTPConnection = _guarded(http.client.HTTPConnection)
GuardedHTTPSConnection = _guarded(http.client.HTTPSConnection)


class _Guard:
    """Checks the target host of every request (redirects are new requests) before opening it."""

    def __init__(self, allow: tuple):
        super().__init__()
        self.allow = allow

    def _open(self, req, base, **kw):
        check_host(urllib.parse.urlsplit(req.full_url).hostname or "", None, self.allow)
        return self.do_open(type("Conn", (base,), {"allow": self.allow}), req, **kw)


class GuardedHTTPHandler(_Guard, urllib.request.HTTPHandler):
    def http_open(self, req):
        return self._open(req, GuardedHTTPConnection)


class GuardedHTTPSHandler(_Guard, urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self._open(req, GuardedHTTPSConnection, context=self._context)


def install(allow: tuple) -> None:
    """Make urllib (which img2dataset fetches with) check every request of this process."""
    urllib.request.install_opener(urllib.request.build_opener(GuardedHTTPHandler(allow), GuardedHTTPSHandler(allow)))
