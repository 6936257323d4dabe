#!/usr/bin/env python3
"""Helpers for the interop scripts (standard library only; any python3 will do).

Subcommands (all exit 0 on success; on a failed check they print what was expected and what
was found, and exit 1):

  make-image FILE SIZE SEED
      A deterministic raw image: 64 KiB units that are random data, holes (never written,
      sparse), a single random 4 KiB piece, or unaligned random bytes.
  blocks KIND FILE [BLOCK]
      Print the set of BLOCK-sized (default 4096) blocks touched by FILE, as ranges:
      KIND diff = `snapvol diff --json` output; KIND dirty = `nbdinfo --map=qemu:dirty-bitmap:X
      --json` output (extents of type 1); KIND qemu-dirty = `qemu-img map --output=json` of
      an export opened with x-dirty-bitmap (qemu shows dirty extents as data: false);
      KIND data = a raw image (blocks not all zero).
  same-blocks DESC KIND_A FILE_A KIND_B FILE_B [BLOCK]
      The two block sets must be equal.
  subset-blocks DESC KIND_A FILE_A KIND_B FILE_B [BLOCK]
      The first block set must be a subset of the second.
  differing-blocks A.img B.img OUT.json [BLOCK]
      Write the blocks where A and B differ as {"ranges":[...]} (the diff format).
  check-map KIND MAP.json IMAGE SIZE [--min-zero BYTES]
      Validate an allocation map of an export whose contents equal IMAGE (zero-extended to
      SIZE): KIND qemu = `qemu-img map --output=json`, KIND nbdinfo = `nbdinfo --map --json`.
      The extents must be in order, contiguous and cover [0, SIZE); an extent flagged zero
      must read as zeros; with --min-zero, at least that many bytes must be flagged zero
      (the server reports holes at all).
  fio-check IMAGE BS START END [--written-out FILE]
      Each BS block of IMAGE in [START, END) must be all zero (never written) or a whole block
      written by fio with verify=md5 for exactly that offset (header magic, length, offset,
      header crc32c, md5 of the data). A torn or misplaced block fails.
  json-get FILE PATH
      Print a value from a JSON file; PATH is dot-separated keys and list indexes.
"""

import hashlib
import json
import os
import random
import struct
import sys

BLOCK = 4096


def fail(msg, *details):
    print("FAIL: " + msg, file=sys.stderr)
    for d in details:
        print("    " + d, file=sys.stderr)
    sys.exit(1)


def load_json(path):
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError as e:
        fail(f"{path} is not valid JSON: {e}", "content: " + text[:500])


# ---------------------------------------------------------------- images

def make_image(path, size, seed):
    rng = random.Random(seed)
    unit = 65536
    with open(path, "wb") as f:
        f.truncate(size)
        for base in range(0, size, unit):
            kind = rng.randrange(5)
            if kind == 0:  # hole
                continue
            if kind == 1:
                f.seek(base)
                f.write(rng.randbytes(unit))
            elif kind == 2:
                off = base + rng.randrange(unit // BLOCK) * BLOCK
                f.seek(off)
                f.write(rng.randbytes(BLOCK))
            elif kind == 3:
                off = base + rng.randrange(unit - 3000)
                f.seek(off)
                f.write(rng.randbytes(rng.randrange(1, 3000)))
            else:
                f.seek(base)
                f.write(bytes([rng.randrange(1, 256)]) * unit)


def data_blocks(path, block):
    out = set()
    zero = bytes(block)
    with open(path, "rb") as f:
        i = 0
        while True:
            b = f.read(block)
            if not b:
                break
            if b != zero[: len(b)]:
                out.add(i)
            i += 1
    return out


# ---------------------------------------------------------------- block sets

def ranges_to_blocks(ranges, block):
    out = set()
    for off, length in ranges:
        if length <= 0:
            continue
        out.update(range(off // block, (off + length - 1) // block + 1))
    return out


def blocks_of(kind, path, block):
    if kind == "data":
        return data_blocks(path, block)
    doc = load_json(path)
    if kind == "diff":
        if not isinstance(doc, dict) or "ranges" not in doc:
            fail(f"{path}: expected {{\"ranges\":[...]}}", "got: " + json.dumps(doc)[:300])
        return ranges_to_blocks([(r["offset"], r["length"]) for r in doc["ranges"]], block)
    if kind == "dirty":
        return ranges_to_blocks(
            [(e["offset"], e["length"]) for e in doc if e["type"] & 1], block)
    if kind == "qemu-dirty":
        # qemu-img map with x-dirty-bitmap: qemu reports the dirty extents as "data": false.
        return ranges_to_blocks(
            [(e["start"], e["length"]) for e in doc if not e["data"]], block)
    fail(f"unknown block-set kind {kind}")


def fmt_blocks(blocks, block, limit=12):
    """Ranges of a block set as byte offsets, for messages."""
    rs = []
    for b in sorted(blocks):
        if rs and rs[-1][1] == b:
            rs[-1][1] = b + 1
        else:
            rs.append([b, b + 1])
    parts = [f"[{s * block}, {e * block})" for s, e in rs[:limit]]
    if len(rs) > limit:
        parts.append(f"... ({len(rs)} ranges)")
    return f"{len(blocks)} blocks: " + " ".join(parts) if blocks else "no blocks"


def cmd_same_blocks(desc, ka, fa, kb, fb, block, subset=False):
    a = blocks_of(ka, fa, block)
    b = blocks_of(kb, fb, block)
    if subset:
        extra = a - b
        if extra:
            fail(desc, f"{ka} {fa}: {fmt_blocks(a, block)}",
                 f"{kb} {fb}: {fmt_blocks(b, block)}",
                 f"in the first but not the second: {fmt_blocks(extra, block)}")
    elif a != b:
        fail(desc, f"expected ({kb} {fb}): {fmt_blocks(b, block)}",
             f"got ({ka} {fa}):      {fmt_blocks(a, block)}",
             f"only in got: {fmt_blocks(a - b, block)}",
             f"only in expected: {fmt_blocks(b - a, block)}")
    print(f"ok: {desc}: {fmt_blocks(a, block)}")


def differing_blocks(fa, fb, out, block):
    ranges = []
    with open(fa, "rb") as a, open(fb, "rb") as b:
        i = 0
        while True:
            x = a.read(block)
            y = b.read(block)
            if not x and not y:
                break
            if x != y:
                if ranges and ranges[-1]["offset"] + ranges[-1]["length"] == i * block:
                    ranges[-1]["length"] += block
                else:
                    ranges.append({"offset": i * block, "length": block})
            i += 1
    with open(out, "w") as f:
        json.dump({"ranges": ranges}, f)


# ---------------------------------------------------------------- allocation maps

def check_map(kind, map_path, image, size, min_zero):
    doc = load_json(map_path)
    extents = []  # (start, length, zero)
    for e in doc:
        if kind == "qemu":
            extents.append((e["start"], e["length"], bool(e["zero"]), e))
        else:
            extents.append((e["offset"], e["length"], bool(e["type"] & 2), e))
    pos = 0
    for start, length, _zero, e in extents:
        if start != pos or length <= 0:
            fail(f"{kind} map is not contiguous at offset {pos}", "extent: " + json.dumps(e))
        pos = start + length
    if pos != size:
        fail(f"{kind} map covers [0, {pos}), expected [0, {size})")
    img_size = os.path.getsize(image)
    zero_total = 0
    with open(image, "rb") as f:
        for start, length, zero, e in extents:
            if not zero:
                continue
            zero_total += length
            if start >= img_size:
                continue
            f.seek(start)
            remaining = min(length, img_size - start)
            off = start
            while remaining:
                chunk = f.read(min(remaining, 1 << 20))
                if chunk.count(0) != len(chunk):
                    nz = next(i for i, c in enumerate(chunk) if c)
                    fail(f"{kind} map flags [{start}, {start + length}) as zero, "
                         f"but the export has data at offset {off + nz}",
                         "extent: " + json.dumps(e))
                remaining -= len(chunk)
                off += len(chunk)
    if min_zero is not None and zero_total < min_zero:
        fail(f"{kind} map flags only {zero_total} bytes as zero; expected at least {min_zero} "
             "(unwritten areas should be reported as holes/zero)")
    print(f"ok: {kind} map: {len(extents)} extents, {zero_total} bytes flagged zero")


# ---------------------------------------------------------------- fio verify headers

def fio_crc32c(data):
    """fio's crc32c: initial value ~0 and, unlike the usual definition, no final inversion."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


FIO_MAGIC = 0xACCA
HDR = struct.Struct("<HHIQQIIHHI")  # magic, type, len, seed, offset, sec, nsec, thread, numberio, crc32


def fio_check(image, bs, start, end, written_out):
    zero = bytes(bs)
    written = []
    bad = []
    with open(image, "rb") as f:
        f.seek(start)
        for off in range(start, end, bs):
            b = f.read(bs)
            if len(b) < bs:
                fail(f"{image} is shorter than {end}")
            if b == zero:
                continue
            magic, _vtype, length, _seed, hoff, _s, _ns, _t, _n, hcrc = HDR.unpack_from(b)
            why = None
            if magic != FIO_MAGIC:
                why = f"no fio header (magic {magic:#06x})"
            elif length != bs:
                why = f"header length {length}, expected {bs}"
            elif hoff != off:
                why = f"header says offset {hoff}: a block written elsewhere"
            elif fio_crc32c(b[:36]) != hcrc:
                why = "header crc32c mismatch"
            elif hashlib.md5(b[56:]).digest() != b[40:56]:
                why = "md5 of the data does not match its header: a torn block"
            if why:
                bad.append(f"offset {off}: {why}")
            else:
                written.append(off // bs)
    if written_out:
        with open(written_out, "w") as f:
            json.dump(written, f)
    if bad:
        fail(f"{image}: {len(bad)} inconsistent fio blocks", *bad[:10])
    print(f"ok: {image}: {len(written)} fio blocks, the rest zero")


# ---------------------------------------------------------------- json

def json_get(path, expr):
    v = load_json(path)
    for part in expr.split("."):
        if isinstance(v, list):
            v = v[int(part)]
        else:
            v = v[part]
    if isinstance(v, (dict, list)):
        print(json.dumps(v))
    elif isinstance(v, bool):
        print("true" if v else "false")
    else:
        print(v)


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        sys.exit(2)
    cmd, args = argv[1], argv[2:]
    if cmd == "make-image":
        make_image(args[0], int(args[1]), int(args[2]))
    elif cmd == "blocks":
        block = int(args[2]) if len(args) > 2 else BLOCK
        print(fmt_blocks(blocks_of(args[0], args[1], block), block, limit=1 << 30))
    elif cmd in ("same-blocks", "subset-blocks"):
        block = int(args[5]) if len(args) > 5 else BLOCK
        cmd_same_blocks(args[0], args[1], args[2], args[3], args[4], block,
                        subset=cmd == "subset-blocks")
    elif cmd == "differing-blocks":
        differing_blocks(args[0], args[1], args[2], int(args[3]) if len(args) > 3 else BLOCK)
    elif cmd == "check-map":
        min_zero = None
        if "--min-zero" in args:
            i = args.index("--min-zero")
            min_zero = int(args[i + 1])
            args = args[:i] + args[i + 2:]
        check_map(args[0], args[1], args[2], int(args[3]), min_zero)
    elif cmd == "fio-check":
        out = None
        if "--written-out" in args:
            i = args.index("--written-out")
            out = args[i + 1]
            args = args[:i] + args[i + 2:]
        fio_check(args[0], int(args[1]), int(args[2]), int(args[3]), out)
    elif cmd == "json-get":
        json_get(args[0], args[1])
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv)
