//! The LTX blob (format version 3, as rivet encodes it) that carries a staged commit's pages.
//!
//! ```text
//! header (100 bytes, big endian): "LTX1" flags page_size commit min_txid max_txid
//!     timestamp_ms pre_apply_checksum wal_offset wal_size wal_salt1 wal_salt2 node_id, zeros
//! frames, pgno strictly increasing: pgno u32, flags u16 (= 1), size u32, LZ4 block
//! 6 zero bytes
//! page index: (uvarint pgno, uvarint frame offset, uvarint frame size incl. header)*, uvarint 0
//! u64 page index size, 16-byte zero trailer
//! ```
//!
//! The encoder streams: it appends to a caller's buffer that the stager drains into DELTA
//! values, so a blob is never held whole in memory while it is written.

use std::fmt;

pub const MAGIC: &[u8; 4] = b"LTX1";
pub const HEADER_SIZE: usize = 100;
/// Header flag: the blob carries no checksums.
pub const FLAG_NO_CHECKSUM: u32 = 2;
/// Frame flag: the page is one LZ4 block.
pub const FRAME_FLAG_LZ4: u16 = 1;
pub const FRAME_HEADER_SIZE: usize = 10;
/// The pgno 0 frame header that ends the frames.
pub const FRAMES_END: [u8; 6] = [0; 6];
pub const TRAILER_SIZE: usize = 16;
/// Page sizes a header may declare: SQLite's, the powers of two from 512 to 65536. The
/// decoder allocates a page per frame, so the bound is checked before any frame is read.
pub const MIN_PAGE_SIZE: u32 = 512;
pub const MAX_PAGE_SIZE: u32 = 65536;

/// The header fields ferry sets (the others are zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LtxHeader {
    pub page_size: u32,
    /// Database size in pages after this commit.
    pub commit: u32,
    pub min_txid: u64,
    pub max_txid: u64,
    pub timestamp_ms: i64,
}

impl LtxHeader {
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        h[0..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&FLAG_NO_CHECKSUM.to_be_bytes());
        h[8..12].copy_from_slice(&self.page_size.to_be_bytes());
        h[12..16].copy_from_slice(&self.commit.to_be_bytes());
        h[16..24].copy_from_slice(&self.min_txid.to_be_bytes());
        h[24..32].copy_from_slice(&self.max_txid.to_be_bytes());
        h[32..40].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        // pre_apply_checksum, wal_offset, wal_size, wal_salt1, wal_salt2, node_id and the
        // padding to 100 bytes stay zero.
        h
    }

    fn decode(b: &[u8]) -> Result<LtxHeader, LtxError> {
        if b.len() < HEADER_SIZE {
            return Err(LtxError::new(0, "blob shorter than the header"));
        }
        if &b[0..4] != MAGIC {
            return Err(LtxError::new(0, "magic is not LTX1"));
        }
        let flags = be_u32(&b[4..8]);
        if flags != FLAG_NO_CHECKSUM {
            return Err(LtxError::new(4, format!("header flags {flags}, expected {FLAG_NO_CHECKSUM}")));
        }
        if b[40..HEADER_SIZE].iter().any(|&x| x != 0) {
            return Err(LtxError::new(40, "header fields after the timestamp are not zero"));
        }
        let page_size = be_u32(&b[8..12]);
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(LtxError::new(8, format!("page size {page_size} is not a SQLite page size")));
        }
        Ok(LtxHeader {
            page_size,
            commit: be_u32(&b[12..16]),
            min_txid: be_u64(&b[16..24]),
            max_txid: be_u64(&b[24..32]),
            timestamp_ms: be_u64(&b[32..40]) as i64,
        })
    }
}

/// A blob that does not decode: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LtxError {
    pub offset: usize,
    pub detail: String,
}

impl LtxError {
    fn new(offset: usize, detail: impl Into<String>) -> LtxError {
        LtxError { offset, detail: detail.into() }
    }
}

impl fmt::Display for LtxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LTX blob invalid at byte {}: {}", self.offset, self.detail)
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_uvarint(b: &[u8], pos: &mut usize) -> Result<u64, LtxError> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let Some(&byte) = b.get(*pos) else {
            return Err(LtxError::new(*pos, "page index ends inside a varint"));
        };
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(v);
        }
    }
    Err(LtxError::new(*pos, "varint longer than 64 bits"))
}

/// One entry of the page index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageIndexEntry {
    pub pgno: u32,
    pub offset: u64,
    pub size: u64,
}

/// Streams an LTX blob into a caller's buffer: [`LtxEncoder::new`] writes the header,
/// [`LtxEncoder::push_page`] one frame, [`LtxEncoder::finish`] the index and trailer.
pub struct LtxEncoder {
    index: Vec<PageIndexEntry>,
    offset: u64,
    page_size: usize,
}

impl LtxEncoder {
    pub fn new(header: &LtxHeader, out: &mut Vec<u8>) -> LtxEncoder {
        out.extend_from_slice(&header.encode());
        LtxEncoder {
            index: Vec::with_capacity(header.commit as usize),
            offset: HEADER_SIZE as u64,
            page_size: header.page_size as usize,
        }
    }

    /// Appends the frame of page `pgno`. Pages must come in strictly increasing order.
    pub fn push_page(&mut self, pgno: u32, page: &[u8], out: &mut Vec<u8>) {
        debug_assert_eq!(page.len(), self.page_size);
        debug_assert!(pgno > self.index.last().map_or(0, |e| e.pgno), "pages out of order");
        let start = out.len();
        let bound = lz4_flex::block::get_maximum_output_size(page.len());
        out.resize(start + FRAME_HEADER_SIZE + bound, 0);
        // The output slice is sized by lz4_flex's own bound for this input.
        let compressed = lz4_flex::block::compress_into(page, &mut out[start + FRAME_HEADER_SIZE..])
            .expect("output sized by get_maximum_output_size");
        out.truncate(start + FRAME_HEADER_SIZE + compressed);
        out[start..start + 4].copy_from_slice(&pgno.to_be_bytes());
        out[start + 4..start + 6].copy_from_slice(&FRAME_FLAG_LZ4.to_be_bytes());
        // An LZ4 block of one page is far below 4 GiB.
        out[start + 6..start + 10].copy_from_slice(&(compressed as u32).to_be_bytes());
        let size = (FRAME_HEADER_SIZE + compressed) as u64;
        self.index.push(PageIndexEntry { pgno, offset: self.offset, size });
        self.offset += size;
    }

    /// Appends the end of frames, the page index, its size and the trailer.
    pub fn finish(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&FRAMES_END);
        let index_start = out.len();
        for e in &self.index {
            put_uvarint(out, u64::from(e.pgno));
            put_uvarint(out, e.offset);
            put_uvarint(out, e.size);
        }
        put_uvarint(out, 0);
        let index_size = (out.len() - index_start) as u64;
        out.extend_from_slice(&index_size.to_be_bytes());
        out.extend_from_slice(&[0u8; TRAILER_SIZE]);
    }
}

/// Encodes a whole blob at once (tests and tools; migration streams with [`LtxEncoder`]).
pub fn encode(header: &LtxHeader, pages: &[(u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = LtxEncoder::new(header, &mut out);
    for (pgno, page) in pages {
        enc.push_page(*pgno, page, &mut out);
    }
    enc.finish(&mut out);
    out
}

/// A decoded blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedLtx {
    pub header: LtxHeader,
    /// Pages in pgno order, decompressed.
    pub pages: Vec<(u32, Vec<u8>)>,
    pub index: Vec<PageIndexEntry>,
}

/// Decodes and checks a whole blob: every frame, the page index against the frames, and the
/// trailer.
pub fn decode(b: &[u8]) -> Result<DecodedLtx, LtxError> {
    let header = LtxHeader::decode(b)?;
    let page_size = header.page_size as usize;
    let mut pos = HEADER_SIZE;
    let mut pages: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut frames = Vec::new();
    loop {
        let Some(fh) = b.get(pos..pos + 6) else {
            return Err(LtxError::new(pos, "blob ends inside the frames"));
        };
        let pgno = be_u32(&fh[0..4]);
        let flags = u16::from_be_bytes([fh[4], fh[5]]);
        if pgno == 0 {
            if flags != 0 {
                return Err(LtxError::new(pos, "frames end marker has flags"));
            }
            pos += 6;
            break;
        }
        if flags != FRAME_FLAG_LZ4 {
            return Err(LtxError::new(pos, format!("frame flags {flags}, expected {FRAME_FLAG_LZ4}")));
        }
        if pages.last().is_some_and(|(last, _)| *last >= pgno) {
            return Err(LtxError::new(pos, format!("page {pgno} is out of order")));
        }
        let Some(size) = b.get(pos + 6..pos + 10).map(be_u32) else {
            return Err(LtxError::new(pos, "blob ends inside a frame header"));
        };
        let data_start = pos + FRAME_HEADER_SIZE;
        let Some(data) = b.get(data_start..data_start + size as usize) else {
            return Err(LtxError::new(pos, "blob ends inside a frame"));
        };
        let mut page = vec![0u8; page_size];
        match lz4_flex::block::decompress_into(data, &mut page) {
            Ok(n) if n == page_size => {}
            Ok(n) => {
                return Err(LtxError::new(data_start, format!("page {pgno} decompresses to {n} bytes")));
            }
            Err(e) => return Err(LtxError::new(data_start, format!("page {pgno}: {e}"))),
        }
        frames.push(PageIndexEntry { pgno, offset: pos as u64, size: (FRAME_HEADER_SIZE + size as usize) as u64 });
        pages.push((pgno, page));
        pos = data_start + size as usize;
    }
    let index_start = pos;
    let mut index = Vec::with_capacity(frames.len());
    loop {
        let pgno = get_uvarint(b, &mut pos)?;
        if pgno == 0 {
            break;
        }
        let offset = get_uvarint(b, &mut pos)?;
        let size = get_uvarint(b, &mut pos)?;
        let pgno = u32::try_from(pgno).map_err(|_| LtxError::new(pos, "page number over u32"))?;
        index.push(PageIndexEntry { pgno, offset, size });
    }
    if index != frames {
        return Err(LtxError::new(index_start, "page index does not match the frames"));
    }
    let index_size = (pos - index_start) as u64;
    let Some(size_bytes) = b.get(pos..pos + 8) else {
        return Err(LtxError::new(pos, "blob ends before the index size"));
    };
    if be_u64(size_bytes) != index_size {
        return Err(LtxError::new(pos, format!("index size {} does not match {index_size}", be_u64(size_bytes))));
    }
    pos += 8;
    match b.get(pos..) {
        Some(t) if t.len() == TRAILER_SIZE && t.iter().all(|&x| x == 0) => {}
        _ => return Err(LtxError::new(pos, "trailer is not 16 zero bytes")),
    }
    if header.commit as usize != pages.len() {
        // ferry's blobs carry every page of the database; a partial blob is not one of ours.
        return Err(LtxError::new(12, format!("commit says {} pages, blob holds {}", header.commit, pages.len())));
    }
    Ok(DecodedLtx { header, pages, index })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(commit: u32) -> LtxHeader {
        LtxHeader { page_size: 4096, commit, min_txid: 7, max_txid: 7, timestamp_ms: 1_763_900_000_000 }
    }

    #[test]
    fn empty_blob_has_header_end_marker_empty_index_and_trailer() {
        let blob = encode(&header(0), &[]);
        assert_eq!(blob.len(), HEADER_SIZE + 6 + 1 + 8 + TRAILER_SIZE);
        assert_eq!(&blob[..4], b"LTX1");
        assert_eq!(&blob[HEADER_SIZE + 6 + 1..HEADER_SIZE + 6 + 9], &1u64.to_be_bytes());
        assert!(decode(&blob).unwrap().pages.is_empty());
    }

    #[test]
    fn pages_round_trip_and_index_points_at_frames() {
        let p1 = vec![1u8; 4096];
        let p2: Vec<u8> = (0..4096).map(|i| (i * 7 % 251) as u8).collect();
        let blob = encode(&header(2), &[(1, &p1), (2, &p2)]);
        let d = decode(&blob).unwrap();
        assert_eq!(d.header, header(2));
        assert_eq!(d.pages, vec![(1, p1), (2, p2)]);
        assert_eq!(d.index[0].offset, HEADER_SIZE as u64);
        let f = d.index[1].offset as usize;
        assert_eq!(&blob[f..f + 4], &2u32.to_be_bytes());
        assert_eq!(&blob[f + 4..f + 6], &1u16.to_be_bytes());
    }

    #[test]
    fn a_flipped_byte_anywhere_structural_is_detected() {
        let p1 = vec![3u8; 4096];
        let blob = encode(&header(1), &[(1, &p1)]);
        for i in [0usize, 5, HEADER_SIZE, HEADER_SIZE + 5, blob.len() - 1, blob.len() - 20] {
            let mut bad = blob.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {i} went unnoticed");
        }
        assert!(decode(&blob[..blob.len() - 1]).is_err());
    }

    #[test]
    fn a_page_size_sqlite_cannot_have_is_refused_before_any_page_is_allocated() {
        for page_size in [0, 511, 4095, 65536 * 2, 0x0900_1000, u32::MAX] {
            let blob = encode(&LtxHeader { page_size, ..header(0) }, &[]);
            assert_eq!(decode(&blob).unwrap_err().offset, 8, "page size {page_size}");
        }
        for page_size in [512, 65536] {
            assert!(decode(&encode(&LtxHeader { page_size, ..header(0) }, &[])).is_ok());
        }
    }
}
