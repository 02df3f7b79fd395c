#!/usr/bin/env python3
"""Deterministic test disks and guest-like writes for vmkeep's benchmarks.

  gen.py disk PATH SIZE_MIB [SEED]
      a sparse raw disk: 1 MiB extents, by a seeded choice, of incompressible data (40 %),
      compressible text (30 %) and holes (30 %).
  gen.py scatter PATH PERCENT SEED MIN_KIB MAX_KIB [CHANGED_LIST [DUMP_DIR]]
      overwrite PERCENT of the disk with scattered writes of MIN..MAX KiB (4 KiB aligned,
      random data), and append "OFFSET LENGTH" lines to CHANGED_LIST. With DUMP_DIR, also
      keep each write's bytes as DUMP_DIR/N.bin and the qemu-io commands that repeat the
      writes on another image as DUMP_DIR/qemu-io.cmds (one "write -s FILE OFF LEN" a line).
  gen.py sparse PATH SIZE_GIB DATA_MIB [SEED]
      a huge sparse disk holding DATA_MIB MiB of data in 1 MiB extents spread over it
      (half random, half text); everything else is a hole.
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


def scatter(path, percent, seed, min_kib, max_kib, changed=None, dump=None):
    rng = random.Random(seed)
    size = os.path.getsize(path)
    target = int(size * percent / 100)
    done = 0
    lines = []
    cmds = []
    if dump:
        os.makedirs(dump, exist_ok=True)
    with open(path, "r+b") as f:
        while done < target:
            length = rng.randint(min_kib // 4, max_kib // 4) * 4096
            off = rng.randrange(0, (size - length) // 4096) * 4096
            data = rng.randbytes(length)
            f.seek(off)
            f.write(data)
            if dump:
                name = os.path.join(dump, f"{len(lines)}.bin")
                with open(name, "wb") as d:
                    d.write(data)
                cmds.append(f"write -s {name} {off} {length}\n")
            lines.append(f"{off} {length}\n")
            done += length
    if changed:
        with open(changed, "a") as c:
            c.writelines(lines)
    if dump:
        with open(os.path.join(dump, "qemu-io.cmds"), "w") as c:
            c.writelines(cmds)
    return done


def sparse(path, size_gib, data_mib, seed=1):
    rng = random.Random(seed)
    size = size_gib << 30
    extents = size // MIB
    with open(path, "wb") as f:
        f.truncate(size)
        for i, e in enumerate(sorted(rng.sample(range(extents), data_mib))):
            f.seek(e * MIB)
            f.write(rng.randbytes(MIB) if i % 2 == 0 else (TEXT * (MIB // len(TEXT) + 1))[:MIB])


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "disk":
        disk(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    elif cmd == "scatter":
        print(scatter(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                      int(sys.argv[6]), sys.argv[7] if len(sys.argv) > 7 else None,
                      sys.argv[8] if len(sys.argv) > 8 else None))
    elif cmd == "sparse":
        sparse(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    else:
        sys.exit(__doc__)
