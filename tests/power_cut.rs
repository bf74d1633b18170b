//! Crash consistency of the uplink queue, the xfstests way (issue 10): in a QEMU guest
//! (`scripts/vm.sh`) the real gateway keeps its store on ext4 over a dm-log-writes device
//! while a client publishes QoS 1 messages; after every batch of PUBACKs the guest writes a
//! mark `ack-N` into the log. On the host the log is replayed to every mark and to (a
//! sample of) the flush and FUA entries: each image is what a power cut at that moment
//! leaves on the disk. A second guest boot checks every image: e2fsck, mount, the store
//! opens, and every message acknowledged before that point is in the uplink queue.
//!
//! Each batch also sets one retained message (`state/bN`, QoS 1) and sends two QoS 1
//! commands to a persistent session that is away (issue 11): at every point, every
//! acknowledged retained message and queued command is in the store too.
//!
//! The cloud is unreachable (nothing listens on its port), so nothing leaves the queue.

mod cloud;
mod common;
mod vm;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vm::logwrites::{Log, MARK};

/// The logged device (ext4, made on the host).
const DEV_BYTES: u64 = 32 << 20;
/// Room for the log: every write of the run plus one header sector each.
const LOG_BYTES: u64 = 1 << 30;
const BATCHES: u64 = 10;
const PER_BATCH: u64 = 20;
/// Most replay points checked; every mark is always among them.
const MAX_POINTS: usize = 24;
const DATA_DIR: &str = "/mnt/data";
const TOPIC: &str = "devices/pub/telemetry/seq";
/// The persistent session's command topic, and commands per batch.
const CMD_TOPIC: &str = "cmd/sess";
const CMDS_PER_BATCH: u64 = 2;

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("start command");
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_acked_message_survives_a_power_cut_at_every_flush_and_mark() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);

    // The device, with ext4 made on the host; `base.img` keeps it as it was before the run.
    File::create(p("data.img"))
        .unwrap()
        .set_len(DEV_BYTES)
        .unwrap();
    run(Command::new(vm::host_tool("mkfs.ext4"))
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(p("data.img")));
    std::fs::copy(p("data.img"), p("base.img")).unwrap();
    File::create(p("log.img"))
        .unwrap()
        .set_len(LOG_BYTES)
        .unwrap();

    let mut pki = cloud::CloudPki::new(&p("pki"));
    let (cert, key) = pki.issue("gw-test", false);
    let uplink = "[uplink]\nenabled = true\nhost = \"127.0.0.1\"\nport = 9\n\
                  ca_file = \"/etc/outpost/ca.crt\"\ncert_file = \"/etc/outpost/gw.crt\"\n\
                  key_file = \"/etc/outpost/gw.key\"\n";
    std::fs::write(
        p("outpost.toml"),
        common::base_config(Path::new(DATA_DIR), uplink),
    )
    .unwrap();

    // 1. Record: the gateway runs over the log-writes device.
    let out = vm::Vm::new()
        .disk(&p("data.img"))
        .disk(&p("log.img"))
        .module("dm-log-writes")
        .module("ext4")
        .mem(1024)
        .timeout(150)
        .copy(Path::new(common::BIN), "/bin/outpost")
        .copy(&vm::host_tool("dmsetup"), "/sbin/dmsetup")
        .copy(&p("outpost.toml"), "/etc/outpost/outpost.toml")
        .copy(&pki.ca, "/etc/outpost/ca.crt")
        .copy(&cert, "/etc/outpost/gw.crt")
        .copy(&key, "/etc/outpost/gw.key")
        .env("DM_DISABLE_UDEV", "1")
        .run_self("guest_side", "record");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "recording guest failed: {:?}\n{console}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let acked: u64 = field(&console, "RECORDED", "acked").expect("the guest's summary line");
    assert_eq!(acked, BATCHES * PER_BATCH, "{console}");
    let recorded = started.elapsed();

    // 2. Replay on the host: one image per point, side by side in check.img.
    let mut log = Log::open(&p("log.img")).expect("a dm-log-writes log");
    let points = choose_points(&log);
    let mut image = std::fs::read(p("base.img")).unwrap();
    let mut check = File::create(p("check.img")).unwrap();
    check.set_len(DEV_BYTES * points.len() as u64).unwrap();
    let mut manifest = String::new();
    let mut need = 0;
    let mut next = 0;
    for i in 0..log.entries.len() {
        log.apply(i, &mut image).expect("replay");
        if let Some(n) = log.entries[i]
            .mark
            .as_deref()
            .and_then(|m| m.strip_prefix("ack-"))
        {
            need = n.parse().expect("ack mark");
        }
        if points.get(next) == Some(&i) {
            write_sparse(&mut check, DEV_BYTES * next as u64, &image);
            let label = log.entries[i]
                .mark
                .clone()
                .unwrap_or(format!("flags{:#x}", log.entries[i].flags));
            manifest += &format!("{next} {i} {need} {label}\n");
            next += 1;
        }
    }
    drop(check);
    std::fs::write(p("points"), &manifest).unwrap();
    let marks = log.entries.iter().filter(|e| e.flags & MARK != 0).count();
    eprintln!(
        "log: {} entries, {marks} marks; checking {} points; recorded in {recorded:?}",
        log.entries.len(),
        points.len()
    );

    // 3. Check every image in a second guest.
    let out = vm::Vm::new()
        .disk(&p("check.img"))
        .module("dm-mod")
        .module("ext4")
        .mem(512)
        .timeout(150)
        .copy(&vm::host_tool("dmsetup"), "/sbin/dmsetup")
        .copy(&vm::host_tool("e2fsck"), "/sbin/e2fsck")
        .copy(&p("points"), "/etc/points")
        .env("DM_DISABLE_UDEV", "1")
        .run_self("guest_side", "check");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "checking guest failed: {:?}\n{console}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<&str> = console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| l.find("POINT ").map(|at| &l[at..]))
        .collect();
    assert_eq!(
        results.len(),
        points.len(),
        "one result per point:\n{console}"
    );
    let bad: Vec<&&str> = results.iter().filter(|l| !l.ends_with(" ok")).collect();
    eprintln!("{}", results.join("\n"));
    eprintln!("power_cut: {:?} in all", started.elapsed());
    assert!(
        bad.is_empty(),
        "{} of {} power-cut points lose acknowledged messages or the store:\n{}",
        bad.len(),
        results.len(),
        bad.iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// `KEY=VALUE` from the line starting with `tag` in `text`.
fn field<T: std::str::FromStr>(text: &str, tag: &str, key: &str) -> Option<T> {
    let line = text.lines().find(|l| l.starts_with(tag))?;
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))?
        .parse()
        .ok()
}

/// Every mark, and the flush/FUA entries spread evenly to at most `MAX_POINTS` in all.
fn choose_points(log: &Log) -> Vec<usize> {
    let marks: Vec<usize> = (0..log.entries.len())
        .filter(|&i| log.entries[i].flags & MARK != 0)
        .collect();
    let flushes: Vec<usize> = (0..log.entries.len())
        .filter(|&i| log.entries[i].is_point() && log.entries[i].flags & MARK == 0)
        .collect();
    let room = MAX_POINTS.saturating_sub(marks.len()).max(1);
    let step = flushes.len().div_ceil(room).max(1);
    let mut all: BTreeSet<usize> = marks.into_iter().collect();
    all.extend(flushes.iter().step_by(step));
    all.into_iter().collect()
}

/// Write `image` at `offset`, leaving all-zero blocks as holes.
fn write_sparse(f: &mut File, offset: u64, image: &[u8]) {
    for (k, block) in image.chunks(64 << 10).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start(offset + (k as u64) * (64 << 10)))
                .unwrap();
            f.write_all(block).unwrap();
        }
    }
}

// ---- The guest side -------------------------------------------------------------------

/// Runs only in the guest, started by `scripts/vm.sh` with `OUTPOST_VM_ROLE` set.
#[test]
#[ignore = "runs inside the QEMU guest of every_acked_message_survives_a_power_cut_at_every_flush_and_mark"]
fn guest_side() {
    match std::env::var(vm::ROLE_VAR).as_deref() {
        Ok("record") => record(),
        Ok("check") => check(),
        other => panic!("guest_side is started by scripts/vm.sh (role {other:?})"),
    }
}

/// `dmsetup message lw 0 mark LABEL`, as the DM_TARGET_MSG ioctl itself: starting dmsetup
/// takes long under TCG, and the mark must follow the PUBACK closely (a flush that happens
/// in between would hide a message that was acknowledged before it was on disk).
fn mark(label: &str) {
    const DM_IOCTL_SIZE: usize = 312; // sizeof(struct dm_ioctl)
    const DM_TARGET_MSG: u64 = (3 << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (0xfd << 8) | 14;
    let message = format!("mark {label}\0");
    let mut buf = vec![0u8; DM_IOCTL_SIZE + 8 + message.len()];
    let len = buf.len() as u32;
    let le32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    le32(&mut buf, 0, 4); // version 4.0.0
    le32(&mut buf, 12, len); // data_size
    le32(&mut buf, 16, DM_IOCTL_SIZE as u32); // data_start
    buf[48..50].copy_from_slice(b"lw"); // name
                                        // struct dm_target_msg { u64 sector = 0; char message[]; }
    buf[DM_IOCTL_SIZE + 8..].copy_from_slice(message.as_bytes());
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .expect("device-mapper control");
    use std::os::fd::AsRawFd;
    let r = unsafe { libc::ioctl(control.as_raw_fd(), DM_TARGET_MSG as _, buf.as_mut_ptr()) };
    assert_eq!(
        r,
        0,
        "DM_TARGET_MSG {label}: {}",
        std::io::Error::last_os_error()
    );
}

fn sectors(dev: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/block/{dev}/size"))
        .expect("block device size")
        .trim()
        .parse()
        .expect("a sector count")
}

fn record() {
    let table = format!("0 {} log-writes /dev/vda /dev/vdb", sectors("vda"));
    run(Command::new("dmsetup").args(["create", "lw", "--table", &table]));
    std::fs::create_dir_all("/mnt").unwrap();
    run(Command::new("mount").args(["-t", "ext4", "/dev/mapper/lw", "/mnt"]));
    mark("mounted");

    let log = File::create("/tmp/gateway.log").unwrap();
    let mut gw = Command::new("/bin/outpost")
        .args(["run", "--config", "/etc/outpost/outpost.toml"])
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the gateway");
    let deadline = Instant::now() + Duration::from_secs(90);
    let ep = loop {
        if let Some(ep) = outpost::Endpoints::read(Path::new(DATA_DIR)) {
            break ep;
        }
        if let Ok(Some(st)) = gw.try_wait() {
            panic!(
                "gateway exited: {st}\n{}",
                std::fs::read_to_string("/tmp/gateway.log").unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "gateway did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "gateway up after {:?}",
        Instant::now() + Duration::from_secs(90) - deadline
    );

    let mut s = TcpStream::connect(ep.plain.expect("plain listener")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    connect.extend_from_slice(&(3u16).to_be_bytes());
    connect.extend_from_slice(b"pub");
    send(&mut s, 0x10, &connect);
    let (t, body) = recv(&mut s);
    assert_eq!((t, body.as_slice()), (0x20, &[0u8, 0][..]), "CONNACK");

    // A persistent session subscribes to its command topic and goes away.
    {
        let mut d = TcpStream::connect(ep.plain.expect("plain listener")).expect("connect");
        d.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 60];
        connect.extend_from_slice(&(4u16).to_be_bytes());
        connect.extend_from_slice(b"sess");
        send(&mut d, 0x10, &connect);
        let (t, body) = recv(&mut d);
        assert_eq!(
            (t, body.as_slice()),
            (0x20, &[0u8, 0][..]),
            "CONNACK (sess)"
        );
        let mut sub = 1u16.to_be_bytes().to_vec();
        sub.extend_from_slice(&(CMD_TOPIC.len() as u16).to_be_bytes());
        sub.extend_from_slice(CMD_TOPIC.as_bytes());
        sub.push(1);
        send(&mut d, 0x82, &sub);
        let (t, body) = recv(&mut d);
        assert_eq!(
            (t, body.as_slice()),
            (0x90, &[0u8, 1, 1][..]),
            "SUBACK (sess)"
        );
        send(&mut d, 0xe0, &[]);
    }
    mark("subscribed");
    std::thread::sleep(Duration::from_millis(200));

    let publish = |s: &mut TcpStream, first: u8, topic: &str, pid: u16, payload: &str| {
        let mut b = Vec::new();
        b.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        b.extend_from_slice(topic.as_bytes());
        b.extend_from_slice(&pid.to_be_bytes());
        b.extend_from_slice(payload.as_bytes());
        send(s, first, &b);
    };
    let mut acked = 0;
    let mut batch = 0u64;
    for _ in 0..BATCHES {
        let mut pending = BTreeSet::new();
        for seq in acked + 1..=acked + PER_BATCH {
            let pid = seq as u16;
            let mut b = Vec::new();
            b.extend_from_slice(&(TOPIC.len() as u16).to_be_bytes());
            b.extend_from_slice(TOPIC.as_bytes());
            b.extend_from_slice(&pid.to_be_bytes());
            b.extend_from_slice(format!("seq={seq}").as_bytes());
            send(&mut s, 0x32, &b);
            pending.insert(pid);
        }
        batch += 1;
        let pid = 10_000 + batch as u16;
        publish(
            &mut s,
            0x33,
            &format!("state/b{batch}"),
            pid,
            &format!("retained={batch}"),
        );
        pending.insert(pid);
        for c in 1..=CMDS_PER_BATCH {
            let n = (batch - 1) * CMDS_PER_BATCH + c;
            let pid = 20_000 + n as u16;
            publish(&mut s, 0x32, CMD_TOPIC, pid, &format!("cmd={n}"));
            pending.insert(pid);
        }
        while !pending.is_empty() {
            let (t, body) = recv(&mut s);
            assert_eq!(t & 0xf0, 0x40, "PUBACK expected, got {t:#x}");
            let pid = u16::from_be_bytes([body[0], body[1]]);
            assert!(pending.remove(&pid), "PUBACK for {pid}, not pending");
        }
        acked += PER_BATCH;
        mark(&format!("ack-{acked}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = gw.kill();
    let _ = gw.wait();
    run(Command::new("umount").arg("/mnt"));
    run(Command::new("dmsetup").args(["remove", "lw"]));
    println!("RECORDED acked={acked}");
}

fn send(s: &mut TcpStream, first: u8, body: &[u8]) {
    let mut p = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        p.push(b);
        if n == 0 {
            break;
        }
    }
    p.extend_from_slice(body);
    s.write_all(&p).expect("send");
}

fn recv(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).expect("packet");
    let (mut len, mut mul) = (0usize, 1usize);
    for _ in 0..4 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("length");
        len += (b[0] & 0x7f) as usize * mul;
        mul *= 128;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    assert!(len <= 1 << 16, "packet of {len} bytes");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("body");
    (first[0], body)
}

fn check() {
    let manifest = std::fs::read_to_string("/etc/points").unwrap();
    let size = sectors("vda");
    std::fs::create_dir_all("/mnt").unwrap();
    for line in manifest.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (k, entry, need, label) = (
            f[0].parse::<u64>().unwrap(),
            f[1],
            f[2].parse::<u64>().unwrap(),
            f[3],
        );
        let per = DEV_BYTES / 512;
        let table = format!("0 {per} linear /dev/vda {}", k * per);
        assert!(size >= (k + 1) * per, "check.img too small");
        run(Command::new("dmsetup").args(["create", "point", "--table", &table]));
        let fsck = Command::new("e2fsck")
            .args(["-fy", "/dev/mapper/point"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("e2fsck")
            .code()
            .unwrap_or(-1);
        let mounted = Command::new("mount")
            .args(["-t", "ext4", "/dev/mapper/point", "/mnt"])
            .status()
            .expect("mount")
            .success();
        let verdict = if !mounted {
            "mount-failed".to_string()
        } else {
            verdict(need)
        };
        let _ = Command::new("umount").arg("/mnt").status();
        run(Command::new("dmsetup").args(["remove", "point"]));
        // e2fsck: 0 clean, 1 errors corrected (a journal replay counts); 4 and up: not fixed.
        let verdict = match (fsck, verdict.strip_suffix(" ok")) {
            (0 | 1, Some(_)) => verdict,
            (_, Some(v)) => format!("{v} FSCK-FAILED"),
            _ => verdict,
        };
        println!("POINT {k} entry={entry} {label} need={need} fsck={fsck} {verdict}");
    }
}

/// Whether messages 1..=need are in the queue of the store in DATA_DIR: "... ok" if so.
fn verdict(need: u64) -> String {
    let dir = Path::new(DATA_DIR);
    let dir = dir.join("store");
    if !dir.join("db").exists() && !dir.join("conf").exists() {
        return if need == 0 {
            "store=absent ok".into()
        } else {
            "store=absent LOST".into()
        };
    }
    let store = match outpost::store::Store::open(&dir) {
        Ok(s) => s,
        Err(e) => return format!("store=error({e}) FAILED"),
    };
    let (queue, join) = match outpost::uplink::queue::QueueHandle::spawn(
        store,
        u64::MAX,
        outpost::uplink::queue::WhenFull::Refuse,
        100,
    ) {
        Ok(q) => q,
        Err(e) => return format!("queue=error({e}) FAILED"),
    };
    let mut have = BTreeSet::new();
    let mut bad = 0;
    match queue.read_from(1, 1_000_000) {
        Ok(records) => {
            for (_, r) in records {
                let seq = r.ok().and_then(|(rec, range)| {
                    let m = outpost::uplink::queue::MessageRef::decode(&rec[range]).ok()?;
                    std::str::from_utf8(m.payload)
                        .ok()?
                        .strip_prefix("seq=")?
                        .parse::<u64>()
                        .ok()
                });
                match seq {
                    Some(s) => {
                        have.insert(s);
                    }
                    None => bad += 1,
                }
            }
        }
        Err(e) => return format!("read=error({e}) FAILED"),
    }
    drop(queue);
    let _ = join.join();
    let missing: Vec<u64> = (1..=need).filter(|s| !have.contains(s)).collect();
    let kept = match kept_by_sessions(&dir, need / PER_BATCH) {
        Ok(k) => k,
        Err(e) => return format!("sessions=error({e}) FAILED"),
    };
    let tail = if missing.is_empty() && bad == 0 && kept.ends_with("ok") {
        "ok"
    } else {
        "LOST"
    };
    format!(
        "have={} missing={} undecodable={bad} first_missing={:?} {kept} {tail}",
        have.len(),
        missing.len(),
        missing.first()
    )
}

/// Whether the retained messages and queued commands of the first `batches` batches are in
/// the sessions tables: "retained=.. cmds=.. ok" if so.
fn kept_by_sessions(dir: &Path, batches: u64) -> Result<String, String> {
    use outpost::sessions::record::{Queued, RetainedRecord, SessionRecord};
    let store = outpost::store::Store::open(dir).map_err(|e| e.to_string())?;
    let table = |n: &str| store.table(n).map_err(|e| e.to_string());
    let mut retained = BTreeSet::new();
    for (k, v) in table("retained")?.entries().map_err(|e| e.to_string())? {
        let r = RetainedRecord::decode(&v)?;
        let topic = String::from_utf8_lossy(&k).into_owned();
        if let Some(n) = topic.strip_prefix("state/b") {
            if std::str::from_utf8(&r.payload) == Ok(format!("retained={n}").as_str()) {
                retained.insert(n.parse::<u64>().map_err(|e| e.to_string())?);
            }
        }
    }
    let mut cmds = BTreeSet::new();
    for (_, v) in table("session-queue")?
        .entries()
        .map_err(|e| e.to_string())?
    {
        let q = Queued::decode(&v)?;
        if let Some(n) = std::str::from_utf8(&q.payload)
            .ok()
            .and_then(|p| p.strip_prefix("cmd="))
        {
            cmds.insert(n.parse::<u64>().map_err(|e| e.to_string())?);
        }
    }
    let subscribed = match table("sessions")?
        .get(b"local~sess")
        .map_err(|e| e.to_string())?
    {
        Some(v) => SessionRecord::decode(&v)?
            .subs
            .iter()
            .any(|(f, _)| f == CMD_TOPIC),
        None => false,
    };
    let r_missing = (1..=batches).filter(|n| !retained.contains(n)).count();
    let c_missing = (1..=batches * CMDS_PER_BATCH)
        .filter(|n| !cmds.contains(n))
        .count();
    let ok = r_missing == 0 && c_missing == 0 && (batches == 0 || subscribed);
    Ok(format!(
        "retained={} missing={r_missing} cmds={} missing={c_missing} subscribed={subscribed} {}",
        retained.len(),
        cmds.len(),
        if ok { "ok" } else { "LOST" }
    ))
}
