#!/usr/bin/python3
"""A TCP proxy that adds a fixed round-trip time, for the network harness (scripts/netsim).

The kernel here has no netem, so latency is added in user space: this proxy accepts on LISTEN,
opens one connection to UPSTREAM per client connection, and forwards the bytes both ways.

What it simulates:
- A one-way delay in each direction: every chunk is forwarded --delay-ms after it was read, in
  order, so a request and its response cost one RTT (2 x delay) more than without the proxy.
- The TCP handshake the client would have paid over the long path: the client's handshake with
  the proxy is local and costs nothing, so the first bytes of each new connection are held one
  more RTT. A request on a fresh connection therefore costs 2 RTT, on a reused one 1 RTT.
- Bandwidth is not this proxy's business: tc (tbf) on the link limits it. The proxy keeps at most
  --buffer-kb of data in flight per direction and connection (enough for the bandwidth-delay
  product of the profiles), then stops reading, so the sender feels the link's pace.
- Fault injection (--fail-first N --fail-match REGEX): the first N HTTP requests (over all
  connections) whose request line matches REGEX get `429 Too Many Requests` with `Retry-After: 1`
  after one RTT, and their connection is closed; the request never reaches UPSTREAM. Each
  injected answer is logged to stderr as a line starting with "delay-proxy: injected 429".
  Requests are told apart by their heads and Content-Length (no pipelining is assumed); a
  connection that sends a chunked body is forwarded without further inspection.

What it does NOT simulate: TCP slow start and the congestion window over a long path (the real
TCP connections here have a sub-millisecond RTT, so they reach full speed at once), packet loss,
jitter and reordering. The delay applies per chunk as read (up to 256 KiB), and asyncio's timers
have about a millisecond of resolution, so delays below ~1 ms are approximate.

--stats FILE: a JSON summary (connections, bytes each way, injected answers) rewritten whenever a
connection closes and at exit (SIGTERM).

Standard library only; run it with /usr/bin/python3.
"""

import argparse
import asyncio
import collections
import json
import os
import re
import signal
import sys

CHUNK = 256 * 1024
MAX_HEAD = 64 * 1024
INJECTED = (
    b"HTTP/1.1 429 Too Many Requests\r\n"
    b"Retry-After: 1\r\n"
    b"Content-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)


def hostport(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host, int(port)


class Flight:
    """The chunks of one direction waiting for their release time, bounded in bytes."""

    def __init__(self, limit):
        self.items = collections.deque()
        self.bytes = 0
        self.limit = limit
        self.changed = asyncio.Event()

    async def put(self, release, kind, data=b""):
        while self.bytes >= self.limit:
            self.changed.clear()
            await self.changed.wait()
        self.items.append((release, kind, data))
        self.bytes += len(data)
        self.changed.set()

    async def get(self):
        while not self.items:
            self.changed.clear()
            await self.changed.wait()
        item = self.items.popleft()
        self.bytes -= len(item[2])
        self.changed.set()
        return item


class Proxy:
    def __init__(self, args):
        self.upstream = args.upstream
        self.delay = args.delay_ms / 1000.0
        self.limit = args.buffer_kb * 1024
        self.fail_left = args.fail_first
        self.fail_match = re.compile(args.fail_match.encode()) if args.fail_match else None
        self.stats_path = args.stats
        self.stats = {"connections": 0, "bytes_to_upstream": 0, "bytes_to_client": 0, "injected": 0}

    def write_stats(self):
        if not self.stats_path:
            return
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats, f)
        os.replace(tmp, self.stats_path)

    def inspecting(self):
        return self.fail_match is not None and self.fail_left > 0

    async def handle(self, creader, cwriter):
        loop = asyncio.get_running_loop()
        self.stats["connections"] += 1
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
        except OSError as e:
            print(f"delay-proxy: upstream {self.upstream}: {e}", file=sys.stderr, flush=True)
            cwriter.close()
            return
        to_up, to_client = Flight(self.limit), Flight(self.limit)
        tasks = [
            asyncio.ensure_future(self.from_client(creader, to_up, to_client, loop)),
            asyncio.ensure_future(self.pump(ureader, to_client, loop)),
            asyncio.ensure_future(self.send(to_up, uwriter, loop, "bytes_to_upstream")),
            asyncio.ensure_future(self.send(to_client, cwriter, loop, "bytes_to_client")),
        ]
        try:
            # Done when both senders are done (each ends at its direction's end or an injection).
            await asyncio.wait(tasks[2:], return_when=asyncio.ALL_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for w in (uwriter, cwriter):
                w.close()
            self.write_stats()

    async def pump(self, reader, flight, loop, first_extra=0.0):
        """Reads chunks and queues each for delay (plus `first_extra` for the first one)."""
        extra = first_extra
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                await flight.put(loop.time() + self.delay + extra, "data", data)
                extra = 0.0
        except (ConnectionError, OSError):
            pass
        await flight.put(loop.time() + self.delay, "eof")

    async def from_client(self, reader, to_up, to_client, loop):
        """The client's direction: the first bytes wait one more RTT (the handshake); while
        answers are still to be injected, requests are parsed to find the ones to fail."""
        extra = 2 * self.delay
        head = bytearray()
        body_left = 0
        opaque = False
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                release = loop.time() + self.delay + extra
                extra = 0.0
                if opaque or (body_left == 0 and not head and not self.inspecting()):
                    opaque = opaque or not self.inspecting()
                    await to_up.put(release, "data", data)
                    continue
                out = bytearray()
                view = memoryview(data)
                while view:
                    if opaque:
                        out += view
                        break
                    if body_left:
                        n = min(body_left, len(view))
                        out += view[:n]
                        view = view[n:]
                        body_left -= n
                        continue
                    head += view
                    view = view[:0]
                    end = head.find(b"\r\n\r\n")
                    if end < 0:
                        if len(head) > MAX_HEAD:
                            out += head
                            head.clear()
                            opaque = True
                        break
                    request, rest = bytes(head[: end + 4]), bytes(head[end + 4 :])
                    head.clear()
                    line = request.split(b"\r\n", 1)[0]
                    if self.inspecting() and self.fail_match.search(line):
                        self.fail_left -= 1
                        self.stats["injected"] += 1
                        print(
                            f"delay-proxy: injected 429 #{self.stats['injected']} for {line.decode(errors='replace')!r}",
                            file=sys.stderr,
                            flush=True,
                        )
                        if out:
                            await to_up.put(release, "data", bytes(out))
                        await to_up.put(release, "eof")
                        await to_client.put(release + self.delay, "close", INJECTED)
                        return
                    out += request
                    body_left, chunked = parse_length(request)
                    opaque = chunked or not self.inspecting()
                    view = memoryview(rest)
                if out:
                    await to_up.put(release, "data", bytes(out))
        except (ConnectionError, OSError):
            pass
        if head:
            await to_up.put(loop.time() + self.delay, "data", bytes(head))
        await to_up.put(loop.time() + self.delay, "eof")

    async def send(self, flight, writer, loop, counter):
        """Writes each queued chunk at its release time; ends at "eof" (half-close) or "close"."""
        try:
            while True:
                release, kind, data = await flight.get()
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if kind == "eof":
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                # Whatever else is already due goes out in the same write.
                parts = [data]
                while flight.items and flight.items[0][1] == "data" and flight.items[0][0] <= loop.time():
                    parts.append((await flight.get())[2])
                payload = b"".join(parts)
                writer.write(payload)
                self.stats[counter] += len(payload)
                await writer.drain()
                if kind == "close":
                    writer.close()
                    return
        except (ConnectionError, OSError):
            return


def parse_length(request):
    """(Content-Length, chunked?) of a request head."""
    length, chunked = 0, False
    for h in request.split(b"\r\n")[1:]:
        name, _, value = h.partition(b":")
        name = name.strip().lower()
        if name == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=hostport, required=True, help="HOST:PORT to accept on")
    p.add_argument("--upstream", type=hostport, required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in each direction")
    p.add_argument("--buffer-kb", type=int, default=4096, help="data in flight per direction")
    p.add_argument("--fail-first", type=int, default=0, help="answer this many requests with 429")
    p.add_argument("--fail-match", default="", help="regex on the request line of those requests")
    p.add_argument("--stats", default="", help="write a JSON summary to this file")
    args = p.parse_args()
    if args.fail_first and not args.fail_match:
        p.error("--fail-first needs --fail-match")
    try:
        re.compile(args.fail_match)
    except re.error as e:
        p.error(f"--fail-match {args.fail_match!r}: {e}")
    proxy = Proxy(args)
    server = await asyncio.start_server(proxy.handle, *args.listen, reuse_address=True, backlog=256)
    proxy.write_stats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"delay-proxy: {args.listen[0]}:{args.listen[1]} -> {args.upstream[0]}:{args.upstream[1]}, "
        f"delay {args.delay_ms} ms each way",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    server.close()
    proxy.write_stats()


if __name__ == "__main__":
    asyncio.run(main())
