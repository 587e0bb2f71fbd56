"""Which hosts the download stage may fetch: not loopback, private, link-local, cloud-metadata or other
special addresses unless the config allows their network (`download.allow_networks`).

The check runs before any connection, on every connection img2dataset's requests open (redirects
included): the host is resolved once, every address it resolves to must be allowed, and the socket is then
connected to those checked addresses (not to the name again), so a name that resolves differently a moment
later (DNS rebinding) cannot slip through. Through a proxy the connection goes to the proxy, and the target
host is checked by name before the request instead (a name that does not resolve here is blocked). ftp:// and
file:// URLs are never fetched, also after a redirect.

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


CGNAT = ipaddress.ip_network("100.64.0.0/10")


@functools.lru_cache(maxsize=64)
def _networks(allow: tuple) -> tuple:
    return tuple(ipaddress.ip_network(n, strict=False) for n in allow)


def address_problem(ip: str, allow: tuple = ()) -> str | None:
    """Why an address may not be fetched (None: it may)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if any(addr in n for n in _networks(tuple(allow))):
        return None
    if addr in METADATA:
        return "cloud metadata service"
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(addr, f"is_{kind}"):
            return kind.replace("_", "-")
    if addr in CGNAT:
        return "shared (carrier-grade NAT)"
    return None


def checked_addresses(host: str, port: int | None, allow: tuple = ()) -> list[tuple]:
    """Resolve host once: its socket addresses, or BlockedAddress if any of them is not allowed."""
    infos = socket.getaddrinfo(host, port or 80, proto=socket.IPPROTO_TCP)
    for info in infos:
        ip = info[4][0]
        why = address_problem(ip, allow)
        if why:
            raise BlockedAddress(f"blocked: {host} resolves to {ip} ({why}); "
                                 f"allow its network in download.allow_networks to fetch it")
    return [info[4] for info in infos]


def _connect_checked(allow: tuple, address: tuple, timeout, source_address=None):
    """socket.create_connection, to the addresses the host was checked for."""
    error = OSError(f"{address[0]} resolves to no address")
    for sockaddr in checked_addresses(address[0], address[1], allow):
        try:
            return socket.create_connection(sockaddr[:2], timeout, source_address)
        except OSError as e:
            error = e
    raise error


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


def _guarded(base, allow: tuple | None):
    """A connection class whose socket goes only to checked addresses (allow None: no check, the connection
    goes to a proxy); either way the whole response must arrive within the timeout."""
    class Guarded(base):
        def connect(self):
            if allow is not None:
                self._create_connection = functools.partial(_connect_checked, allow)
            super().connect()
            if isinstance(self.timeout, (int, float)):  # the whole response within the timeout
                self.response_class = functools.partial(DeadlineResponse, deadline=time.monotonic() + self.timeout,
                                                        timeout=self.timeout)
    return Guarded


class _Guard:
    """Opens every request (redirects are new requests) on a connection that checks its host. Through a proxy
    (the connection goes to the proxy, which resolves the target itself) the target host is checked by name
    first, as the proxy will get it, and a name that does not resolve here is blocked."""

    def __init__(self, allow: tuple):
        super().__init__()
        self.allow = allow
        self.conn = {(base, proxied): _guarded(base, None if proxied else allow)
                     for base in (http.client.HTTPConnection, http.client.HTTPSConnection) for proxied in (False, True)}

    def _open(self, req, base, **kw):
        proxied = req.has_proxy() or bool(getattr(req, "_tunnel_host", None))
        if proxied:
            host = urllib.parse.unquote(urllib.parse.urlsplit(req.full_url).hostname or "")
            try:
                checked_addresses(host, None, self.allow)
            except socket.gaierror:
                raise BlockedAddress(f"blocked: {host} does not resolve here, so it cannot be checked before "
                                     "the proxy fetches it") from None
        return self.do_open(self.conn[base, proxied], req, **kw)


class GuardedHTTPHandler(_Guard, urllib.request.HTTPHandler):
    def http_open(self, req):
        return self._open(req, http.client.HTTPConnection)


class GuardedHTTPSHandler(_Guard, urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self._open(req, http.client.HTTPSConnection, context=self._context)


class NoFTP(urllib.request.FTPHandler):
    """ftp:// is never fetched (urllib follows redirects to it, and ftplib connects unchecked)."""

    def ftp_open(self, req):
        raise BlockedAddress(f"blocked: {req.full_url} is an ftp:// URL; only http(s) is fetched")


class NoFile(urllib.request.FileHandler):
    """file:// is never read (a URL list could name files of the worker's disk)."""

    def file_open(self, req):
        raise BlockedAddress(f"blocked: {req.full_url} is a file:// URL; only http(s) is fetched")


def install(allow: tuple) -> None:
    """Make urllib (which img2dataset fetches with) check every request of this process."""
    urllib.request.install_opener(urllib.request.build_opener(GuardedHTTPHandler(allow), GuardedHTTPSHandler(allow),
                                                              NoFTP(), NoFile()))
