#!/usr/bin/python3
"""Replays the reads of a recorded guest boot against an NBD export, one at a time, and prints
the seconds they took.

A guest boot under TCG is CPU-bound on this 2-core machine, so eight guests booting at once
measure the CPU, not the deployment path. This client stands in for a guest: it issues the same
reads (offset and length, in the order the guest issued them) with no CPU between them, so
eight of them at once measure what the network, the registry and the fetch path add.

The reads come from an nbdkit log filter file of one boot (`nbdkit --filter=log ...
logfile=LOG`): every `Read id=N offset=0x.. count=0x..` line, in log order. It does not replay
the guest's think time or its queue depth (the guest may have had several reads in flight).

Usage: nbd-replay.py LOG NBD_URI      (prints "reads=N bytes=B seconds=S")
Needs python3-libnbd (run as /usr/bin/python3: pyenv's python lacks it).
"""
import re
import sys
import time

import nbd

READ = re.compile(r"\bRead id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) ")


def reads(log):
    with open(log) as f:
        for line in f:
            m = READ.search(line)
            if m:
                yield int(m.group(1), 16), int(m.group(2), 16)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    todo = list(reads(sys.argv[1]))
    if not todo:
        sys.exit(f"nbd-replay: no reads in {sys.argv[1]}")
    h = nbd.NBD()
    t0 = time.monotonic()
    h.connect_uri(sys.argv[2])
    total = 0
    for offset, count in todo:
        total += len(h.pread(count, offset))
    h.shutdown()
    print(f"reads={len(todo)} bytes={total} seconds={time.monotonic() - t0:.3f}")


if __name__ == "__main__":
    main()
