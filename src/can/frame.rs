//! One CAN frame as the gateway sees it: classic CAN (CAN 2.0A/B), CAN FD, remote and error
//! frames, with the receive time. A leaf: no I/O, no other module of the crate.

/// Flag bits of a Linux `can_id` (include/uapi/linux/can.h): extended frame format, remote
/// transmission request, error frame.
pub const CAN_EFF_FLAG: u32 = 0x8000_0000;
pub const CAN_RTR_FLAG: u32 = 0x4000_0000;
pub const CAN_ERR_FLAG: u32 = 0x2000_0000;
/// Identifier masks: 11-bit standard, 29-bit extended, and the error class bits.
pub const CAN_SFF_MASK: u32 = 0x0000_07ff;
pub const CAN_EFF_MASK: u32 = 0x1fff_ffff;
pub const CAN_ERR_MASK: u32 = 0x1fff_ffff;
/// Error classes of an error frame's id (include/uapi/linux/can/error.h).
pub const CAN_ERR_BUSOFF: u32 = 0x0000_0040;
pub const CAN_ERR_RESTARTED: u32 = 0x0000_0100;

/// Classic CAN carries at most 8 data bytes, CAN FD 64.
pub const CAN_MAX_DLEN: usize = 8;
pub const CANFD_MAX_DLEN: usize = 64;

/// The data lengths a CAN FD frame can have (ISO 11898-1:2015, DLC 0..=15).
pub const FD_LENGTHS: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64];

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A classic data frame; `raw_dlc` is its DLC when it is 9..=15 (length 8, the
    /// "len8_dlc" the kernel reports), else `None`.
    Data { raw_dlc: Option<u8> },
    /// A classic remote frame (RTR) asking for `dlc` bytes (0..=8).
    Remote { dlc: u8 },
    /// A CAN FD frame with its flags (`CANFD_BRS` 1, `CANFD_ESI` 2).
    Fd { flags: u8 },
    /// An error frame reported by the controller; `class` is its error class bits.
    Error { class: u32 },
}

/// One frame. `id` is the bare identifier (11 or 29 bits), never with flag bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Receive time, microseconds since the Unix epoch (the kernel's timestamp on a socket,
    /// the log's on a replay).
    pub ts_us: u64,
    pub id: u32,
    pub extended: bool,
    pub kind: Kind,
    len: u8,
    data: [u8; CANFD_MAX_DLEN],
}

impl Frame {
    /// A data, FD or error frame with `data`; `None` if the length does not fit the kind
    /// (over 8 bytes for classic and error frames, not an FD length for FD) or the id does
    /// not fit its format.
    pub fn new(ts_us: u64, id: u32, extended: bool, kind: Kind, data: &[u8]) -> Option<Frame> {
        let max_id = if extended { CAN_EFF_MASK } else { CAN_SFF_MASK };
        if id > max_id {
            return None;
        }
        let ok_len = match kind {
            Kind::Data { raw_dlc } => {
                data.len() <= CAN_MAX_DLEN
                    && raw_dlc.is_none_or(|d| (9..=15).contains(&d) && data.len() == CAN_MAX_DLEN)
            }
            Kind::Remote { dlc } => data.is_empty() && usize::from(dlc) <= CAN_MAX_DLEN,
            Kind::Fd { flags } => flags <= 0x0f && FD_LENGTHS.contains(&(data.len() as u8)),
            Kind::Error { class } => data.len() <= CAN_MAX_DLEN && class <= CAN_ERR_MASK,
        };
        if !ok_len || data.len() > CANFD_MAX_DLEN {
            return None;
        }
        let mut buf = [0u8; CANFD_MAX_DLEN];
        buf[..data.len()].copy_from_slice(data);
        Some(Frame {
            ts_us,
            id,
            extended,
            kind,
            len: data.len() as u8,
            data: buf,
        })
    }

    pub fn data(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }

    /// The DLC on the wire: the length's code for data and FD frames (the raw one when given),
    /// the requested length for a remote frame.
    pub fn dlc(&self) -> u8 {
        match self.kind {
            Kind::Remote { dlc } => dlc,
            Kind::Data { raw_dlc: Some(d) } => d,
            _ => FD_LENGTHS.iter().position(|&l| l >= self.len).unwrap_or(15) as u8,
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self.kind, Kind::Error { .. })
    }

    /// The Linux `can_id` with its flag bits.
    pub fn can_id(&self) -> u32 {
        match self.kind {
            Kind::Error { class } => CAN_ERR_FLAG | class,
            Kind::Remote { .. } => {
                self.id | CAN_RTR_FLAG | if self.extended { CAN_EFF_FLAG } else { 0 }
            }
            _ => self.id | if self.extended { CAN_EFF_FLAG } else { 0 },
        }
    }

    /// Bits on the wire of a classic frame at worst-case bit stuffing (for bus-load models):
    /// 44 + 8n (standard) or 64 + 8n (extended) before stuffing, plus 3 bits of interframe
    /// space; stuffing adds one bit per four of the 34 + 8n (54 + 8n) stuffed bits.
    pub fn classic_bits_worst(&self) -> u32 {
        let n = u32::from(self.len.min(8));
        let (plain, stuffed) = if self.extended {
            (64 + 8 * n, 54 + 8 * n)
        } else {
            (44 + 8 * n, 34 + 8 * n)
        };
        plain + (stuffed - 1) / 4 + 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_ids_are_checked_by_kind() {
        let d = Kind::Data { raw_dlc: None };
        assert!(Frame::new(0, 0x7ff, false, d, &[0; 8]).is_some());
        assert!(Frame::new(0, 0x800, false, d, &[0; 8]).is_none());
        assert!(Frame::new(0, 0x1fff_ffff, true, d, &[]).is_some());
        assert!(Frame::new(0, 0x2000_0000, true, d, &[]).is_none());
        assert!(Frame::new(0, 1, false, d, &[0; 9]).is_none());
        let fd = Kind::Fd { flags: 1 };
        assert!(Frame::new(0, 1, false, fd, &[0; 12]).is_some());
        assert!(Frame::new(0, 1, false, fd, &[0; 13]).is_none());
        assert!(Frame::new(0, 1, false, fd, &[0; 64]).is_some());
        let len8 = Kind::Data { raw_dlc: Some(0xe) };
        assert!(Frame::new(0, 1, false, len8, &[0; 8]).is_some());
        assert!(Frame::new(0, 1, false, len8, &[0; 7]).is_none());
        assert!(Frame::new(0, 1, false, Kind::Remote { dlc: 9 }, &[]).is_none());
    }

    #[test]
    fn dlc_codes_follow_iso_11898_1() {
        let fd = |n: usize| Frame::new(0, 1, false, Kind::Fd { flags: 0 }, &vec![0; n]).unwrap();
        assert_eq!(fd(8).dlc(), 8);
        assert_eq!(fd(12).dlc(), 9);
        assert_eq!(fd(48).dlc(), 14);
        assert_eq!(fd(64).dlc(), 15);
        let f = Frame::new(0, 1, false, Kind::Remote { dlc: 5 }, &[]).unwrap();
        assert_eq!((f.dlc(), f.can_id()), (5, 0x4000_0001));
        let f = Frame::new(0, 0x123, true, Kind::Data { raw_dlc: None }, &[1]).unwrap();
        assert_eq!(f.can_id(), 0x8000_0123);
    }

    /// field-facts: a standard 8-byte frame is at most 135 bits with stuffing and
    /// interframe space (44 + 64 = 108, 24 stuff bits, 3 IFS).
    #[test]
    fn worst_case_bits_of_a_classic_frame() {
        let f = Frame::new(0, 1, false, Kind::Data { raw_dlc: None }, &[0; 8]).unwrap();
        assert_eq!(f.classic_bits_worst(), 135);
        let f = Frame::new(0, 1, false, Kind::Data { raw_dlc: None }, &[]).unwrap();
        assert_eq!(f.classic_bits_worst(), 44 + 8 + 3);
    }
}
