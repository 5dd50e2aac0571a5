"""An HTTP/2 client on python-hyper's `h2`, for the protocol cases of tests/tests/h2_protocol.rs.

Each case talks h2c to the proxy at HOST:PORT over one connection and prints one JSON object
with what it saw (statuses, resets, GOAWAY, digests). The client is a real peer: it keeps its
own HPACK state, windows and stream states; where a case must break a rule (a name in upper
case, a burst of resets), it turns off only the check that would stop it.
"""

import argparse
import hashlib
import json
import socket
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

TIMEOUT_S = 20


class Client:
    def __init__(self, port, validate=True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.flush()
        self.statuses = {}
        self.bodies = {}
        self.resets = {}
        self.ended = set()
        self.goaway = None
        self.pings = []
        self.settings_acked = False
        self.remote_settings = {}

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path, method="GET", headers=(), body=None, end=True, authority="proxy"):
        sid = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", "http"), (":path", path)]
        if authority is not None:
            fields.insert(2, (":authority", authority))
        fields += list(headers)
        self.conn.send_headers(sid, fields, end_stream=end and body is None)
        self.bodies[sid] = bytearray()
        if body is not None:
            self.send_body(sid, body)
        self.flush()
        return sid

    def send_body(self, sid, body):
        """Sends `body` as the windows allow, reading the server's frames meanwhile."""
        view = memoryview(body)
        while view:
            room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if room <= 0:
                self.flush()
                self.read_once()
                continue
            self.conn.send_data(sid, bytes(view[:room]))
            view = view[room:]
            self.flush()
        self.conn.end_stream(sid)
        self.flush()

    def read_once(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the proxy")
        for event in self.conn.receive_data(data):
            self.on_event(event)
        self.flush()

    def on_event(self, event):
        if isinstance(event, h2.events.ResponseReceived):
            self.statuses[event.stream_id] = int(dict(event.headers)[":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.bodies[event.stream_id] += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.ended.add(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.resets[event.stream_id] = int(event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = {"code": int(event.error_code), "last_stream": event.last_stream_id}
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings.append(event.ping_data.hex())
        elif isinstance(event, h2.events.SettingsAcknowledged):
            self.settings_acked = True
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for key, setting in event.changed_settings.items():
                self.remote_settings[int(key)] = setting.new_value

    def wait(self, done):
        deadline = time.monotonic() + TIMEOUT_S
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("the proxy did not answer in time")
            try:
                self.read_once()
            except ConnectionError:
                return False
        return True

    def finished(self, sid):
        return sid in self.ended or sid in self.resets


def case_basics(port):
    """SETTINGS both ways, PING, a GET, a 5 MiB POST echoed back under flow control."""
    c = Client(port)
    c.conn.ping(b"cogmesh!")
    c.flush()
    get = c.request("/bytes?n=100000")
    body = bytes((i * 7) % 251 for i in range(5 * 1024 * 1024))
    post = c.request("/echo", method="POST", body=body, headers=[("content-type", "application/x-test")])
    c.wait(lambda: c.finished(get) and c.finished(post) and c.pings and c.settings_acked)
    return {
        "settings_acked": c.settings_acked,
        "max_concurrent_streams": c.remote_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS),
        "ping": c.pings,
        "get": [c.statuses.get(get), len(c.bodies[get])],
        "post": [c.statuses.get(post), hashlib.sha256(c.bodies[post]).hexdigest() == hashlib.sha256(body).hexdigest()],
    }


def case_headers(port):
    """A header list within the limit but larger than one frame (CONTINUATION), one over it,
    then a request that breaks HTTP/2's rules (a name in upper case), then a plain GET."""
    c = Client(port, validate=False)
    fits = c.request("/headers", headers=[("x-big-%d" % i, "v" * 4000) for i in range(8)])
    c.wait(lambda: c.finished(fits))
    over = c.request("/", headers=[("x-huge-%d" % i, "v" * 8000) for i in range(12)])
    c.wait(lambda: c.finished(over))
    upper = c.request("/", headers=[("X-Upper", "1")])
    c.wait(lambda: c.finished(upper) or c.goaway is not None)
    after = None
    if c.goaway is None:
        after = c.request("/")
        c.wait(lambda: c.finished(after))
    return {
        "fits": c.statuses.get(fits),
        "fits_echoed": b"x-big-7" in bytes(c.bodies[fits]),
        "over": c.statuses.get(over),
        "upper": [c.statuses.get(upper), c.resets.get(upper)],
        "after": c.statuses.get(after) if after else None,
        "goaway": c.goaway,
    }


def case_no_authority(port):
    """A request without :authority (RFC 9113 §8.3.1 allows it) that names its host in `host`,
    one with :authority only, and one whose `host` differs from its :authority (a client
    breaking §8.3.1, on a connection of its own that does not check)."""
    c = Client(port)
    bare = c.request("/headers", authority=None, headers=[("host", "bare.example")])
    c.wait(lambda: c.finished(bare))
    both = c.request("/headers", authority="both.example")
    c.wait(lambda: c.finished(both))
    loose = Client(port, validate=False)
    clash = loose.request("/headers", authority="clash.example", headers=[("host", "other.example")])
    loose.wait(lambda: loose.finished(clash))
    seen = {}
    for name, client, sid in (("bare", c, bare), ("both", c, both), ("clash", loose, clash)):
        answer = json.loads(bytes(client.bodies[sid]) or b"{}")
        host = answer.get("headers", {}).get("host")
        seen[name] = [client.statuses.get(sid), client.resets.get(sid), host, answer.get("authority")]
    return seen


def case_refused(port, n):
    """`n` slow streams sent at once, before the server's SETTINGS are read."""
    c = Client(port)
    # Send the streams before learning the server's limit, as a client racing its SETTINGS.
    c.conn.remote_settings.max_concurrent_streams = 1000
    sids = [c.request("/sleep?ms=300") for _ in range(n)]
    c.wait(lambda: all(c.finished(s) for s in sids))
    return {
        "ok": sum(1 for s in sids if c.statuses.get(s) == 200),
        "refused": sum(1 for s in sids if c.resets.get(s) == 7),
    }


def case_rapid_reset(port, n):
    """`n` streams each reset right after it is opened, in one burst."""
    c = Client(port)
    c.wait(lambda: c.settings_acked)
    for _ in range(n):
        sid = c.request("/sleep?ms=2000")
        c.conn.reset_stream(sid)
    c.flush()
    closed = not c.wait(lambda: c.goaway is not None)
    return {"goaway": c.goaway, "closed": closed}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["basics", "headers", "no_authority", "refused", "rapid_reset"])
    parser.add_argument("port", type=int)
    parser.add_argument("--n", type=int, default=0)
    args = parser.parse_args()
    if args.case == "basics":
        out = case_basics(args.port)
    elif args.case == "headers":
        out = case_headers(args.port)
    elif args.case == "no_authority":
        out = case_no_authority(args.port)
    elif args.case == "refused":
        out = case_refused(args.port, args.n)
    else:
        out = case_rapid_reset(args.port, args.n)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
