#!/usr/bin/python3
"""An independent HBONE peer built on Debian's python3-h2, for interop tests.

    h2peer.py server --port P --cert C --key K --ca CA
        Serves HBONE on 127.0.0.1:P: TLS 1.3, client certificate required,
        ALPN h2; a CONNECT to ip:port is answered 200 after the upstream TCP
        connection succeeded (503 otherwise, 400 when :path or :scheme is
        present) and relayed with half-close both ways. Prints "listening".

    h2peer.py client --addr H:P --authority A --cert C --key K --ca CA
                     --streams N --size S
        Opens N concurrent CONNECT streams to A through the HBONE server at
        H:P on one connection, sends S+i random bytes on stream i, ends the
        stream, reads the echo to END_STREAM and checks its sha256. Prints
        "ok N" and exits 0, or exits 1 with the reason.

Run with /usr/bin/python3 (Debian's, which has h2). Single-threaded,
non-blocking: one selector loop owns every socket.
"""

import argparse
import hashlib
import os
import selectors
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def tls_context(server, cert, key, ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False  # SPIFFE identities are URI SANs, not host names
    ctx.set_alpn_protocols(["h2"])
    return ctx


class H2Socket:
    """A non-blocking TLS socket carrying one h2 connection."""

    def __init__(self, sock, conn):
        self.sock = sock
        self.conn = conn
        self.out = b""

    def recv_events(self):
        events = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (ssl.SSLWantReadError, BlockingIOError):
                return events, False
            if not data:
                return events, True
            events += self.conn.receive_data(data)
            if not self.sock.pending():
                return events, False

    def flush(self):
        self.out += self.conn.data_to_send()
        while self.out:
            try:
                n = self.sock.send(self.out[: 1 << 16])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return False
            self.out = self.out[n:]
        return True


class Interest:
    """Keeps each socket's selector registration equal to what it needs now."""

    def __init__(self, sel):
        self.sel = sel
        self.masks = {}

    def set(self, sock, mask, data):
        old = self.masks.get(sock, 0)
        if mask == old:
            return
        if old == 0:
            self.sel.register(sock, mask, data)
        elif mask == 0:
            self.sel.unregister(sock)
        else:
            self.sel.modify(sock, mask, data)
        if mask:
            self.masks[sock] = mask
        else:
            self.masks.pop(sock, None)


def send_window(conn, sid, want):
    return min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, want)


class Tunnel:
    def __init__(self, sid, up):
        self.sid = sid
        self.up = up
        self.to_h2 = b""  # upstream bytes waiting for flow-control window
        self.up_eof = False  # upstream sent FIN
        self.h2_ended = False  # END_STREAM sent
        self.to_up = b""  # h2 bytes waiting for the upstream socket
        self.client_eof = False  # END_STREAM received
        self.up_shut = False


def serve_conn(raw, ctx):
    try:
        sock = ctx.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError) as e:
        print("handshake:", e, flush=True)
        raw.close()
        return
    if sock.selected_alpn_protocol() != "h2":
        sock.close()
        return
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=False, validate_inbound_headers=False)
    )
    conn.initiate_connection()
    sock.setblocking(False)
    hs = H2Socket(sock, conn)
    sel = selectors.DefaultSelector()
    interest = Interest(sel)
    tunnels = {}

    def close_tunnel(t):
        interest.set(t.up, 0, t)
        t.up.close()
        tunnels.pop(t.sid, None)

    closed = False
    while not closed:
        interest.set(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if hs.out else 0), None)
        for t in tunnels.values():
            mask = (0 if t.up_eof else selectors.EVENT_READ) | (selectors.EVENT_WRITE if t.to_up else 0)
            interest.set(t.up, mask, t)
        for key, _ in sel.select(timeout=1):
            if key.data is None:
                events, eof = hs.recv_events()
                closed = closed or eof
                for ev in events:
                    if isinstance(ev, h2.events.RequestReceived):
                        h = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v for k, v in ev.headers}
                        if h.get(":method") != "CONNECT" or ":path" in h or ":scheme" in h or ":authority" not in h:
                            conn.send_headers(ev.stream_id, [(":status", "400")], end_stream=True)
                            continue
                        host, _, port = h[":authority"].rpartition(":")
                        try:
                            up = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
                        except (OSError, ValueError):
                            conn.send_headers(ev.stream_id, [(":status", "503")], end_stream=True)
                            continue
                        up.setblocking(False)
                        tunnels[ev.stream_id] = Tunnel(ev.stream_id, up)
                        conn.send_headers(ev.stream_id, [(":status", "200")])
                    elif isinstance(ev, h2.events.DataReceived):
                        t = tunnels.get(ev.stream_id)
                        if t:
                            t.to_up += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        t = tunnels.get(ev.stream_id)
                        if t:
                            t.client_eof = True
                    elif isinstance(ev, h2.events.StreamReset):
                        t = tunnels.get(ev.stream_id)
                        if t:
                            close_tunnel(t)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        closed = True
            elif not key.data.up_eof and key.data.sid in tunnels:
                t = key.data
                try:
                    data = t.up.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    t.to_h2 += data
                else:
                    t.up_eof = True
        # Move data: upstream -> h2 within windows, h2 -> upstream as the socket takes it.
        for t in list(tunnels.values()):
            while t.to_h2:
                n = send_window(conn, t.sid, len(t.to_h2))
                if n <= 0:
                    break
                conn.send_data(t.sid, t.to_h2[:n])
                t.to_h2 = t.to_h2[n:]
            if t.up_eof and not t.to_h2 and not t.h2_ended:
                conn.end_stream(t.sid)
                t.h2_ended = True
            while t.to_up:
                try:
                    n = t.up.send(t.to_up)
                except BlockingIOError:
                    break
                except OSError:
                    t.to_up = b""
                    break
                t.to_up = t.to_up[n:]
            if t.client_eof and not t.to_up and not t.up_shut:
                try:
                    t.up.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                t.up_shut = True
            if t.h2_ended and t.up_shut:
                close_tunnel(t)
        try:
            hs.flush()
        except OSError:
            closed = True
    for t in list(tunnels.values()):
        close_tunnel(t)
    sock.close()


def run_server(args):
    ctx = tls_context(True, args.cert, args.key, args.ca)
    ln = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ln.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ln.bind(("127.0.0.1", args.port))
    ln.listen(128)
    print("listening", flush=True)
    # One connection at a time is enough for the tests, and keeps this simple.
    while True:
        raw, _ = ln.accept()
        serve_conn(raw, ctx)


def run_client(args):
    ctx = tls_context(False, args.cert, args.key, args.ca)
    host, _, port = args.addr.rpartition(":")
    raw = socket.create_connection((host, int(port)), timeout=10)
    sock = ctx.wrap_socket(raw)
    if sock.selected_alpn_protocol() != "h2":
        sys.exit("server did not negotiate h2")
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    sock.setblocking(False)
    hs = H2Socket(sock, conn)
    sel = selectors.DefaultSelector()
    interest = Interest(sel)

    payload, want, got, to_send, ended = {}, {}, {}, {}, set()
    for i in range(args.streams):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "CONNECT"), (":authority", args.authority)])
        payload[sid] = os.urandom(args.size + i)
        want[sid] = hashlib.sha256(payload[sid]).hexdigest()
        got[sid] = hashlib.sha256()
    hs.flush()
    done = set()
    while len(done) < args.streams:
        interest.set(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if hs.out else 0), None)
        if not sel.select(timeout=10):
            sys.exit("timeout: %d of %d streams done" % (len(done), args.streams))
        events, eof = hs.recv_events()
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers).get(b":status")
                if status != b"200":
                    sys.exit("stream %d: status %r" % (ev.stream_id, status))
                to_send[ev.stream_id] = payload[ev.stream_id]
            elif isinstance(ev, h2.events.DataReceived):
                got[ev.stream_id].update(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                if got[ev.stream_id].hexdigest() != want[ev.stream_id]:
                    sys.exit("stream %d: sha256 mismatch" % ev.stream_id)
                done.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                sys.exit("stream %d: reset %r" % (ev.stream_id, ev.error_code))
        if eof and len(done) < args.streams:
            sys.exit("connection closed: %d of %d streams done" % (len(done), args.streams))
        for sid, data in list(to_send.items()):
            while data:
                n = send_window(conn, sid, len(data))
                if n <= 0:
                    break
                conn.send_data(sid, data[:n])
                data = data[n:]
            to_send[sid] = data
            if not data and sid not in ended:
                conn.end_stream(sid)
                ended.add(sid)
        hs.flush()
    conn.close_connection()
    hs.flush()
    print("ok", len(done), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("--port", type=int)
    p.add_argument("--addr")
    p.add_argument("--authority")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--size", type=int, default=128 << 10)
    args = p.parse_args()
    if args.mode == "server":
        run_server(args)
    else:
        run_client(args)


if __name__ == "__main__":
    main()
