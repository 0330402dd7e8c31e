#!/usr/bin/env python3
"""Writes the hand-made seeds of fuzz/corpus/<target>/seed-*.

The input formats are documented in src/lib.rs; this script is only an
encoder for them. Files the fuzzer found are named found-* and are not
touched here. Run from anywhere: python3 fuzz/seeds.py
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# --- mmio_registers ---------------------------------------------------------

# Same order as REGISTERS in src/lib.rs: an op picks one by index.
REGISTERS = [
    0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034,
    0x038, 0x044, 0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094,
    0x0A0, 0x0A4, 0x0AC, 0x0B0, 0x0BC, 0x0FC, 0x100, 0x104, 0x108, 0x10C,
    0x10E, 0x110, 0x0F0, 0x0FE, 0xFF8, 0xFFC,
]
WIDTH = {1: 0, 2: 1, 4: 2, 8: 3}

STATUS, NOTIFY = 0x070, 0x050
ACK, DRIVER, DRIVER_OK, FEATURES_OK, FAILED = 1, 2, 4, 8, 0x80


def offset(off):
    """Register by index when listed, else a raw offset (-16 .. 0x1010)."""
    if off in REGISTERS:
        return bytes([REGISTERS.index(off)])
    return bytes([0xC0]) + struct.pack("<H", (off + 16) % (0x1000 + 32))


def rd(off, width=4):
    return bytes([WIDTH[width] << 3 | 0]) + offset(off)


def wr(off, value, width=4):
    raw = value.to_bytes(8, "little")[:width]
    return bytes([WIDTH[width] << 3 | 3]) + offset(off) + bytes([0x80]) + raw


def init(size_log2):
    return bytes([5, size_log2])


def poke(addr, value8):
    return bytes([6]) + struct.pack("<H", addr) + value8


def notify(queue=0):
    return bytes([7 | (queue & 1) << 3])


SERVE = bytes([6 | 0x80])


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def queue_setup(size, d, a, u):
    out = wr(0x030, 0) + rd(0x034) + wr(0x038, size)
    for low, addr in ((0x080, d), (0x090, a), (0x0A0, u)):
        out += wr(low, addr & 0xFFFFFFFF) + wr(low + 4, addr >> 32)
    return out + wr(0x044, 1)


def negotiate():
    return (wr(STATUS, ACK) + wr(STATUS, ACK | DRIVER) + rd(0x010)
            + wr(0x014, 1) + rd(0x010) + wr(0x024, 1) + wr(0x020, 1)
            + wr(0x024, 0) + wr(0x020, 0) + wr(STATUS, ACK | DRIVER | FEATURES_OK)
            + rd(STATUS))


def mmio_seeds():
    # A flush at the init sequence's layout: desc 0x0, avail 0x1000, used 0x2000.
    flush = (poke(0x0000, desc(0x3000, 4, 1, 1)[:8]) + poke(0x0008, desc(0x3000, 4, 1, 1)[8:])
             + poke(0x0010, desc(0x3010, 4, 2, 0)[:8]) + poke(0x0018, desc(0x3010, 4, 2, 0)[8:])
             + poke(0x3010, b"\xff" * 8) + poke(0x1000, struct.pack("<HHHH", 0, 1, 0, 0)))
    yield "init-flush", (init(4) + flush + notify() + rd(0x060) + wr(0x064, 1)
                         + rd(0x060) + rd(0x100, 8) + rd(0x108, 8) + wr(STATUS, 0))
    yield "manual-init-flush", (rd(0x000) + rd(0x004) + rd(0x008) + rd(0x00C) + negotiate()
                                + queue_setup(16, 0, 0x1000, 0x2000)
                                + wr(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
                                + rd(STATUS) + flush + wr(NOTIFY, 0) + SERVE + rd(0x060))
    yield "bad-widths", b"".join(rd(0x070, w) + wr(0x070, 1, w) for w in (1, 2, 8)) + rd(0x072) + wr(0x071, 1)
    yield "outside-window", (rd(0xFFC, 8) + rd(0xFFE, 4) + rd(0x1000) + rd(-16)
                             + wr(0x1004, 1) + wr(-4, 1) + rd(0xFF8, 8))
    yield "config-reads", b"".join(rd(0x100 + o, w) for o in (0, 1, 4, 8, 12, 14, 15, 16)
                                   for w in (1, 2, 4, 8)) + wr(0x100, 5, 8)
    yield "status-out-of-order", (wr(STATUS, DRIVER) + wr(STATUS, DRIVER_OK | ACK | DRIVER | FEATURES_OK)
                                  + wr(STATUS, ACK) + wr(STATUS, ACK | DRIVER) + wr(STATUS, DRIVER)
                                  + wr(STATUS, ACK | DRIVER | FAILED) + wr(0x020, 1)
                                  + wr(STATUS, ACK | DRIVER | FEATURES_OK | FAILED) + rd(STATUS)
                                  + wr(STATUS, 0) + rd(STATUS))
    yield "features-refused", (wr(STATUS, ACK) + wr(STATUS, ACK | DRIVER) + wr(0x020, 1 << 3)
                               + wr(STATUS, ACK | DRIVER | FEATURES_OK) + wr(0x024, 2)
                               + wr(0x020, 1) + wr(0x024, 1) + wr(0x020, 1)
                               + wr(STATUS, ACK | DRIVER | FEATURES_OK) + rd(STATUS))
    yield "misaligned-queue", (negotiate() + queue_setup(16, 0x1001, 0x1000, 0x2000)
                               + wr(STATUS, 0xF) + rd(STATUS) + rd(0x060) + notify() + wr(STATUS, 0)
                               + negotiate() + queue_setup(16, 0, 0x1000, 0x2000) + wr(STATUS, 0xF))
    yield "queue-out-of-memory", (negotiate() + queue_setup(256, 0x3FF0, 0x1000, 0x2000)
                                  + wr(STATUS, 0xF) + rd(STATUS) + wr(STATUS, 0))
    yield "queue-above-4g", (negotiate() + queue_setup(16, 0x1_0000_0000, 0xFFFF_FFFF_FFFF_F000, 0x2000)
                             + wr(STATUS, 0xF) + rd(STATUS))
    yield "bad-queue-values", (negotiate() + wr(0x038, 0) + wr(0x038, 3) + wr(0x038, 512)
                               + wr(0x044, 7) + wr(0x030, 1) + wr(0x038, 8) + rd(0x034)
                               + rd(0x044) + wr(NOTIFY, 1) + notify(1) + wr(0x030, 0xFFFFFFFF)
                               + rd(0x034))
    yield "writes-after-driver-ok", (init(8) + wr(0x038, 8) + wr(0x044, 0) + wr(0x080, 0x2000)
                                     + wr(0x020, 0) + wr(STATUS, 0xB) + rd(STATUS) + wr(0x100, 1, 4)
                                     + rd(0x044) + init(0) + init(8))
    yield "notify-before-activation", notify() + SERVE + notify(1) + SERVE + wr(NOTIFY, 0) + SERVE
    yield "read-only-and-unknown", (wr(0x000, 0) + wr(0x034, 1) + wr(0x0F0, 1) + rd(0x0F0)
                                    + rd(NOTIFY) + rd(0x0AC) + wr(0x0AC, 3) + rd(0x0B0) + rd(0x0BC)
                                    + rd(0x0FC) + wr(0x060, 3))


# --- pmem_requests ----------------------------------------------------------

NEXT, WRITE, INDIRECT = 1, 2, 4


def req_input(size_log2, rings, layout, flags=0):
    """rings = (desc, avail, used); layout = {addr: bytes} over guest memory."""
    d, a, u = rings
    end = max(addr + len(b) for addr, b in layout.items()) if layout else 0
    image = bytearray(end)
    for addr, b in sorted(layout.items()):
        image[addr:addr + len(b)] = b
    return struct.pack("<BBHHH", size_log2, flags, d, a, u) + bytes(image)


def table(*descs):
    return b"".join(desc(*x) for x in descs)


def avail(*heads, idx=None):
    return struct.pack("<HH", 0, len(heads) if idx is None else idx) + b"".join(
        struct.pack("<H", h) for h in heads)


# Small layout: 16-entry queue, desc 0x0, avail 0x100, used 0x200, buffers from 0x300.
R = (0x000, 0x100, 0x200)
FLUSH = struct.pack("<I", 0)
ST = b"\xff\xff\xff\xff"


def req_seeds():
    good = {0x000: table((0x300, 4, NEXT, 1), (0x310, 4, WRITE, 0)), 0x100: avail(0),
            0x300: FLUSH, 0x310: ST}
    yield "good-flush", req_input(4, R, good)
    yield "good-flush-failed-writeback", req_input(4, R, good, flags=1)
    yield "good-flush-twice", req_input(4, R, good, flags=2)
    yield "descriptor-loop", req_input(4, R, {0x000: table((0x300, 4, NEXT, 1), (0x310, 4, WRITE | NEXT, 0)),
                                              0x100: avail(0), 0x300: FLUSH, 0x310: ST})
    yield "self-loop", req_input(4, R, {0x000: table((0x300, 4, NEXT, 0)), 0x100: avail(0), 0x300: FLUSH})
    yield "buffer-out-of-bounds", req_input(4, R, {
        0x000: table((0x1_0000, 4, NEXT, 1), (0x310, 4, WRITE, 0), (0xFFFE, 4, NEXT, 3),
                     (0x320, 4, WRITE, 0), (0x300, 4, NEXT, 5), (0xFFFF_FFFF_FFFF_FFFE, 4, WRITE, 0),
                     (0x300, 4, NEXT, 7), (0x330, 0x1000_0000, WRITE, 0)),
        0x100: avail(0, 2, 4, 6), 0x300: FLUSH, 0x310: ST})
    yield "rings-out-of-memory", req_input(8, (0x0, 0x100, 0xFFF0), good)
    yield "bad-avail-index", req_input(4, R, {**good, 0x100: avail(0, idx=21)})
    yield "head-out-of-range", req_input(4, R, {**good, 0x100: avail(999, 16, 0)})
    yield "next-out-of-range", req_input(4, R, {0x000: table((0x300, 4, NEXT, 999)), 0x100: avail(0), 0x300: FLUSH})
    yield "split-request-and-status", req_input(4, R, {
        0x000: table((0x300, 1, NEXT, 1), (0x301, 3, NEXT, 2), (0x310, 2, WRITE | NEXT, 3), (0x312, 8, WRITE, 0)),
        0x100: avail(0), 0x300: FLUSH, 0x310: ST})
    yield "wrong-directions", req_input(4, R, {
        0x000: table((0x300, 4, NEXT, 1), (0x310, 4, 0, 0), (0x320, 4, WRITE | NEXT, 3), (0x330, 4, WRITE, 0),
                     (0x340, 4, WRITE | NEXT, 5), (0x350, 4, 0, 0)),
        0x100: avail(0, 2, 4), 0x300: FLUSH, 0x310: ST})
    yield "unknown-type", req_input(4, R, {**good, 0x300: struct.pack("<I", 7)})
    yield "short-request-and-status", req_input(4, R, {
        0x000: table((0x300, 2, NEXT, 1), (0x310, 4, WRITE, 0), (0x320, 4, NEXT, 3), (0x330, 2, WRITE, 0),
                     (0x340, 4, NEXT, 5), (0x350, 0, WRITE, 0)),
        0x100: avail(0, 2, 4), 0x300: FLUSH, 0x310: ST})
    long_chain = table(*[(0x500, 1, NEXT, i + 1) for i in range(17)], (0x510, 4, WRITE, 0))
    yield "long-chain", req_input(5, (0x000, 0x200, 0x300), {0x000: long_chain, 0x200: avail(0), 0x500: FLUSH})
    many = table(*[(0x400 + 16 * i, 4, NEXT if i % 2 == 0 else WRITE, i + 1 if i % 2 == 0 else 0)
                   for i in range(16)])
    yield "eight-requests", req_input(4, R, {0x000: many, 0x100: avail(*range(0, 16, 2))}, flags=1)
    # Avail ring first, so the image stays small (memory past it is zero).
    yield "full-queue-256", req_input(8, (0x210, 0x2, 0x2000), {
        0x2: avail(*([0] * 256)), 0x210: table((0x240, 4, NEXT, 1), (0x250, 4, WRITE, 0)), 0x250: ST})
    yield "queue-of-one", req_input(0, (0x0, 0x10, 0x20), {0x0: table((0x40, 8, WRITE, 0)), 0x10: avail(0)})
    yield "status-into-rings", req_input(4, R, {
        0x000: table((0x300, 4, NEXT, 1), (0x102, 2, WRITE | NEXT, 2), (0x0, 2, WRITE, 0)),
        0x100: avail(0), 0x300: FLUSH})
    yield "overlapping-rings", req_input(4, (0x0, 0x0, 0x80), good)
    # Fails until the device refuses VRING_DESC_F_INDIRECT (not offered).
    yield "indirect-descriptor", req_input(4, R, {
        0x000: table((0x380, 32, INDIRECT, 0)), 0x100: avail(0),
        0x380: table((0x300, 4, NEXT, 1), (0x310, 4, WRITE, 0)), 0x300: FLUSH, 0x310: ST})
    yield "empty", b""


# --- pmem_options -----------------------------------------------------------

OPTIONS = [
    "file=/var/lib/pmemvm/pmem0.img,size=2M",
    "file=disk.img",
    "file=x,size=512MiB,readonly=on",
    "file=x,discard_writes=on,engine=prefault",
    "file=x,engine=uffd,populate=512",
    "file=x,engine=uffd,populate=0",
    "file=x,readonly=on,discard_writes=on",
    "file=,size=2M",
    "size=2M",
    "file=x,file=y",
    "file=x,bogus=1",
    "file=x,size=99999999999T",
    "file=x,size=1.5G",
    "file=a=b,size=00002m",
    "file=x,populate=16",
    "file=x,readonly=yes",
    "file=x,engine=kernel,readonly=off,discard_writes=off,size=4096",
    "file=x,",
    "4096",
    " 1T ",
    "64k",
    "512mib",
    "0x10",
    "-1",
    "18446744073709551615",
    "16383T",
    "",
]


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def main():
    for name, data in mmio_seeds():
        write("mmio_registers", name, data)
    for name, data in req_seeds():
        write("pmem_requests", name, data)
    for i, s in enumerate(OPTIONS):
        write("pmem_options", "%02d" % i, s.encode())


if __name__ == "__main__":
    main()
