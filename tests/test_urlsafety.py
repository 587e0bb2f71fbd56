import pytest

from pipeline.config import ConfigError, load_config
from pipeline.urlsafety import BlockedAddress, address_problem, checked_addresses

from conftest import demo_config


@pytest.mark.parametrize("ip,why", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.9", "private"), ("192.168.1.1", "private"), ("fd12::1", "private"),
    ("169.254.169.254", "cloud metadata service"), ("fd00:ec2::254", "cloud metadata service"),
    ("100.100.100.200", "cloud metadata service"), ("169.254.10.1", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("100.64.1.1", "shared (carrier-grade NAT)"),
    ("93.184.216.34", None), ("2606:4700::1111", None),
])
def test_decisions_before_any_connection(ip, why):
    assert address_problem(ip) == why


def test_allowed_networks_and_names():
    assert address_problem("127.0.0.5", ("127.0.0.0/8",)) is None
    assert address_problem("127.0.0.5", ("127.0.0.1/32",)) == "loopback"
    assert address_problem("169.254.169.254", ("10.0.0.0/8",)) == "cloud metadata service"
    with pytest.raises(BlockedAddress, match=r"^blocked: localhost resolves to .* \(loopback\)"):
        checked_addresses("localhost", 80)
    checked_addresses("localhost", 80, ("127.0.0.0/8", "::1/128"))


def test_config_requires_the_loopback_opt_in_for_local_servers(tmp_path):
    cfg = demo_config(tmp_path / "run")
    cfg["download"].pop("allow_networks")
    with pytest.raises(ConfigError, match="opt in with download.allow_networks"):
        load_config(data=cfg)
    cfg["download"]["allow_networks"] = ["not-a-net"]
    with pytest.raises(ConfigError, match="'not-a-net' is not a network"):
        load_config(data=cfg)


def test_installed_opener_refuses_http_and_https_before_connecting(monkeypatch):
    import socket
    import urllib.request

    from pipeline.urlsafety import install

    def no_connect(*a, **k):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    old = urllib.request._opener
    try:
        install(())
        for url in ("http://169.254.169.254/latest/meta-data/", "https://127.0.0.1:8443/x.jpg", "http://[::1]/x",
                    "ftp://127.0.0.1/x.jpg", "file:///etc/hostname"):
            with pytest.raises(BlockedAddress, match="^blocked: "):
                urllib.request.urlopen(url, timeout=1)
    finally:
        urllib.request.install_opener(old)


def test_host_resolved_once_and_connected_by_its_checked_address(tmp_path, monkeypatch):
    """DNS rebinding: a name that resolves to an allowed address for the check and to the metadata service
    afterwards is fetched from the checked address; the name is resolved once per connection."""
    import socket
    import urllib.request

    from pipeline.urlsafety import install
    from workflows.serve import serve_folder

    (tmp_path / "x.jpg").write_bytes(b"checked")
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.create_connection
    lookups = []

    def rebinding(host, port, *a, **k):
        if host != "rebind.test":
            return real_getaddrinfo(host, port, *a, **k)
        lookups.append(host)
        ip = "127.0.0.1" if len(lookups) == 1 else "169.254.169.254"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))]

    def loopback_only(address, *a, **k):  # never let a connection leave loopback, even if the guard regressed
        assert address[0] == "127.0.0.1", f"connection attempted to {address}"
        return real_connect(address, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(socket, "create_connection", loopback_only)
    old = urllib.request._opener
    try:
        install(("127.0.0.1/32",))
        with serve_folder(str(tmp_path)) as base:
            port = base.rsplit(":", 1)[1].strip("/")
            assert urllib.request.urlopen(f"http://rebind.test:{port}/x.jpg", timeout=5).read() == b"checked"
            assert lookups == ["rebind.test"]
            with pytest.raises(BlockedAddress, match=r"^blocked: rebind.test resolves to 169.254.169.254"):
                urllib.request.urlopen(f"http://rebind.test:{port}/x.jpg", timeout=5)
    finally:
        urllib.request.install_opener(old)


def test_through_a_proxy_the_target_is_checked_as_the_proxy_gets_it_and_the_proxy_is_not(monkeypatch):
    """A proxy on a network the config does not allow still carries allowed targets; a target the proxy would
    reach at a blocked address is refused before any connection, also percent-encoded or unresolvable here."""
    import socket
    import urllib.request

    from http_helpers import QuietHandler
    from pipeline.urlsafety import install
    from workflows.serve import serve

    class Proxy(QuietHandler):
        def do_GET(self):  # noqa: N802
            self._send(200, b"via proxy " + self.path.encode(), "text/plain")

    real_connect = socket.create_connection
    connected = []

    def loopback_only(address, *a, **k):
        assert address[0] == "127.0.0.1", f"connection attempted to {address}"
        connected.append(address)
        return real_connect(address, *a, **k)

    real_getaddrinfo = socket.getaddrinfo

    def no_dns(host, *a, **k):  # a name only the proxy's DNS knows, without asking any DNS server
        if host == "internal.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *a, **k)

    monkeypatch.setattr(socket, "create_connection", loopback_only)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    old = urllib.request._opener
    try:
        with serve(Proxy) as proxy:
            monkeypatch.setenv("http_proxy", proxy)
            monkeypatch.delenv("no_proxy", raising=False)
            monkeypatch.delenv("NO_PROXY", raising=False)
            install(("127.0.0.2/32",))  # the target's address only: the proxy (127.0.0.1) is not allowed
            body = urllib.request.urlopen("http://127.0.0.2:9/x.jpg", timeout=5).read()
            assert body == b"via proxy http://127.0.0.2:9/x.jpg" and len(connected) == 1
            for url, why in (("http://%31%36%39.254.169.254/latest/", "cloud metadata"),
                             ("http://127.0.0.3/x.jpg", "loopback"),
                             ("http://internal.example/x.jpg", "does not resolve here")):
                with pytest.raises(BlockedAddress, match=f"^blocked: .*{why}"):
                    urllib.request.urlopen(url, timeout=5)
            assert len(connected) == 1
    finally:
        urllib.request.install_opener(old)
