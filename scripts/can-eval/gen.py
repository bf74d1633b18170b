#!/usr/bin/env python3
"""Labelled CAN evaluation traces from real DBCs (issue 12, acceptance point 2).

Normal traffic: the messages of a real DBC (the PyPI package `opendbc`, or any DBC file),
encoded with `cantools`, sent by their transmitter ECUs with realistic periods (the DBC's
GenMsgCycleTime where present, else 10/20/50/100/1000 ms), per-ECU clock drift and task
jitter, rolling counters and checksums where the DBC has counter/checksum signals, and
physical signals driven by one simulated drive (vehicle speed, wheel speeds consistent with
it, engine speed by gear, pedal, brake, steering, yaw rate); other signals are constant,
toggle rarely or wander smoothly within a part of their range. Frames go through a
500 kbit/s bus model: each frame's bit time with its real stuff bits (CRC-15 included), the
bus idle between frames, arbitration by identifier when several are pending; the receive
timestamp is the end of the frame.

The vehicle (which messages, periods, ECU phases, drift, jitter, checksum algorithms,
signal ranges) is a function of the DBC alone (or --vehicle-seed); the drive and the attacks
are functions of --seed. So a profile learned on one seed applies to another.

Attacks (labels per frame; windows for every attack):
  dos          id 0x000, 8 zero bytes, every 0.3 ms (HCRL)
  fuzzy        random standard id, random DLC and data, every 0.5 ms (HCRL)
  spoofing     a known id every 1 ms with one fixed payload (a genuine one, one signal set) (HCRL)
  fabrication  a known id's frames injected between the genuine ones, one signal changed,
               counter and checksum valid (ROAD targeted fabrication)
  masquerade   the genuine ECU's frames of an id suppressed; the attacker sends at the same
               period (own phase and clock) with valid counters and checksums and one
               signal offset (ROAD masquerade)
  replay       genuine frames of an id recorded earlier re-sent later, same relative timing
  dlc          frames of a known id with a DLC it never has
  range        the genuine ECU's frames of an id with one signal out of its range

Output: a candump -L log (`--log`) and a JSON labels file (`--labels`):
  {"dbc", "seed", "frames": ["normal" | kind, ... one per log line],
   "windows": [{"kind", "id", "start", "end"}], "ids": {...}}
`--dbc-out` writes the DBC text used (opendbc's generated DBCs are not files).

Usage:
  gen.py --list
  gen.py --dbc toyota_nodsu_pt_generated --seed 1 --duration 60 --attacks none \
         --log train.log --labels train.json --dbc-out car.dbc
  gen.py --dbc toyota_nodsu_pt_generated --seed 2 --duration 60 --attacks all \
         --log test.log --labels test.json
"""

import argparse
import hashlib
import heapq
import json
import math
import os
import random
import re
import sys

try:
    import cantools
except ImportError:  # pragma: no cover
    sys.exit("gen.py: needs cantools and opendbc: python3 -m pip install --user "
             "cantools==45.1.0 opendbc==0.3.1")

ALL_ATTACKS = ["dos", "fuzzy", "spoofing", "fabrication", "masquerade", "replay", "dlc",
               "range"]
BITRATE = 500_000


# ------------------------------------------------------------------------------------------
# DBCs

def opendbc_dir():
    try:
        import opendbc
    except ImportError:
        sys.exit("gen.py: needs opendbc: python3 -m pip install --user opendbc==0.3.1")
    return os.path.join(os.path.dirname(opendbc.__file__), "dbc")


def opendbc_texts():
    """name -> DBC text, the files shipped and the ones opendbc generates."""
    d = opendbc_dir()
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".dbc"):
            with open(os.path.join(d, f), encoding="utf-8", errors="replace") as fh:
                out[f[:-4]] = fh.read()
    try:
        from opendbc.dbc.generator.generator import generate_all
        out.update(generate_all())
    except Exception as e:  # the generated ones are a bonus
        print(f"gen.py: opendbc generator unavailable: {e}", file=sys.stderr)
    return out


def sanitize(text):
    """The DBC as cantools reads it: real DBCs (opendbc's) are not all by the book. Comments
    and value descriptions go (the generator needs neither; cantools is strict about
    them); an id over 11 bits without the extended flag gets it; names that start with a
    digit get a prefix; `.25` becomes `0.25`; pseudo-messages (bit 30 of the id) go."""
    lines = text.replace("\r\n", "\n").split("\n")
    ids = {}
    for l in lines:
        m = re.match(r"\s*BO_ (\d+) ", l)
        if m:
            raw = int(m.group(1))
            if raw & 0x40000000:
                ids[raw] = None
            elif not raw & 0x80000000 and raw > 0x7FF:
                ids[raw] = raw | 0x80000000
    out, i, skip = [], 0, False
    while i < len(lines):
        l = lines[i]
        st = l.lstrip()
        if st.startswith(("CM_ ", "VAL_ ", "VAL_TABLE_ ", "SIG_VALTYPE_ ")):
            stmt = l
            while stmt.count('"') % 2 == 1 and i + 1 < len(lines):
                i += 1
                stmt += "\n" + lines[i]
            i += 1
            continue
        m = re.match(r"(\s*BO_ )(\d+)( +)(\w+)(\s*:.*)", l)
        if m:
            raw = int(m.group(2))
            skip = raw in ids and ids[raw] is None
            if skip:
                i += 1
                continue
            name = m.group(4)
            if name[0].isdigit():
                name = "M_" + name
            l = m.group(1) + str(ids.get(raw, raw)) + m.group(3) + name + m.group(5)
        elif st.startswith("SG_ "):
            if skip:
                i += 1
                continue
            m = re.match(r"(\s*SG_ )(\w+)(.*)", l)
            if m and m.group(2)[0].isdigit():
                l = m.group(1) + "S_" + m.group(2) + m.group(3)
        elif st == "":
            skip = False
        else:
            for kw in ("BO_ ", "SG_ ", "BO_TX_BU_ "):
                def sub(m):
                    raw = int(m.group(2))
                    v = ids.get(raw, raw)
                    return m.group(1) + str(v if v is not None else raw)
                l = re.sub(r"(\b" + kw + r")(\d+)", sub, l)
        l = re.sub(r"([(\[,|])(-?)\.(\d)", r"\g<1>\g<2>0.\3", l)
        out.append(l)
        i += 1
    return "\n".join(out)


def load(spec):
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        name = os.path.basename(spec).rsplit(".", 1)[0]
    else:
        texts = opendbc_texts()
        name = spec[:-4] if spec.endswith(".dbc") else spec
        if name not in texts:
            sys.exit(f"gen.py: no DBC {spec!r} (a file, or an opendbc name: --list)")
        text = texts[name]
    text = sanitize(text)
    db = cantools.database.load_string(text, database_format="dbc", strict=False)
    return name, text, db


def usable(m):
    if not (0 < m.length <= 8 and m.signals and not m.is_multiplexed()
            and not getattr(m, "is_container", False)):
        return False
    try:  # a signal past the message's end (a DBC error) does not encode
        m.encode({s.name: (1 << s.length) - 1 if not s.is_signed else -1 for s in m.signals},
                 scaling=False, padding=False, strict=False)
    except Exception:
        return False
    return True


# ------------------------------------------------------------------------------------------
# Bus: bit time of a classic frame with its actual stuff bits

def crc15(bits):
    crc = 0
    for b in bits:
        nxt = b ^ ((crc >> 14) & 1)
        crc = (crc << 1) & 0x7FFF
        if nxt:
            crc ^= 0x4599
    return crc


def frame_bits(can_id, extended, data):
    if extended:
        bits = [0] + [(can_id >> (28 - i)) & 1 for i in range(11)] + [1, 1] + \
               [(can_id >> (17 - i)) & 1 for i in range(18)] + [0, 0, 0]
    else:
        bits = [0] + [(can_id >> (10 - i)) & 1 for i in range(11)] + [0, 0, 0]
    n = len(data)
    bits += [(n >> (3 - i)) & 1 for i in range(4)]
    for byte in data:
        bits += [(byte >> (7 - i)) & 1 for i in range(8)]
    c = crc15(bits)
    bits += [(c >> (14 - i)) & 1 for i in range(15)]
    stuff, run, last = 0, 0, None
    for b in bits:
        if b == last:
            run += 1
            if run == 5:
                stuff += 1
                last = 1 - b
                run = 1
                continue
        else:
            last, run = b, 1
    # CRC delimiter, ACK slot and delimiter, EOF (7), intermission (3).
    return len(bits) + stuff + 1 + 2 + 7 + 3


def arbitration_key(can_id, extended):
    if extended:
        return (can_id >> 18, 1, can_id & 0x3FFFF)
    return (can_id, 0, 0)


# ------------------------------------------------------------------------------------------
# Checksums (families real ECUs use; the detector learns which one from the data)

def ck_sum_id(data, can_id):
    s = len(data) + sum(data) + (can_id & 0xFF) + ((can_id >> 8) & 0xFF) + \
        ((can_id >> 16) & 0xFF) + ((can_id >> 24) & 0xFF)
    return s & 0xFF


def ck_xor(data, can_id):
    x = 0
    for b in data:
        x ^= b
    return x


def crc8(poly):
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = ((c << 1) ^ poly) & 0xFF if c & 0x80 else (c << 1) & 0xFF
        table.append(c)

    def f(data, can_id):
        c = 0xFF
        for b in data:
            c = table[c ^ b]
        return c ^ 0xFF
    return f


def ck_nibble(data, can_id):
    s = 0
    for v in [can_id] + list(data):
        while v:
            s += v & 0xF
            v >>= 4
    return (-s) & 0xF


CHECKSUMS = {"sum_id": ck_sum_id, "xor": ck_xor, "crc8_j1850": crc8(0x1D),
             "crc8_autosar": crc8(0x2F), "nibble": ck_nibble}
MAKE_CHECKSUM = {"toyota": "sum_id", "lexus": "sum_id", "vw": "crc8_autosar",
                 "hyundai": "crc8_j1850", "kia": "crc8_j1850", "honda": "nibble",
                 "acura": "nibble", "subaru": "sum_id", "chrysler": "crc8_j1850",
                 "gm": "xor", "tesla": "sum_id", "nissan": "crc8_j1850"}

COUNTER_RE = re.compile(r"COUNTER|CNT\b|_CNT|ALIVE|ROLLING|_BZ$|^BZ|ZAEHLER|SEQ", re.I)
CHECKSUM_RE = re.compile(r"CHECKSUM|CHKSUM|CHK_SUM|_CRC|^CRC|CRC$|_CS$|PARITY", re.I)

FAMILIES = [
    ("wheel", re.compile(r"(WHEEL|WHL|WHEEL_SPEED|RAD).*(SPEED|SPD|GESCHW)|WHEEL_?SPEED|WHL_?SPD", re.I)),
    ("speed", re.compile(r"VEH.*(SPEED|SPD)|VEHICLE_?SPEED|^SPEED$|_SPEED$|SPEED_?KPH|"
                         r"GESCHWINDIGKEIT|XSPEED|^SPD", re.I)),
    ("rpm", re.compile(r"RPM|ENGINE_?SPEED|ENG_?SPD|DREHZAHL", re.I)),
    ("steer", re.compile(r"STEER.*ANGLE|STEERING_?ANGLE|SAS_?ANGLE|LENKWINKEL", re.I)),
    ("yaw", re.compile(r"YAW", re.I)),
    ("pedal", re.compile(r"ACCEL.*PED|GAS_?PEDAL|THROTTLE|PEDAL_?POS|FAHRPEDAL", re.I)),
    ("brake", re.compile(r"BRAKE.*PRESS|BRK.*PRES|BREMSDRUCK", re.I)),
]
EXCLUDE_RE = re.compile(r"LIMIT|SET|CRUISE|TARGET|REQ|CMD|MAX|MIN|DESIRED|ACC_|LKA|ALLOW", re.I)


class Drive:
    """One drive: vehicle speed with stops and limited acceleration, gear and engine speed,
    pedal, brake, steering and yaw rate, on a 10 ms grid."""

    def __init__(self, rnd, duration):
        n = int(duration * 100) + 2
        self.speed, self.rpm, self.pedal, self.brake, self.steer, self.yaw = ([] for _ in range(6))
        v, target, hold, steer_phase = rnd.uniform(10, 60), 50.0, 0.0, rnd.uniform(0, 6.28)
        sa, sb = rnd.uniform(0.05, 0.2), rnd.uniform(0.3, 0.9)
        for i in range(n):
            t = i / 100
            if hold <= 0:
                target = 0.0 if rnd.random() < 0.2 else rnd.uniform(15, 120)
                hold = rnd.uniform(6, 18)
            hold -= 0.01
            a = max(-3.0, min(2.0, (target - v) / 3.6 * 0.5))
            v = max(0.0, v + a * 3.6 * 0.01)
            gear = 1 + sum(v > x for x in (15, 30, 50, 70, 90))
            ratio = {1: 110, 2: 62, 3: 42, 4: 32, 5: 26, 6: 22}[gear]
            self.speed.append(v)
            self.rpm.append(max(750.0, v * ratio))
            self.pedal.append(max(0.0, min(100.0, 12 + a * 25)) if a > -0.2 else 0.0)
            self.brake.append(max(0.0, -a * 30) if a < -0.2 else 0.0)
            amp = 90 / (1 + v / 20)
            st = amp * (math.sin(sa * t + steer_phase) * 0.7 + math.sin(sb * t) * 0.3)
            self.steer.append(st)
            self.yaw.append(v / 3.6 * math.radians(st / 15) / 2.7 * 57.3)

    def at(self, arr, t):
        i = t * 100
        k = int(i)
        if k + 1 >= len(arr):
            return arr[-1]
        f = i - k
        return arr[k] * (1 - f) + arr[k + 1] * f


def unit_scale_speed(sig):
    u = (sig.unit or "").lower()
    if "m/s" in u or "meterprosekunde" in u or "meterpersecond" in u:
        return 1 / 3.6
    if "mph" in u or "mile" in u:
        return 1 / 1.609
    return 1.0


class Signal:
    def __init__(self, sig, vrng):
        self.s = sig
        self.name = sig.name
        lo = sig.minimum if sig.minimum is not None else None
        hi = sig.maximum if sig.maximum is not None else None
        raw_lo = -(1 << (sig.length - 1)) if sig.is_signed else 0
        raw_hi = (1 << (sig.length - 1)) - 1 if sig.is_signed else (1 << sig.length) - 1
        plo, phi = sorted((raw_lo * sig.scale + sig.offset, raw_hi * sig.scale + sig.offset))
        if lo is None or hi is None or hi <= lo:
            lo, hi = plo, phi
        self.lo, self.hi = max(lo, plo), min(hi, phi)
        self.phys_lo, self.phys_hi = plo, phi
        name = sig.name
        self.role = "other"
        self.kind = "const"
        self.const = self.lo
        if sig.length >= 2 and sig.length <= 8 and COUNTER_RE.search(name):
            self.role = "counter"
        elif sig.length in (4, 8) and CHECKSUM_RE.search(name):
            self.role = "checksum"
        elif sig.length >= 6 and not sig.choices and not EXCLUDE_RE.search(name):
            for fam, rx in FAMILIES:
                if rx.search(name):
                    self.role = fam
                    break
        if self.role == "other":
            if sig.length == 1:
                self.kind = "toggle" if vrng.random() < 0.3 else "const"
            elif sig.choices or sig.length < 4:
                self.kind = "const"
            else:
                self.kind = "wander" if vrng.random() < 0.6 else "const"
            span = self.hi - self.lo
            c = vrng.uniform(0.2, 0.6)
            w = vrng.uniform(0.1, 0.35)
            self.a = self.lo + span * max(0.0, c - w / 2)
            self.b = self.lo + span * min(1.0, c + w / 2)
            self.const = self.lo + span * vrng.uniform(0.0, 0.5)
            if sig.choices:
                self.const = sorted(sig.choices)[0]
            self.freqs = [vrng.uniform(0.05, 0.5), vrng.uniform(0.2, 1.5)]
            self.dwell = vrng.uniform(3, 20)
        self.wheel_k = 1 + vrng.uniform(-0.01, 0.01)

    def value(self, t, drive, phases):
        r = self.role
        if r in ("speed", "wheel"):
            v = drive.at(drive.speed, t) * unit_scale_speed(self.s)
            if r == "wheel":
                v *= self.wheel_k
            return v
        if r == "rpm":
            return drive.at(drive.rpm, t)
        if r == "steer":
            return drive.at(drive.steer, t)
        if r == "yaw":
            return drive.at(drive.yaw, t)
        if r == "pedal":
            return drive.at(drive.pedal, t)
        if r == "brake":
            return drive.at(drive.brake, t)
        if self.kind == "const":
            return self.const
        if self.kind == "toggle":
            return float(int((t + phases[0] * self.dwell) / self.dwell) % 2)
        x = 0.5 + 0.3 * math.sin(self.freqs[0] * t + phases[0]) + \
            0.2 * math.sin(self.freqs[1] * t + phases[1])
        return self.a + (self.b - self.a) * x


def clamp_phys(sig, v):
    return max(sig.phys_lo, min(sig.phys_hi, max(sig.lo, min(sig.hi, v))))


class Msg:
    def __init__(self, m, vrng, make):
        self.m = m
        self.id = m.frame_id
        self.ext = m.is_extended_frame
        self.name = m.name
        self.length = m.length
        ct = m.cycle_time
        if ct and 5 <= ct <= 5000:
            self.period = ct / 1000
        else:
            self.period = vrng.choices([0.01, 0.02, 0.05, 0.1, 1.0], [3, 3, 3, 4, 1])[0]
        self.sender = m.senders[0] if m.senders and m.senders[0] not in ("XXX", "Vector__XXX") \
            else None
        self.signals = [Signal(s, vrng) for s in m.signals]
        self.counter = next((s for s in self.signals if s.role == "counter"), None)
        self.checksum = next((s for s in self.signals if s.role == "checksum"), None)
        if self.checksum is not None:
            alg = "nibble" if self.checksum.s.length == 4 else MAKE_CHECKSUM.get(
                make, vrng.choice(["sum_id", "xor", "crc8_j1850", "crc8_autosar"]))
            self.ck = CHECKSUMS[alg]
            self.ck_name = alg
        self.phases = [vrng.uniform(0, 6.28), vrng.uniform(0, 6.28)]

    def physical(self):
        return [s for s in self.signals if s.role in ("speed", "wheel", "rpm", "steer", "yaw",
                                                      "pedal", "brake") or
                (s.role == "other" and s.kind == "wander")]

    def encode(self, values, counter):
        """The payload: physical values to raw ones (rounded, clamped to what the field
        holds), the counter, and the checksum over the payload with its field cleared."""
        raw = {}
        for s in self.signals:
            sig = s.s
            lo = -(1 << (sig.length - 1)) if sig.is_signed else 0
            hi = (1 << (sig.length - 1)) - 1 if sig.is_signed else (1 << sig.length) - 1
            if s.role == "counter":
                mod = hi - lo + 1
                if s.hi > s.lo and s.hi < hi and sig.scale == 1 and sig.offset == 0:
                    mod = int(s.hi) + 1
                v = counter % mod
                raw[s.name] = v if v <= hi else v - (hi - lo + 1)
            elif s.role == "checksum":
                raw[s.name] = 0
            else:
                v = values[s.name]
                v = clamp_phys(s, v) if not getattr(s, "unclamped", False) else v
                r = int(round((v - sig.offset) / sig.scale)) if sig.scale else 0
                raw[s.name] = max(lo, min(hi, r))
        data = bytearray(self.m.encode(raw, scaling=False, padding=False, strict=False))
        if self.checksum is not None:
            c = self.ck(bytes(data), self.id) & ((1 << self.checksum.s.length) - 1)
            if self.checksum.s.is_signed and c >= 1 << (self.checksum.s.length - 1):
                c -= 1 << self.checksum.s.length
            raw[self.checksum.name] = c
            data = bytearray(self.m.encode(raw, scaling=False, padding=False, strict=False))
        return bytes(data)

    def values(self, t, drive):
        return {s.name: s.value(t, drive, self.phases) for s in self.signals}


# ------------------------------------------------------------------------------------------
# The trace

def pick_target(msgs, rnd, want_family=False, max_period=0.1, avoid=()):
    cands = [m for m in msgs if m.period <= max_period and m.physical() and m.id not in avoid]
    if want_family:
        fam = {}
        for m in msgs:
            for s in m.physical():
                if s.role != "other":
                    fam.setdefault(s.role, set()).add(m.id)
        good = [m for m in cands
                if any(s.role != "other" and len(fam.get(s.role, ())) >= 2 for s in m.physical())]
        if good:
            cands = good
    if not cands:
        cands = [m for m in msgs if m.period <= 1.0 and m.id not in avoid] or msgs
    return rnd.choice(sorted(cands, key=lambda m: m.id))


def target_signal(m, rnd):
    phys = m.physical()
    fam = [s for s in phys if s.role != "other"]
    return rnd.choice(fam or phys) if (fam or phys) else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dbc", help="a DBC file or an opendbc name (see --list)")
    ap.add_argument("--list", action="store_true", help="list the opendbc DBCs that load")
    ap.add_argument("--dump-dbcs", metavar="DIR",
                    help="write every opendbc DBC (shipped and generated) into DIR")
    ap.add_argument("--seed", type=int, default=1, help="the drive and the attacks")
    ap.add_argument("--vehicle-seed", default=None,
                    help="the vehicle (default: from the DBC's name)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    ap.add_argument("--attacks", default="all",
                    help="comma-separated kinds, 'all' or 'none': " + ",".join(ALL_ATTACKS))
    ap.add_argument("--attack-duration", type=float, default=1.0, help="seconds per attack")
    ap.add_argument("--masquerade-windows", type=int, default=2)
    ap.add_argument("--max-ids", type=int, default=40, help="messages of the DBC on the bus")
    ap.add_argument("--iface", default="can0")
    ap.add_argument("--start", type=float, default=1_700_000_000.0, help="first timestamp")
    ap.add_argument("--log", help="candump -L output")
    ap.add_argument("--labels", help="JSON labels output")
    ap.add_argument("--dbc-out", help="write the DBC text used here")
    a = ap.parse_args()

    if a.list:
        for name, text in sorted(opendbc_texts().items()):
            try:
                db = cantools.database.load_string(sanitize(text), database_format="dbc",
                                                   strict=False)
                n = sum(1 for m in db.messages if usable(m))
                print(f"{name}\t{n} usable messages")
            except Exception as e:
                print(f"{name}\tdoes not load: {str(e).splitlines()[0][:60]}")
        return
    if a.dump_dbcs:
        os.makedirs(a.dump_dbcs, exist_ok=True)
        for name, text in sorted(opendbc_texts().items()):
            with open(os.path.join(a.dump_dbcs, name + ".dbc"), "w", encoding="utf-8") as fh:
                fh.write(text)
        return
    if not a.dbc or not a.log or not a.labels:
        ap.error("--dbc, --log and --labels are needed")
    attacks = ALL_ATTACKS if a.attacks == "all" else [] if a.attacks == "none" else \
        [x.strip() for x in a.attacks.split(",") if x.strip()]
    for k in attacks:
        if k not in ALL_ATTACKS:
            ap.error(f"unknown attack {k!r}: {','.join(ALL_ATTACKS)}")

    name, text, db = load(a.dbc)
    if a.dbc_out:
        with open(a.dbc_out, "w", encoding="utf-8") as fh:
            fh.write(text)
    vseed = a.vehicle_seed if a.vehicle_seed is not None else name
    vrng = random.Random(int(hashlib.sha256(str(vseed).encode()).hexdigest()[:16], 16))
    rnd = random.Random(a.seed)
    make = name.split("_")[0].lower()

    ms = sorted((m for m in db.messages if usable(m)), key=lambda m: m.frame_id)
    if not ms:
        sys.exit(f"gen.py: {name}: no usable messages")
    ms = sorted(vrng.sample(ms, min(a.max_ids, len(ms))), key=lambda m: m.frame_id)
    msgs = [Msg(m, vrng, make) for m in ms]
    # Bus load of the normal traffic at most 40 %: slow the busiest messages down.
    while True:
        load_ = sum((60 + 10 * m.length) / m.period for m in msgs) / BITRATE
        if load_ <= 0.40:
            break
        busiest = min(msgs, key=lambda m: m.period)
        busiest.period *= 2
    # ECUs: the DBC's transmitter, else groups of up to six messages.
    ecus = {}
    for i, m in enumerate(msgs):
        key = m.sender or f"ECU{i % max(1, (len(msgs) + 5) // 6)}"
        m.ecu = key
        ecus.setdefault(key, {"drift": vrng.uniform(-100e-6, 100e-6),
                              "jitter": vrng.uniform(10e-6, 60e-6)})
    for m in msgs:
        m.offset = vrng.uniform(0, m.period)

    drive = Drive(rnd, a.duration + 2)
    dur = a.duration

    # Attack windows: after 3 s of warm-up, spread with gaps, in a seeded order.
    kinds = []
    for k in attacks:
        kinds += [k] * (a.masquerade_windows if k == "masquerade" else 1)
    rnd.shuffle(kinds)
    windows = []
    if kinds:
        slot = (dur - 4.0) / len(kinds)
        if slot < a.attack_duration + 1.0:
            sys.exit(f"gen.py: {dur} s is too short for {len(kinds)} attacks of "
                     f"{a.attack_duration} s (need {4 + len(kinds) * (a.attack_duration + 1):.0f})")
        for i, k in enumerate(kinds):
            s = 3.0 + i * slot + rnd.uniform(0.5, slot - a.attack_duration - 0.5)
            windows.append({"kind": k, "start": s, "end": s + a.attack_duration})

    # Ready events: (ready time, arbitration key, seq, id, ext, data, label)
    events = []
    seq = 0

    def push(t, can_id, ext, data, label):
        nonlocal seq
        if 0 <= t < dur:
            events.append((t, arbitration_key(can_id, ext), seq, can_id, ext, bytes(data), label))
            seq += 1

    # Per-window settings.
    used = set()
    for w in windows:
        k = w["kind"]
        if k in ("dos", "fuzzy"):
            w["id"] = None
            continue
        tgt = pick_target(msgs, rnd, want_family=(k == "masquerade"),
                          max_period=0.1 if k != "dlc" else 1.0, avoid=used)
        used.add(tgt.id)
        w["id"] = tgt.id
        w["msg"] = tgt
        w["sig"] = target_signal(tgt, rnd)

    def active(m, t, kinds_):
        for w in windows:
            if w.get("msg") is m and w["kind"] in kinds_ and w["start"] <= t < w["end"]:
                return w
        return None

    # Genuine traffic (with the compromised-ECU attacks applied to it).
    history = {}
    for m in msgs:
        e = ecus[m.ecu]
        k, counter = 0, vrng.randrange(0, 16)
        hist = history.setdefault(m.id, [])
        while True:
            nominal = (m.offset + k * m.period) * (1 + e["drift"])
            t = nominal + max(-3, min(3, rnd.gauss(0, 1))) * e["jitter"]
            if t >= dur:
                break
            k += 1
            counter += 1
            vals = m.values(t, drive)
            label = "normal"
            w = active(m, t, ("masquerade",))
            if w is not None:
                w.setdefault("counter_at", counter)
                continue  # the genuine ECU is silenced
            w = active(m, t, ("range",))
            if w is not None and w["sig"] is not None:
                s = w["sig"]
                span = max(s.b - s.a, 1e-9) if s.role == "other" else max(s.hi - s.lo, 1e-9)
                high = s.phys_hi
                low = s.phys_lo
                v = high if high - s.hi > 0 or (high - vals[s.name]) > 0.5 * span else low
                vals[s.name] = v
                # Beyond the DBC's range where the raw range allows, else at the raw extreme.
                s.unclamped = True
                data = m.encode(vals, counter)
                s.unclamped = False
                push(t, m.id, m.ext, data, "range")
                continue
            data = m.encode(vals, counter)
            hist.append((t, data))
            push(t, m.id, m.ext, data, label)

    # Injected attacks.
    for w in windows:
        k, s0, s1 = w["kind"], w["start"], w["end"]
        if k == "dos":
            t = s0
            while t < s1:
                push(t, 0x000, False, bytes(8), "dos")
                t += 0.0003
        elif k == "fuzzy":
            t = s0
            while t < s1:
                n = rnd.randint(0, 8)
                push(t, rnd.randrange(0, 0x800), False,
                     bytes(rnd.randrange(256) for _ in range(n)), "fuzzy")
                t += 0.0005
        elif k == "spoofing":
            m, s = w["msg"], w["sig"]
            vals = m.values(s0, drive)
            if s is not None:
                vals[s.name] = s.hi if s.role != "other" else s.b + (s.hi - s.b) * 0.5
            data = m.encode(vals, rnd.randrange(0, 256))
            t = s0
            while t < s1:
                push(t, m.id, m.ext, data, "spoofing")
                t += 0.001
        elif k == "fabrication":
            m, s = w["msg"], w["sig"]
            gen = [(t, d) for t, d in history[m.id] if s0 <= t < s1]
            for i, (t, _) in enumerate(gen):
                ti = t + m.period * rnd.uniform(0.3, 0.7)
                vals = m.values(ti, drive)
                if s is not None:
                    span = (s.hi - s.lo) if s.role != "other" else (s.b - s.a)
                    vals[s.name] = vals[s.name] + 0.3 * span
                push(ti, m.id, m.ext, m.encode(vals, i + 1000), "fabrication")
        elif k == "masquerade":
            m, s = w["msg"], w["sig"]
            counter = w.get("counter_at", 0)
            period = m.period * (1 + rnd.uniform(-200e-6, 200e-6))
            t = s0 + rnd.uniform(0, m.period)
            while t < s1:
                vals = m.values(t, drive)
                if s is not None:
                    span = (s.hi - s.lo) if s.role != "other" else (s.b - s.a)
                    if s.role in ("speed", "wheel"):
                        vals[s.name] = vals[s.name] + 25 * unit_scale_speed(s.s)
                    else:
                        vals[s.name] = vals[s.name] + 0.25 * span
                push(t + rnd.gauss(0, 30e-6), m.id, m.ext, m.encode(vals, counter), "masquerade")
                counter += 1
                t += period
        elif k == "replay":
            m = w["msg"]
            rec = [(t, d) for t, d in history[m.id] if s0 - 2.0 - a.attack_duration <= t < s0 - 2.0]
            if rec:
                shift = s0 + rnd.uniform(0.2, 0.8) * m.period - rec[0][0]
                for t, d in rec:
                    push(t + shift, m.id, m.ext, d, "replay")
        elif k == "dlc":
            m = w["msg"]
            t = s0 + m.period * 0.5
            step = min(m.period, 0.02)
            while t < s1:
                n = rnd.choice([x for x in range(9) if x != m.length])
                push(t, m.id, m.ext, bytes(rnd.randrange(256) for _ in range(n)), "dlc")
                t += step

    # The bus: the lowest identifier among the pending frames wins; one frame at a time.
    # A controller holds one pending frame per identifier: a newer one replaces it (the
    # older is never sent), so a flood delays frames but leaves no stale backlog. The ECU
    # and the attacker are separate controllers.
    events.sort()
    out = []
    pending = []
    current = {}
    i, bus_free = 0, 0.0
    n = len(events)
    while i < n or pending:
        if not pending:
            bus_free = max(bus_free, events[i][0])
        while i < n and events[i][0] <= bus_free:
            ev = events[i]
            src = "ecu" if ev[6] in ("normal", "range") else "attacker"
            current[(src, ev[3], ev[4])] = ev[2]
            heapq.heappush(pending, (ev[1], ev[0], ev[2], ev))
            i += 1
        _, _, _, ev = heapq.heappop(pending)
        src = "ecu" if ev[6] in ("normal", "range") else "attacker"
        if current.get((src, ev[3], ev[4])) != ev[2]:
            if not pending and i >= n:
                break
            continue
        _, _, _, can_id, ext, data, label = ev
        end = bus_free + frame_bits(can_id, ext, data) / BITRATE
        bus_free = end
        out.append((end, can_id, ext, data, label))

    with open(a.log, "w") as fh:
        for t, can_id, ext, data, _ in out:
            ids = f"{can_id:08X}" if ext else f"{can_id:03X}"
            fh.write(f"({a.start + t:.6f}) {a.iface} {ids}#{data.hex().upper()}\n")
    labels = {
        "dbc": name,
        "seed": a.seed,
        "duration": dur,
        "frames": [x[4] for x in out],
        "windows": [{"kind": w["kind"], "id": w.get("id"), "start": a.start + w["start"],
                     "end": a.start + w["end"]} for w in windows],
        "ids": {f"{m.id:#x}": {"name": m.name, "period_ms": round(m.period * 1000, 3),
                               "ecu": m.ecu, "counter": m.counter.name if m.counter else None,
                               "checksum": m.ck_name if m.checksum else None}
                for m in msgs},
        "bus_load": round(sum(frame_bits(c, e, d) for _, c, e, d, _ in out) / BITRATE / dur, 4),
    }
    with open(a.labels, "w") as fh:
        json.dump(labels, fh)
    counts = {}
    for x in out:
        counts[x[4]] = counts.get(x[4], 0) + 1
    print(f"{name}: {len(out)} frames, {len(msgs)} ids, bus load {labels['bus_load']:.0%}, "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=sys.stderr)


if __name__ == "__main__":
    main()
