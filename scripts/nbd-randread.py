#!/usr/bin/python3
"""NBD helper for scripts/bench-nbd.sh (needs Debian's libnbd bindings: /usr/bin/python3, `import nbd`).

Subcommands:

  randread URI [--seconds S] [--inflight N] [--bs B] [--seed X]
      Uniform random B-byte (default 4 KiB, aligned) reads for S seconds with N requests in
      flight (aio_pread). Prints one JSON line: {"reads":..,"seconds":..,"iops":..}.
      (Fallback for when fio lacks its nbd engine; bench-nbd.sh prefers fio.)

  build-mcow --mcow BIN --flat RAW --depth D --disk DIR
      Builds a D-layer mcow disk whose layer i holds exactly the 64 KiB blocks b with
      b % D == i, copied from RAW. Per layer: `mcow serve` the disk (writable, Unix socket),
      pwrite the layer's blocks over NBD, stop the server (SIGTERM: it flushes), `mcow seal`.
      The disk must already exist (`mcow create -s SIZE DIR`).

  build-qcow2 --flat RAW --depth D --dir DIR
      Builds the equivalent qcow2 backing chain DIR/l0000.qcow2 <- ... <- DIR/l{D-1}.qcow2
      (cluster size 64 KiB). Each layer is created standalone, written through qemu-nbd
      (one process per layer, exits on disconnect), then re-pointed at its parent with
      `qemu-img rebase -u` (metadata only), so building is O(D) and not O(D^2) opens.
      Prints the top image's path.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import nbd

BLOCK = 64 * 1024
RUN_MAX = 4 << 20  # coalesce contiguous owned blocks into writes of at most 4 MiB


def wait_socket(path, proc, what, timeout=60.0):
    t0 = time.monotonic()
    while not os.path.exists(path):
        if proc.poll() is not None:
            sys.exit(f"{what} exited early with status {proc.returncode}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            sys.exit(f"{what}: socket {path} did not appear within {timeout}s")
        time.sleep(0.002)


def owned_runs(size, depth, layer):
    """(offset, length) runs of the blocks b with b % depth == layer, coalesced."""
    nblocks = size // BLOCK
    if depth == 1:
        off = 0
        while off < size:
            n = min(RUN_MAX, size - off)
            yield off, n
            off += n
        return
    for b in range(layer, nblocks, depth):
        yield b * BLOCK, BLOCK


def connect(uri, tries=500):
    # The socket file appears at bind(), a moment before listen(): retry a refused connect.
    for t in range(tries):
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            return h
        except nbd.Error:
            if t == tries - 1:
                raise
            time.sleep(0.002)


def write_layer(uri, flat_fd, size, depth, layer, inflight=16):
    h = connect(uri)
    pending = []
    for off, n in owned_runs(size, depth, layer):
        data = os.pread(flat_fd, n, off)
        if len(data) != n:
            sys.exit(f"short read of the flat file at {off}")
        while h.aio_in_flight() >= inflight:
            h.poll(-1)
        b = nbd.Buffer.from_bytearray(bytearray(data))
        pending.append((h.aio_pwrite(b, off), b))  # keep the buffer alive until completion
        if len(pending) > 4 * inflight:
            pending = [(c, b) for c, b in pending if not h.aio_command_completed(c)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c, _ in pending:
        h.aio_command_completed(c)  # raises on a failed write
    h.flush()
    h.shutdown()
    del h


def cmd_build_mcow(a):
    size = os.path.getsize(a.flat)
    fd = os.open(a.flat, os.O_RDONLY)
    sock = os.path.join(os.path.abspath(a.disk) + ".build.sock")
    t0 = time.monotonic()
    for i in range(a.depth):
        if os.path.exists(sock):
            os.unlink(sock)
        srv = subprocess.Popen([a.mcow, "serve", "-k", sock, f"disk={a.disk}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_socket(sock, srv, "mcow serve")
        write_layer(f"nbd+unix:///disk?socket={sock}", fd, size, a.depth, i)
        srv.send_signal(signal.SIGTERM)
        _, err = srv.communicate(timeout=120)
        if srv.returncode != 0:
            sys.exit(f"mcow serve (layer {i}) exited {srv.returncode}: {err.decode(errors='replace')}")
        subprocess.run([a.mcow, "seal", a.disk], check=True, stdout=subprocess.DEVNULL)
        if a.progress and (i + 1) % max(1, a.depth // 8) == 0:
            print(f"  mcow layer {i + 1}/{a.depth} ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
    os.close(fd)


def cmd_build_qcow2(a):
    size = os.path.getsize(a.flat)
    fd = os.open(a.flat, os.O_RDONLY)
    os.makedirs(a.dir, exist_ok=True)
    sock = os.path.join(os.path.abspath(a.dir), "build.sock")
    t0 = time.monotonic()
    prev = None
    for i in range(a.depth):
        name = f"l{i:04d}.qcow2"
        path = os.path.join(a.dir, name)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", path, str(size)],
                       check=True)
        if os.path.exists(sock):
            os.unlink(sock)
        # No -t: qemu-nbd exits when the (only) client disconnects.
        srv = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", sock, "-x", "disk", "--cache=writeback", path],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_socket(sock, srv, "qemu-nbd")
        write_layer(f"nbd+unix:///disk?socket={sock}", fd, size, a.depth, i)
        _, err = srv.communicate(timeout=120)
        if srv.returncode != 0:
            sys.exit(f"qemu-nbd (layer {i}) exited {srv.returncode}: {err.decode(errors='replace')}")
        if prev is not None:
            subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", prev, "-F", "qcow2", path], check=True)
        prev = name
        if a.progress and (i + 1) % max(1, a.depth // 8) == 0:
            print(f"  qcow2 layer {i + 1}/{a.depth} ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
    os.close(fd)
    print(os.path.join(a.dir, prev))


def cmd_randread(a):
    h = connect(a.uri)
    size = h.get_size()
    nblk = size // a.bs
    rng = random.Random(a.seed)
    buf = [nbd.Buffer(a.bs) for _ in range(a.inflight)]
    free = list(range(a.inflight))
    done = 0

    def make_cb(slot):
        def cb(err):
            nonlocal done
            done += 1
            free.append(slot)
            return 1  # auto-retire the command
        return cb

    cbs = [make_cb(s) for s in range(a.inflight)]
    t0 = time.monotonic()
    deadline = t0 + a.seconds
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        while free:
            s = free.pop()
            h.aio_pread(buf[s], rng.randrange(nblk) * a.bs, completion=cbs[s])
        h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    secs = time.monotonic() - t0
    h.shutdown()
    print(json.dumps({"reads": done, "seconds": round(secs, 3), "iops": round(done / secs)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("randread")
    r.add_argument("uri")
    r.add_argument("--seconds", type=float, default=5.0)
    r.add_argument("--inflight", type=int, default=32)
    r.add_argument("--bs", type=int, default=4096)
    r.add_argument("--seed", type=int, default=1)
    m = sub.add_parser("build-mcow")
    m.add_argument("--mcow", required=True)
    m.add_argument("--flat", required=True)
    m.add_argument("--depth", type=int, required=True)
    m.add_argument("--disk", required=True)
    m.add_argument("--progress", action="store_true")
    q = sub.add_parser("build-qcow2")
    q.add_argument("--flat", required=True)
    q.add_argument("--depth", type=int, required=True)
    q.add_argument("--dir", required=True)
    q.add_argument("--progress", action="store_true")
    a = p.parse_args()
    {"randread": cmd_randread, "build-mcow": cmd_build_mcow, "build-qcow2": cmd_build_qcow2}[a.cmd](a)


if __name__ == "__main__":
    main()
