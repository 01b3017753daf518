//! The LTX-style database checksum (DESIGN.md section 2, audit record): the XOR over every page
//! of CRC-64/GO-ISO(u32 BE pgno ++ page bytes), with bit 63 set, as 16 hex digits.

use crc::{CRC_64_GO_ISO, Crc, Table};

/// Slice-by-16 tables: the checksum covers every byte of every migrated page, so the
/// byte-at-a-time table was the largest CPU cost of migrating small databases.
const CRC: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_GO_ISO);
/// LTX's checksum flag: bit 63 set on every checksum.
pub const CHECKSUM_FLAG: u64 = 1 << 63;

/// Accumulates the checksum page by page, in any order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatabaseChecksum(u64);

impl DatabaseChecksum {
    pub fn new() -> Self {
        DatabaseChecksum(0)
    }

    pub fn add_page(&mut self, pgno: u32, page: &[u8]) {
        let mut digest = CRC.digest();
        digest.update(&pgno.to_be_bytes());
        digest.update(page);
        self.0 ^= digest.finalize();
    }

    pub fn value(&self) -> u64 {
        self.0 | CHECKSUM_FLAG
    }

    /// 16 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.value())
    }

    /// The checksum of a whole file cut into pages of `page_size`.
    pub fn of_file(file: &[u8], page_size: usize) -> DatabaseChecksum {
        let mut c = DatabaseChecksum::new();
        for (i, page) in file.chunks(page_size).enumerate() {
            // Files ferry checksums are bounded by the size limit, far below 2^32 pages.
            c.add_page(u32::try_from(i + 1).expect("pgno fits u32"), page);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_is_go_iso_and_checksum_sets_bit_63() {
        // Go: crc64.Checksum([]byte("123456789"), crc64.MakeTable(crc64.ISO)) == 0xb90956c775a41001
        assert_eq!(CRC.checksum(b"123456789"), 0xb909_56c7_75a4_1001);
        assert_eq!(DatabaseChecksum::new().hex(), "8000000000000000");
        let mut a = DatabaseChecksum::new();
        a.add_page(1, &[1; 8]);
        a.add_page(2, &[2; 8]);
        let mut b = DatabaseChecksum::new();
        b.add_page(2, &[2; 8]);
        b.add_page(1, &[1; 8]);
        assert_eq!(a, b);
        assert_ne!(a.value() & !CHECKSUM_FLAG, 0);
    }
}
