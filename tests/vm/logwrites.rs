//! Reading and replaying a dm-log-writes log (the kernel's device-mapper target
//! `log-writes <dev> <log_dev>`, Documentation/admin-guide/device-mapper/log-writes.rst).
//!
//! The log device holds, in units of the logged device's sector size (`sectorsize`, the
//! logical block size of the device, usually 512):
//!
//! ```text
//! sector 0:  log_write_super { le64 magic, le64 version, le64 nr_entries, le32 sectorsize }
//! sector 1:  log_write_entry { le64 sector, le64 nr_sectors, le64 flags, le64 data_len }
//!            [MARK: the mark's text, data_len bytes, right after the entry in this sector]
//! then:      nr_sectors sectors of written data (none for a DISCARD, which only names the
//!            range, nor for a MARK or an empty FLUSH)
//! next entry ...
//! ```
//!
//! Writes are logged once they are flushed, in the order they reached the disk: replaying
//! entries 0..=i gives the device as a power cut right after entry i leaves it, for an i at
//! a FLUSH or FUA entry (or a MARK, which the test writes at the moment it cares about).
//! `nr_entries` in the super block is updated at every FUA and MARK entry (and when the
//! target is removed, after a final "dm-log-writes-end" mark).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const VERSION: u64 = 1;
pub const FLUSH: u64 = 1 << 0;
pub const FUA: u64 = 1 << 1;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;
pub const METADATA: u64 = 1 << 4;

/// Most entries read from one log (a bound against a corrupt `nr_entries`).
pub const MAX_ENTRIES: u64 = 10_000_000;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a dm-log-writes log (magic {0:#x})")]
    Magic(u64),
    #[error("unsupported log version {0}")]
    Version(u64),
    #[error("bad sector size {0}")]
    SectorSize(u32),
    #[error("log claims {0} entries (more than {MAX_ENTRIES})")]
    TooManyEntries(u64),
    #[error("entry {index}: {what}")]
    Entry { index: u64, what: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// In device sectors.
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    /// The mark's text for a MARK entry.
    pub mark: Option<String>,
    /// Byte offset of the entry's data in the log (the sector after its header).
    pub data_offset: u64,
}

impl Entry {
    /// A point a power cut can leave the device at: after a FLUSH, a FUA write or a MARK.
    pub fn is_point(&self) -> bool {
        self.flags & (FLUSH | FUA | MARK) != 0
    }
}

#[derive(Debug)]
pub struct Log {
    file: File,
    pub sectorsize: u64,
    pub entries: Vec<Entry>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Log {
    /// Read the super block and every entry header of the log in `path`.
    pub fn open(path: &Path) -> Result<Log, LogError> {
        let mut file = File::open(path)?;
        let log_len = file.metadata()?.len();
        let mut sup = [0u8; 28];
        file.read_exact(&mut sup)?;
        let magic = le64(&sup, 0);
        if magic != MAGIC {
            return Err(LogError::Magic(magic));
        }
        let version = le64(&sup, 8);
        if version != VERSION {
            return Err(LogError::Version(version));
        }
        let nr_entries = le64(&sup, 16);
        let sectorsize = u32::from_le_bytes([sup[24], sup[25], sup[26], sup[27]]);
        if !(512..=65536).contains(&sectorsize) || !sectorsize.is_power_of_two() {
            return Err(LogError::SectorSize(sectorsize));
        }
        if nr_entries > MAX_ENTRIES {
            return Err(LogError::TooManyEntries(nr_entries));
        }
        let ss = sectorsize as u64;
        let mut entries = Vec::with_capacity(nr_entries as usize);
        let mut pos = ss;
        let mut header = vec![0u8; sectorsize as usize];
        for index in 0..nr_entries {
            let bad = |what: String| LogError::Entry { index, what };
            if pos + ss > log_len {
                return Err(bad(format!(
                    "header at {pos} past the log's end ({log_len})"
                )));
            }
            file.seek(SeekFrom::Start(pos))?;
            file.read_exact(&mut header)?;
            let sector = le64(&header, 0);
            let nr_sectors = le64(&header, 8);
            let flags = le64(&header, 16);
            let data_len = le64(&header, 24);
            let mut mark = None;
            if flags & MARK != 0 {
                if data_len > ss - 32 {
                    return Err(bad(format!("mark of {data_len} bytes")));
                }
                let text = &header[32..32 + data_len as usize];
                mark = Some(String::from_utf8_lossy(text).into_owned());
            }
            let data_offset = pos + ss;
            let data = if flags & (DISCARD | MARK) != 0 {
                0
            } else {
                nr_sectors
                    .checked_mul(ss)
                    .filter(|n| data_offset + n <= log_len)
                    .ok_or_else(|| bad(format!("{nr_sectors} sectors past the log's end")))?
            };
            entries.push(Entry {
                sector,
                nr_sectors,
                flags,
                mark,
                data_offset,
            });
            pos = data_offset + data;
        }
        Ok(Log {
            file,
            sectorsize: ss,
            entries,
        })
    }

    /// Apply entry `index` to `image` (the replayed device): its data for a write, zeros for
    /// a discard, nothing for a flush or mark.
    pub fn apply(&mut self, index: usize, image: &mut [u8]) -> Result<(), LogError> {
        let e = &self.entries[index];
        if e.flags & MARK != 0 || e.nr_sectors == 0 {
            return Ok(());
        }
        let bad = |what: String| LogError::Entry {
            index: index as u64,
            what,
        };
        let start = e.sector.checked_mul(self.sectorsize);
        let len = e.nr_sectors.checked_mul(self.sectorsize);
        let range = match (start, len) {
            (Some(s), Some(l))
                if s.checked_add(l)
                    .is_some_and(|end| end <= image.len() as u64) =>
            {
                s as usize..(s + l) as usize
            }
            _ => {
                return Err(bad(format!(
                    "sectors {}+{} outside the {}-byte device",
                    e.sector,
                    e.nr_sectors,
                    image.len()
                )))
            }
        };
        if e.flags & DISCARD != 0 {
            image[range].fill(0);
        } else {
            self.file.seek(SeekFrom::Start(e.data_offset))?;
            self.file.read_exact(&mut image[range])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes a log the way drivers/md/dm-log-writes.c lays it out (sector size 512).
    struct Writer {
        buf: Vec<u8>,
        n: u64,
    }

    impl Writer {
        fn new() -> Writer {
            Writer {
                buf: vec![0; 512],
                n: 0,
            }
        }
        fn entry(&mut self, sector: u64, nr: u64, flags: u64, inline: &[u8], data: &[u8]) {
            let mut h = vec![0u8; 512];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&nr.to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&(inline.len() as u64).to_le_bytes());
            h[32..32 + inline.len()].copy_from_slice(inline);
            self.buf.extend_from_slice(&h);
            self.buf.extend_from_slice(data);
            self.n += 1;
        }
        fn finish(mut self) -> Vec<u8> {
            self.buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            self.buf[8..16].copy_from_slice(&VERSION.to_le_bytes());
            self.buf[16..24].copy_from_slice(&self.n.to_le_bytes());
            self.buf[24..28].copy_from_slice(&512u32.to_le_bytes());
            self.buf
        }
    }

    fn log_of(bytes: &[u8]) -> (tempfile::NamedTempFile, Log) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let log = Log::open(f.path()).unwrap();
        (f, log)
    }

    #[test]
    fn replays_writes_discards_flushes_and_marks_as_the_kernel_lays_them_out() {
        let mut w = Writer::new();
        w.entry(2, 2, 0, &[], &[0xaa; 1024]); // write sectors 2..4
        w.entry(0, 0, FLUSH, &[], &[]); // empty flush: a point, no data
        w.entry(0, 0, MARK, b"ack-1", &[]); // mark: text inline, no data sectors
        w.entry(3, 1, DISCARD, &[], &[]); // discard sector 3: no data in the log
        w.entry(7, 1, FUA | METADATA, &[], &[0xbb; 512]); // FUA write, a point
        let (_f, mut log) = log_of(&w.finish());
        assert_eq!(log.sectorsize, 512);
        assert_eq!(log.entries.len(), 5);
        assert_eq!(log.entries[2].mark.as_deref(), Some("ack-1"));
        assert_eq!(log.entries[1].data_offset, 512 + 512 + 1024 + 512);
        let points: Vec<bool> = log.entries.iter().map(Entry::is_point).collect();
        assert_eq!(points, [false, true, true, false, true]);

        let mut image = vec![0x11u8; 8 * 512];
        for i in 0..3 {
            log.apply(i, &mut image).unwrap();
        }
        assert!(image[..1024].iter().all(|&b| b == 0x11));
        assert!(image[1024..2048].iter().all(|&b| b == 0xaa));
        log.apply(3, &mut image).unwrap();
        log.apply(4, &mut image).unwrap();
        assert!(image[1024..1536].iter().all(|&b| b == 0xaa));
        assert!(image[1536..2048].iter().all(|&b| b == 0));
        assert!(image[3584..].iter().all(|&b| b == 0xbb));
    }

    #[test]
    fn refuses_what_is_not_a_log_or_points_outside_it() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 1024]).unwrap();
        assert!(matches!(Log::open(f.path()), Err(LogError::Magic(0))));

        let mut w = Writer::new();
        w.entry(0, 4, 0, &[], &[0; 512]); // claims 4 sectors, the log holds 1
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&w.finish()).unwrap();
        assert!(matches!(
            Log::open(f.path()),
            Err(LogError::Entry { index: 0, .. })
        ));

        let mut w = Writer::new();
        w.entry(100, 1, 0, &[], &[0; 512]); // past the end of an 8-sector device
        let (_f, mut log) = log_of(&w.finish());
        assert!(log.apply(0, &mut [0u8; 4096]).is_err());
    }
}
