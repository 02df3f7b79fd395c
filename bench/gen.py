#!/usr/bin/env python3
"""Deterministic test disks and guest-like writes for vmkeep's benchmarks.

  gen.py disk PATH SIZE_MIB [SEED]
      a sparse raw disk: 1 MiB extents, by a seeded choice, of incompressible data (40 %),
      compressible text (30 %) and holes (30 %).
  gen.py scatter PATH PERCENT SEED MIN_KIB MAX_KIB [CHANGED_LIST]
      overwrite PERCENT of the disk with scattered writes of MIN..MAX KiB (4 KiB aligned,
      random data), and append "OFFSET LENGTH" lines to CHANGED_LIST.
"""
import os
import random
import sys

MIB = 1 << 20
TEXT = (b"Lorem ipsum dolor sit amet, vmkeep keeps generations of virtual disks. " * 16)


def disk(path, size_mib, seed=1):
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
        for i in range(size_mib):
            r = rng.random()
            if r < 0.4:
                f.seek(i * MIB)
                f.write(rng.randbytes(MIB))
            elif r < 0.7:
                f.seek(i * MIB)
                f.write((TEXT * (MIB // len(TEXT) + 1))[:MIB])


def scatter(path, percent, seed, min_kib, max_kib, changed=None):
    rng = random.Random(seed)
    size = os.path.getsize(path)
    target = int(size * percent / 100)
    done = 0
    lines = []
    with open(path, "r+b") as f:
        while done < target:
            length = rng.randint(min_kib // 4, max_kib // 4) * 4096
            off = rng.randrange(0, (size - length) // 4096) * 4096
            f.seek(off)
            f.write(rng.randbytes(length))
            lines.append(f"{off} {length}\n")
            done += length
    if changed:
        with open(changed, "a") as c:
            c.writelines(lines)
    return done


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "disk":
        disk(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    elif cmd == "scatter":
        scatter(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
                sys.argv[7] if len(sys.argv) > 7 else None)
    else:
        sys.exit(__doc__)
