"""mitmproxy addon for bench/bench.py: the work keygate's "bench" secret does.

Requests to inject_host with a path under /v1/ get
`Authorization: Bearer <inject_secret>` (replacing the agent's placeholder),
and connections to inject_resolve's host:port go to its ip:port instead
(keygate's --resolve), keeping the hostname for SNI and certificate checks.

    mitmdump -s bench/mitm_inject.py --set inject_host=api.bench.test \
        --set inject_secret=sk-... --set inject_resolve=api.bench.test:443=127.0.0.1:8443
"""

from mitmproxy import ctx, http
from mitmproxy.proxy import server_hooks


class Inject:
    def load(self, loader):
        loader.add_option("inject_host", str, "", "host whose /v1/* requests get the key")
        loader.add_option("inject_secret", str, "", "the key (Authorization: Bearer)")
        loader.add_option("inject_resolve", str, "", "host:port=ip:port to connect to instead")

    def server_connect(self, data: server_hooks.ServerConnectionHookData):
        if not ctx.options.inject_resolve:
            return
        name, addr = ctx.options.inject_resolve.split("=", 1)
        host, port = name.rsplit(":", 1)
        if data.server.address == (host, int(port)):
            ip, ip_port = addr.rsplit(":", 1)
            data.server.address = (ip, int(ip_port))
            data.server.sni = data.server.sni or host

    def requestheaders(self, flow: http.HTTPFlow):
        req = flow.request
        if req.pretty_host == ctx.options.inject_host and req.path.startswith("/v1/"):
            req.headers["authorization"] = f"Bearer {ctx.options.inject_secret}"


addons = [Inject()]
