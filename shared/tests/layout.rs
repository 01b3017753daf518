//! rivet's layout codec (`ferry::layout`, DESIGN.md section 7): byte-exact keys against
//! hand-written hex and against the tuple crate's own packing, round trips of ids and values,
//! and order preservation.

use ferry::layout::rivet::*;
use ferry::layout::rivet_id::{ID_LEN, ID_STRING_LEN};
use ferry::layout::tuple::ID_CODE;
use ferry::layout::{RivetId, RivetIdError};
use ferry::store::KeyRange;
use foundationdb_tuple::{Bytes, Element, Uuid, pack, unpack};

/// An id quoted in rivet's own docs (`engine/sdks/typescript/runner/src/utils.ts`).
const DOC_ID: &str = "t1s80so6h3irenp8ymzltfoittcl00";
const DOC_ID_HEX: &str = "0130ac6849376e45dd99bb525760acd2cf0001";

fn h(s: &str) -> Vec<u8> {
    hex::decode(s.replace(' ', "")).unwrap()
}

fn doc_id() -> RivetId {
    RivetId::parse(DOC_ID).unwrap()
}

/// `P` of DOC_ID, by hand: tuple(0, 3, 72) then `40` ++ the id bytes.
fn doc_prefix_hex() -> String {
    format!("14 15 03 15 48 40 {DOC_ID_HEX}")
}

/// A small deterministic generator, so the round trips cover many ids without a dependency.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

// ------------------------------------------------------------------------------------ ids

#[test]
fn rivets_documented_id_decodes_to_version_uuid_and_label() {
    let id = doc_id();
    assert_eq!(id.as_bytes().to_vec(), h(DOC_ID_HEX));
    assert_eq!(id.uuid(), Uuid::parse_str("30ac6849-376e-45dd-99bb-525760acd2cf").unwrap());
    assert_eq!(id.label(), 1);
    assert_eq!(id.uuid_display(), "30ac6849-376e-45dd-99bb-525760acd2cf@1");
    assert_eq!(id.to_string(), DOC_ID);
    assert_eq!(RivetId::from_bytes(&h(DOC_ID_HEX)).unwrap(), id);
    assert_eq!(RivetId::new(id.uuid(), 1), id);
}

#[test]
fn id_string_is_least_significant_digit_first_over_little_endian_bytes() {
    // Version byte 1 alone is the number 1: digit "1" first, then zeros.
    let nil = RivetId::new(Uuid::nil(), 0);
    assert_eq!(nil.to_string(), "100000000000000000000000000000");
    assert_eq!(RivetId::new(Uuid::nil(), 1).to_string(), "tlf0xcg1buacno4zofgpr7isbeal00");
    let uuid = Uuid::from_bytes(core::array::from_fn(|i| i as u8));
    assert_eq!(RivetId::new(uuid, 0xabcd).to_string(), "5j5clxk76yunoni9kgbhxzhnyofmd3");
    assert_eq!(RivetId::new(Uuid::from_bytes([0xff; 16]), 0xffff).to_string(), "1oy2rubcii3hz9btllv019jpuvxd74");
}

#[test]
fn id_string_round_trips_and_upper_case_is_accepted() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..2000 {
        let mut uuid = [0u8; 16];
        uuid[..8].copy_from_slice(&xorshift(&mut state).to_le_bytes());
        uuid[8..].copy_from_slice(&xorshift(&mut state).to_le_bytes());
        let id = RivetId::new(Uuid::from_bytes(uuid), xorshift(&mut state) as u16);
        let s = id.to_string();
        assert_eq!(s.len(), ID_STRING_LEN);
        assert!(s.bytes().all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()), "{s}");
        assert_eq!(RivetId::parse(&s).unwrap(), id);
        assert_eq!(RivetId::parse(&s.to_ascii_uppercase()).unwrap(), id);
        assert_eq!(RivetId::from_bytes(id.as_bytes()).unwrap(), id);
        assert_eq!(RivetId::from_actor(&id.to_actor()).unwrap(), id);
    }
}

#[test]
fn malformed_ids_are_typed_errors() {
    assert_eq!(RivetId::parse("abc"), Err(RivetIdError::BadStringLength { got: 3 }));
    assert_eq!(RivetId::parse(&format!("{DOC_ID}0")), Err(RivetIdError::BadStringLength { got: 31 }));
    let mut bad = DOC_ID.to_string();
    bad.replace_range(7..8, "-");
    assert_eq!(RivetId::parse(&bad), Err(RivetIdError::BadChar { index: 7, found: '-' }));
    assert_eq!(RivetId::parse(&"z".repeat(30)), Err(RivetIdError::Overflow));
    assert_eq!(RivetId::parse(&"0".repeat(30)), Err(RivetIdError::UnsupportedVersion(0)));
    assert_eq!(RivetId::parse("200000000000000000000000000000"), Err(RivetIdError::UnsupportedVersion(2)));
    assert_eq!(RivetId::from_bytes(&[1; 18]), Err(RivetIdError::BadLength { got: 18 }));
    let mut v2 = h(DOC_ID_HEX);
    v2[0] = 2;
    assert_eq!(RivetId::from_bytes(&v2), Err(RivetIdError::UnsupportedVersion(2)));
}

#[test]
fn id_tuple_element_is_code_40_and_nineteen_raw_bytes() {
    let id = doc_id();
    assert_eq!(pack(&id), h(&format!("40 {DOC_ID_HEX}")));
    assert_eq!(ID_CODE, 0x40);
    assert_eq!(unpack::<RivetId>(&pack(&id)).unwrap(), id);
    // An id holding 00 bytes is not escaped: still exactly 20 bytes.
    let zeros = RivetId::new(Uuid::nil(), 0);
    assert_eq!(pack(&zeros).len(), 1 + ID_LEN);
    assert!(unpack::<RivetId>(&h(&format!("01 {DOC_ID_HEX}"))).is_err());
    assert!(unpack::<RivetId>(&h("40 01 02")).is_err());
    let mut v2 = pack(&id);
    v2[1] = 2;
    assert!(unpack::<RivetId>(&v2).is_err());
}

// ------------------------------------------------------------------------------------ v1

#[test]
fn v1_actor_prefix_matches_hand_hex_and_the_tuple_crate() {
    let id = doc_id();
    assert_eq!(v1_root(), h("14 15 03 15 48"));
    assert_eq!(v1_root(), pack(&Element::Tuple(vec![Element::Int(0), Element::Int(3), Element::Int(72)])));
    assert_eq!(v1_actor_prefix(&id), h(&doc_prefix_hex()));
    assert_eq!(v1_actor_skip_key(&id), h(&format!("{} ff", doc_prefix_hex())));
    assert_eq!(v1_actor_of_key(&v1_data_key(&id, b"\x08\x01\x01\x00", 3)).unwrap(), id);
    assert_eq!(v1_actor_of_key(&v1_actor_prefix(&id)).unwrap(), id);
    assert!(v1_actor_of_key(&h("14 15 03 15 48 40 01 02")).is_err());
    assert!(v1_actor_of_key(&h("14 15 03 15 49")).is_err());
}

#[test]
fn v1_rows_of_a_user_key_with_zero_bytes_are_byte_exact() {
    let id = doc_id();
    let p = doc_prefix_hex();
    // The SQLite chunk key of the main file, chunk 5: 08 01 01 00 ++ 00 00 00 05.
    let k = h("08 01 01 00 00 00 00 05");
    let k_esc = "08 01 01 00 ff 00 ff 00 ff 00 ff 05";
    let base = format!("{p} 05 01 {k_esc} 00 00");
    assert_eq!(v1_entry_prefix(&id, &k), h(&base));
    assert_eq!(v1_data_key(&id, &k, 0), h(&format!("{base} 15 04 14")));
    assert_eq!(v1_data_key(&id, &k, 1), h(&format!("{base} 15 04 15 01")));
    assert_eq!(v1_data_key(&id, &k, 300), h(&format!("{base} 15 04 16 01 2c")));
    assert_eq!(v1_metadata_key(&id, &k), h(&format!("{base} 15 2c")));

    // The same keys from the tuple crate's generic elements, the id element appended by hand.
    let tail = |extra: Vec<Element<'static>>| {
        let mut elements = vec![Element::Tuple(vec![Element::Bytes(Bytes::from(k.clone()))])];
        elements.extend(extra);
        let mut key = v1_actor_prefix(&id);
        key.extend(pack(&Element::Tuple(elements)));
        key
    };
    assert_eq!(v1_entry_prefix(&id, &k), tail(vec![]));
    assert_eq!(v1_data_key(&id, &k, 300), tail(vec![Element::Int(4), Element::Int(300)]));
    assert_eq!(v1_metadata_key(&id, &k), tail(vec![Element::Int(44)]));

    // A key that is only zero bytes, and the empty key.
    assert_eq!(v1_entry_prefix(&id, &[0, 0]), h(&format!("{p} 05 01 00 ff 00 ff 00 00")));
    assert_eq!(v1_entry_prefix(&id, b""), h(&format!("{p} 05 01 00 00")));

    assert_eq!(v1_parse_row(&id, &v1_data_key(&id, &k, 300)).unwrap(), (k.clone(), V1RowKind::Data { index: 300 }));
    assert_eq!(v1_parse_row(&id, &v1_metadata_key(&id, &k)).unwrap(), (k.clone(), V1RowKind::Metadata));
    assert_eq!(v1_parse_row(&id, &h(&format!("{base} 15 05"))), Err(LayoutError::UnexpectedSubKey(5)));
    assert!(v1_parse_row(&id, &h(&format!("{base} 15 04 14 14"))).is_err());
    assert!(v1_parse_row(&RivetId::new(Uuid::nil(), 0), &v1_metadata_key(&id, &k)).is_err());
}

#[test]
fn kv_metadata_is_bare_bytes_then_i64_le() {
    let m = KvMetadata { version: b"2.0.22".to_vec(), update_ts: 0x0102_0304_0506_0708 };
    let bytes = m.encode();
    assert_eq!(bytes, h("06 32 2e 30 2e 32 32 08 07 06 05 04 03 02 01"));
    assert_eq!(KvMetadata::decode(&bytes).unwrap(), m);
    assert!(KvMetadata::decode(&h("06 32 2e")).is_err());
}

fn metadata() -> KvMetadata {
    KvMetadata { version: b"2.0.22".to_vec(), update_ts: 1_700_000_000_000 }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn v1_values_split_into_10000_byte_data_rows_and_reassemble() {
    let id = doc_id();
    let k = h("08 01 01 00 00 00 00 00");
    for len in [1, 4096, 9_999, 10_000, 10_001, 20_000, 25_000] {
        let value = pattern(len);
        let rows = v1_encode_entry(&id, &k, &value, &metadata());
        let data_rows = len.div_ceil(V1_VALUE_CHUNK_SIZE);
        assert_eq!(rows.len(), data_rows + 1, "len {len}");
        for (i, (key, v)) in rows[..data_rows].iter().enumerate() {
            assert_eq!(*key, v1_data_key(&id, &k, i as u64));
            assert_eq!(v.len(), V1_VALUE_CHUNK_SIZE.min(len - i * V1_VALUE_CHUNK_SIZE));
        }
        assert_eq!(rows[data_rows], (v1_metadata_key(&id, &k), metadata().encode()));
        // Rows as a scan returns them (sorted), and in any other order.
        let mut sorted = rows.clone();
        sorted.sort();
        assert_eq!(sorted, rows, "DATA rows sort before METADATA, in index order");
        let mut reversed = rows.clone();
        reversed.reverse();
        for rows in [rows, reversed] {
            let entry = v1_decode_entry(&id, &rows).unwrap();
            assert_eq!(entry, V1Entry { user_key: k.clone(), value: value.clone(), metadata: metadata() });
        }
    }
}

#[test]
fn v1_incomplete_rows_are_typed_errors() {
    let id = doc_id();
    let k = h("08 01 00 00");
    let rows = v1_encode_entry(&id, &k, &pattern(25_000), &metadata());
    let (data, meta) = rows.split_at(3);

    assert_eq!(v1_decode_entry(&id, data), Err(V1EntryError::DataWithoutMetadata { user_key: k.clone() }));
    assert_eq!(v1_decode_entry(&id, meta), Err(V1EntryError::MetadataWithoutData { user_key: k.clone() }));
    // An empty value is what rivet's put leaves for one: METADATA alone, which its get refuses.
    assert_eq!(v1_encode_entry(&id, &k, b"", &metadata()), meta.to_vec());
    let gap = vec![rows[0].clone(), rows[2].clone(), rows[3].clone()];
    assert_eq!(v1_decode_entry(&id, &gap), Err(V1EntryError::MissingData { user_key: k.clone(), index: 1 }));
    let empty_data = vec![(v1_data_key(&id, &k, 0), Vec::new()), rows[3].clone()];
    assert_eq!(v1_decode_entry(&id, &empty_data), Err(V1EntryError::EmptyValue { user_key: k.clone() }));
    let twice = vec![rows[0].clone(), rows[0].clone(), rows[3].clone()];
    assert_eq!(v1_decode_entry(&id, &twice), Err(V1EntryError::DuplicateRow { user_key: k.clone() }));
    let bad_meta = vec![rows[0].clone(), (rows[3].0.clone(), h("09 01"))];
    assert!(matches!(v1_decode_entry(&id, &bad_meta), Err(V1EntryError::BadMetadata { .. })));
    let mut mixed = rows.clone();
    mixed.push((v1_metadata_key(&id, b"\x08\x01\x00\x01"), metadata().encode()));
    assert_eq!(v1_decode_entry(&id, &mixed), Err(V1EntryError::MixedKeys));
    assert_eq!(v1_decode_entry(&id, &[]), Err(V1EntryError::NoRows));
}

#[test]
fn v1_probe_range_holds_exactly_the_sqlite_keys_and_the_skip_key_passes_the_actor() {
    let id = doc_id();
    let range = v1_sqlite_range(&id);
    assert_eq!(
        range,
        KeyRange::new(h(&format!("{} 05 01 08", doc_prefix_hex())), h(&format!("{} 05 01 09", doc_prefix_hex())))
    );
    let inside = [b"\x08".to_vec(), h("08 00"), h("08 01 00 00"), h("08 01 01 03 ff ff ff ff"), h("08 ff ff")];
    let outside = [b"".to_vec(), h("07 ff"), h("09"), h("00 08"), b"state".to_vec()];
    for k in &inside {
        assert!(range.contains(&v1_data_key(&id, k, 0)), "{k:02x?}");
        assert!(range.contains(&v1_metadata_key(&id, k)), "{k:02x?}");
    }
    for k in &outside {
        assert!(!range.contains(&v1_data_key(&id, k, 0)), "{k:02x?}");
    }
    let skip = v1_actor_skip_key(&id);
    for k in inside.iter().chain(&outside) {
        assert!(v1_metadata_key(&id, k) < skip);
        assert!(v1_data_key(&id, k, u64::MAX) < skip);
    }
    let mut next = *id.as_bytes();
    next[18] += 1;
    let next = RivetId::from_bytes(&next).unwrap();
    assert!(skip < v1_actor_prefix(&next));
}

#[test]
fn physical_rows_of_chunk_keys_sort_as_the_logical_keys_do() {
    let id = doc_id();
    let indexes = [0u32, 1, 0xff, 0x100, 0xff00, 0xffff, 0x1_0000, 0x00ff_00ff, 0xff00_ff00, 0xffff_ffff];
    let mut logical: Vec<Vec<u8>> = Vec::new();
    for tag in [0u8, 1, 2, 3] {
        logical.push(vec![0x08, 0x01, 0x00, tag]);
        for i in indexes {
            let mut k = vec![0x08, 0x01, 0x01, tag];
            k.extend_from_slice(&i.to_be_bytes());
            logical.push(k);
        }
    }
    logical.extend([vec![0x08], vec![0x08, 0x00], vec![0x08, 0x00, 0x00], vec![0x08, 0x01]]);
    logical.sort();
    // Every row of each key, in logical order, must already be in physical order.
    let physical: Vec<Vec<u8>> = logical
        .iter()
        .flat_map(|k| {
            let mut rows: Vec<Vec<u8>> = (0..3).map(|i| v1_data_key(&id, k, i)).collect();
            rows.push(v1_metadata_key(&id, k));
            rows
        })
        .collect();
    let mut sorted = physical.clone();
    sorted.sort();
    assert_eq!(sorted, physical);

    let v2_logical: Vec<Vec<u8>> = indexes
        .iter()
        .map(|i| {
            let mut k = format!("v2/{DOC_ID}/PIDX/delta/").into_bytes();
            k.extend_from_slice(&i.to_be_bytes());
            k
        })
        .collect();
    let v2_physical: Vec<Vec<u8>> = v2_logical.iter().map(|k| v2_key(k).unwrap()).collect();
    let mut sorted = v2_physical.clone();
    sorted.sort();
    assert_eq!(sorted, v2_physical);
}

// ------------------------------------------------------------------------------------ v2

const S_HEX: &str = "14 15 03 02 73 71 6c 69 74 65 2d 73 74 6f 72 61 67 65 00";

fn v2_logical(tail: &[u8]) -> Vec<u8> {
    let mut k = format!("v2/{DOC_ID}/").into_bytes();
    k.extend_from_slice(tail);
    k
}

#[test]
fn v2_keys_are_the_logical_keys_under_s_02() {
    assert_eq!(v2_subspace(), h(S_HEX));
    assert_eq!(
        v2_subspace(),
        pack(&Element::Tuple(vec![Element::Int(0), Element::Int(3), Element::String("sqlite-storage".into())]))
    );
    let actor = hex::encode(DOC_ID);
    let base = format!("{S_HEX} 02 {actor} 2f");
    assert_eq!(v2_key(&v2_logical(b"META")).unwrap(), h(&format!("{base} {}", hex::encode("META"))));
    let mut delta = v2_logical(b"DELTA/");
    delta.extend_from_slice(&7u64.to_be_bytes());
    delta.push(b'/');
    delta.extend_from_slice(&2u32.to_be_bytes());
    assert_eq!(
        v2_key(&delta).unwrap(),
        h(&format!("{base} {} 00 00 00 00 00 00 00 07 2f 00 00 00 02", hex::encode("DELTA/")))
    );
    let mut pidx = v2_logical(b"PIDX/delta/");
    pidx.extend_from_slice(&9u32.to_be_bytes());
    assert_eq!(v2_key(&pidx).unwrap(), h(&format!("{base} {} 00 00 00 09", hex::encode("PIDX/delta/"))));
    let mut shard = v2_logical(b"SHARD/");
    shard.extend_from_slice(&1u32.to_be_bytes());
    assert_eq!(v2_key(&shard).unwrap(), h(&format!("{base} {} 00 00 00 01", hex::encode("SHARD/"))));
    for k in [v2_logical(b"META"), delta, pidx, shard] {
        assert_eq!(v2_logical_key(&v2_key(&k).unwrap()).unwrap(), k);
    }
    assert_eq!(
        v2_chunk_key(&v2_logical(b"META"), 3).unwrap(),
        h(&format!("{S_HEX} 03 02 {actor} 2f {} 00 00 00 03", hex::encode("META")))
    );
    assert!(v2_key(b"v1/x").is_err());
    assert!(v2_logical_key(&v2_chunk_key(&v2_logical(b"META"), 0).unwrap()).is_err());
    let range = KeyRange::prefix(&v2_logical(b"PIDX/delta/"));
    let mapped = v2_range(&range).unwrap();
    assert_eq!(mapped, KeyRange::prefix(&v2_key(&v2_logical(b"PIDX/delta/")).unwrap()));
}

fn v2_round_trip(value: &[u8]) -> Vec<Row> {
    let logical = v2_logical(b"DELTA/x");
    let rows = v2_encode_value(&logical, value).unwrap();
    let stored = V2Stored::decode(&rows[0].1).unwrap();
    let keys = stored.chunk_keys(&logical).unwrap();
    assert_eq!(keys, rows[1..].iter().map(|(k, _)| k.clone()).collect::<Vec<_>>());
    let chunks: Vec<Vec<u8>> = rows[1..].iter().map(|(_, v)| v.clone()).collect();
    assert_eq!(stored.assemble(&chunks).unwrap(), value);
    rows
}

#[test]
fn v2_values_up_to_100000_bytes_are_inline_and_larger_ones_chunked() {
    let logical = v2_logical(b"DELTA/x");
    let empty = v2_round_trip(b"");
    assert_eq!(empty, vec![(v2_key(&logical).unwrap(), vec![0x00])]);
    let small = v2_round_trip(b"abc");
    assert_eq!(small[0].1, h("00 61 62 63"));

    let at_limit = v2_round_trip(&pattern(V2_INLINE_LIMIT));
    assert_eq!(at_limit.len(), 1);
    assert_eq!(at_limit[0].1.len(), V2_INLINE_LIMIT + 1);
    assert_eq!(at_limit[0].1[0], V2_INLINE_MARKER);

    let over = v2_round_trip(&pattern(V2_INLINE_LIMIT + 1));
    assert_eq!(over[0], (v2_key(&logical).unwrap(), h("01 00 01 86 a1 00 00 00 0b")));
    assert_eq!(over.len(), 1 + 11);
    for (i, (key, v)) in over[1..].iter().enumerate() {
        assert_eq!(*key, v2_chunk_key(&logical, i as u32).unwrap());
        assert_eq!(v.len(), if i < 10 { V2_VALUE_CHUNK_SIZE } else { 1 });
    }
    let exact = v2_round_trip(&pattern(200_000));
    assert_eq!(exact[0].1, h("01 00 03 0d 40 00 00 00 14"));
    assert!(exact[1..].iter().all(|(_, v)| v.len() == V2_VALUE_CHUNK_SIZE));
}

#[test]
fn v2_malformed_stored_values_are_typed_errors() {
    // An empty stored value reads as an empty logical value, as sqlite-storage reads it.
    assert_eq!(V2Stored::decode(b"").unwrap(), V2Stored::Inline(Vec::new()));
    assert_eq!(V2Stored::decode(&h("02 00")), Err(LayoutError::UnknownMarker(2)));
    assert_eq!(V2Stored::decode(&h("01 00 00")), Err(LayoutError::BadChunkedMarker { got: 3 }));
    let rows = v2_encode_value(&v2_logical(b"META"), &pattern(100_001)).unwrap();
    let stored = V2Stored::decode(&rows[0].1).unwrap();
    assert_eq!(stored, V2Stored::Chunked { total_len: 100_001, chunk_count: 11 });
    let mut chunks: Vec<Vec<u8>> = rows[1..].iter().map(|(_, v)| v.clone()).collect();
    chunks.pop();
    assert_eq!(stored.clone().assemble(&chunks), Err(LayoutError::ChunkCount { expected: 11, got: 10 }));
    chunks.push(vec![1, 2]);
    assert_eq!(stored.assemble(&chunks), Err(LayoutError::ChunkedLength { expected: 100_001, got: 100_002 }));
}

#[test]
fn v2_clear_ranges_cover_the_actors_keys_and_chunk_rows_only() {
    let id = doc_id();
    let [keys, chunks] = v2_clear_ranges(&id);
    let actor = hex::encode(DOC_ID);
    assert_eq!(keys, KeyRange::new(h(&format!("{S_HEX} 02 {actor} 2f")), h(&format!("{S_HEX} 02 {actor} 30"))));
    assert_eq!(chunks, KeyRange::new(h(&format!("{S_HEX} 03 02 {actor} 2f")), h(&format!("{S_HEX} 03 02 {actor} 30"))));
    let covered = |k: &[u8]| keys.contains(k) || chunks.contains(k);
    for tail in [&b"META"[..], b"DELTA/\0\0\0\0\0\0\0\x01/\0\0\0\0", b"PIDX/delta/\0\0\0\x01", b"SHARD/\0\0\0\0"] {
        let logical = v2_logical(tail);
        for (k, _) in v2_encode_value(&logical, &pattern(150_000)).unwrap() {
            assert!(covered(&k), "{k:02x?}");
        }
    }
    let other = RivetId::new(Uuid::nil(), 7).to_string();
    let other_key = v2_key(format!("v2/{other}/META").as_bytes()).unwrap();
    assert!(!covered(&other_key));
    assert!(!covered(&v2_chunk_key(format!("v2/{other}/META").as_bytes(), 0).unwrap()));
    assert!(!covered(&v1_metadata_key(&id, b"\x08")));
}

#[test]
fn v1_user_key_prefix_ranges_hold_exactly_the_keys_with_that_prefix() {
    let id = doc_id();
    // The meta keys of the four files, and a prefix ending in a zero byte.
    for prefix in [h("08 01 00"), h("08 01 01 00"), h("08 00"), h("00")] {
        let range = v1_user_key_prefix_range(&id, &prefix);
        for k in [
            h("08"),
            h("08 00"),
            h("08 00 ff"),
            h("08 01 00"),
            h("08 01 00 03"),
            h("08 01 01 00 00 00 00 07"),
            h("08 01 01"),
            h("00"),
            h("00 00"),
            h("01"),
        ] {
            let rows = [v1_data_key(&id, &k, 0), v1_data_key(&id, &k, 9), v1_metadata_key(&id, &k)];
            for row in rows {
                assert_eq!(range.contains(&row), k.starts_with(&prefix), "prefix {prefix:02x?} key {k:02x?}");
            }
        }
    }
}

#[test]
fn v1_logical_keys_split_into_rivet_id_and_user_key() {
    let id = doc_id();
    let logical = v1_logical_key(&id, &h("08 01 01 00 00 00 00 05"));
    assert_eq!(logical, [format!("v1/{DOC_ID}/").into_bytes(), h("08 01 01 00 00 00 00 05")].concat());
    assert_eq!(v1_split_logical(&logical).unwrap(), (id, h("08 01 01 00 00 00 00 05")));
    assert_eq!(v1_split_logical(&v1_logical_key(&id, b"")).unwrap(), (id, Vec::new()));
    assert!(matches!(v1_split_logical(b"v1/abc/\x08"), Err(LayoutError::NotUnderPrefix(_))));
    assert!(matches!(v1_split_logical(format!("v1/{}/x", "0".repeat(30)).as_bytes()), Err(LayoutError::BadActor(_))));
    assert!(v1_split_logical(format!("v2/{DOC_ID}/x").as_bytes()).is_err());
}
