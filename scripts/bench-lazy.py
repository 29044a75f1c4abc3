#!/usr/bin/python3
"""Helper of scripts/bench-lazy.sh (run with Debian's /usr/bin/python3, which has libnbd's
bindings). Not a test; see docs/BENCHMARKS.md, "Lazy deployment: bytes fetched and cold reads".

  bench-lazy.py extents IMG PATH...          print "path size start_byte len_byte" per extent of
                                             each file of the ext4 image IMG (from debugfs)
  bench-lazy.py read-extents URI EXTFILE     read those byte ranges over NBD, one connection, in
                                             file order; print bytes read and the elapsed time
  bench-lazy.py first-read SOCK -- CMD...    start CMD (an `mcow serve`), and time from its start
                                             to the first successful 512-byte read at offset 0
                                             over nbd+unix:///?socket=SOCK (export name via
                                             $EXPORT); leave CMD running, print "seconds pid"
"""
import os
import re
import subprocess
import sys
import time


def extents(img, paths):
    out = subprocess.run(["debugfs", "-R", "stats", img], capture_output=True, text=True, check=True).stdout
    bs = int(re.search(r"Block size:\s+(\d+)", out).group(1))
    for p in paths:
        st = subprocess.run(["debugfs", "-R", f"stat {p}", img], capture_output=True, text=True, check=True).stdout
        size = int(re.search(r"Size:\s+(\d+)", st).group(1))
        ext = st.split("EXTENTS:", 1)[1] if "EXTENTS:" in st else ""
        left = size
        # "(0-255):33024-33279, (256):40000, (ETB0):1234" ; ETB = extent tree blocks (metadata)
        for m in re.finditer(r"\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?", ext):
            lfirst, llast, pfirst = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3))
            n = llast - lfirst + 1
            length = min(n * bs, ((left + bs - 1) // bs) * bs)
            if length <= 0:
                break
            print(p, size, pfirst * bs, length)
            left -= length


def read_extents(uri, extfile):
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    total = 0
    t0 = time.monotonic()
    with open(extfile) as f:
        for line in f:
            _, _, start, length = line.split()
            start, length = int(start), int(length)
            while length > 0:
                n = min(length, 4 << 20)
                h.pread(n, start)
                total += n
                start += n
                length -= n
    dt = time.monotonic() - t0
    h.shutdown()
    print(total, f"{dt:.4f}")


def first_read(sock, cmd):
    import nbd
    export = os.environ.get("EXPORT", "")
    uri = f"nbd+unix:///{export}?socket={sock}"
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.environ.get("LOG", "/dev/null"), "ab"))
    while True:
        if proc.poll() is not None:
            sys.exit(f"first-read: the server exited ({proc.returncode})")
        if time.monotonic() - t0 > 60:
            proc.terminate()
            sys.exit("first-read: no read within 60 s")
        if os.path.exists(sock):
            try:
                h = nbd.NBD()
                h.connect_uri(uri)
                buf = h.pread(512, 0)
                if len(buf) == 512:
                    dt = time.monotonic() - t0
                    h.shutdown()
                    print(f"{dt:.4f}", proc.pid)
                    return
            except nbd.Error:
                pass
        time.sleep(0.002)


if __name__ == "__main__":
    verb = sys.argv[1]
    if verb == "extents":
        extents(sys.argv[2], sys.argv[3:])
    elif verb == "read-extents":
        read_extents(sys.argv[2], sys.argv[3])
    elif verb == "first-read":
        assert sys.argv[3] == "--"
        first_read(sys.argv[2], sys.argv[4:])
    else:
        sys.exit(__doc__)
