use super::*;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The fields of `block` as (name, value, never_indexed) strings.
fn decode(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String, bool)>, DecodeError> {
    let mut fields = Vec::new();
    d.decode(block, usize::MAX, |f| {
        fields.push((
            String::from_utf8_lossy(f.name).into_owned(),
            String::from_utf8_lossy(f.value).into_owned(),
            f.never_indexed,
        ))
    })?;
    Ok(fields)
}

/// A literal field: `first` (representation and name index), then the name when not indexed,
/// then the value, both as they are.
fn literal(first: u8, name: &str, value: &str) -> Vec<u8> {
    let mut block = vec![first];
    if first & 0x0f == 0 {
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
    }
    block.push(value.len() as u8);
    block.extend_from_slice(value.as_bytes());
    block
}

/// A pseudo-random sequence (xorshift64) from `seed`: the same cases on every run.
fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

fn plain(fields: &[(&str, &str)]) -> Vec<(String, String, bool)> {
    fields
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string(), false))
        .collect()
}

#[test]
fn integers_use_their_prefix_then_seven_bits_a_byte() {
    // RFC 7541 C.1: 10 and 1337 with a 5-bit prefix, 42 with an 8-bit one.
    for (value, prefix, bytes) in [
        (10, 5, vec![0x0a]),
        (1337, 5, vec![0x1f, 0x9a, 0x0a]),
        (42, 8, vec![0x2a]),
    ] {
        let mut out = Vec::new();
        put_integer(&mut out, 0, prefix, value);
        assert_eq!(out, bytes);
        let mut input = out.as_slice();
        assert_eq!(integer(&mut input, prefix), Ok(value));
        assert!(input.is_empty());
    }
    let mut too_long: &[u8] = &[0x1f, 0xff, 0xff, 0xff, 0xff, 0x0f];
    assert_eq!(integer(&mut too_long, 5), Err(DecodeError::IntegerTooLarge));
    let mut cut: &[u8] = &[0x1f, 0x9a];
    assert_eq!(integer(&mut cut, 5), Err(DecodeError::Truncated));
}

#[test]
fn the_four_field_representations() {
    let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
    // Literal with incremental indexing, new name: kept in the table (10 + 13 + 32 bytes).
    let block = literal(0x40, "custom-key", "custom-header");
    assert_eq!(
        decode(&mut d, &block).unwrap(),
        plain(&[("custom-key", "custom-header")])
    );
    assert_eq!(d.table_size(), 55);
    // Literal without indexing, name from the static table (4, `:path`): not kept.
    let block = literal(0x04, ":path", "/sample/path");
    assert_eq!(
        decode(&mut d, &block).unwrap(),
        plain(&[(":path", "/sample/path")])
    );
    assert_eq!(d.table_size(), 55);
    // Never indexed: reported so.
    let block = literal(0x10, "password", "secret");
    let fields = decode(&mut d, &block).unwrap();
    assert_eq!(fields, vec![("password".into(), "secret".into(), true)]);
    // Indexed: static 2, then dynamic 62 (the entry added above).
    assert_eq!(
        decode(&mut d, &[0x82, 0xbe]).unwrap(),
        plain(&[(":method", "GET"), ("custom-key", "custom-header")])
    );
    assert_eq!(decode(&mut d, &[0xbf]), Err(DecodeError::BadIndex(63)));
    assert_eq!(decode(&mut d, &[0x80]), Err(DecodeError::BadIndex(0)));
}

#[test]
fn huffman_coded_requests_share_the_dynamic_table() {
    // RFC 7541 C.4: three requests on one connection, checked against Python's `hpack` too.
    let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
    let first = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    assert_eq!(
        decode(&mut d, &hex("828684418cf1e3c2e5f23a6ba0ab90f4ff")).unwrap(),
        plain(&first)
    );
    assert_eq!(d.table_size(), 57);
    let mut second = first.to_vec();
    second.push(("cache-control", "no-cache"));
    assert_eq!(
        decode(&mut d, &hex("828684be5886a8eb10649cbf")).unwrap(),
        plain(&second)
    );
    assert_eq!(d.table_size(), 110);
    let third = [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    let block = hex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf");
    assert_eq!(decode(&mut d, &block).unwrap(), plain(&third));
    assert_eq!(d.table_size(), 164);
}

#[test]
fn the_canonical_code_gives_the_published_codes() {
    assert_eq!(huffman::code_of(u16::from(b'0')), (0x0, 5));
    assert_eq!(huffman::code_of(u16::from(b'a')), (0x3, 5));
    assert_eq!(huffman::code_of(u16::from(b' ')), (0x14, 6));
    assert_eq!(huffman::code_of(256), (0x3fff_ffff, 30));
}

#[test]
fn bad_huffman_strings_are_refused() {
    let mut out = Vec::new();
    // Eight bits of padding, all ones.
    assert_eq!(huffman::decode(&[0xff], &mut out), Err(HuffmanError::Padding));
    // '0' (00000) then three bits of padding that are not ones.
    assert_eq!(
        huffman::decode(&[0b0000_0000], &mut out),
        Err(HuffmanError::Padding)
    );
    // EOS itself: 30 ones (then two of padding).
    assert_eq!(
        huffman::decode(&[0xff, 0xff, 0xff, 0xff], &mut out),
        Err(HuffmanError::Eos)
    );
    out.clear();
    // '0' then ones: fine.
    assert_eq!(huffman::decode(&[0b0000_0111], &mut out), Ok(()));
    assert_eq!(out, b"0");
}

#[test]
fn size_updates_evict_and_are_bounded_by_the_settings() {
    let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
    decode(&mut d, &hex("828684418cf1e3c2e5f23a6ba0ab90f4ff")).unwrap();
    assert_eq!(d.table_size(), 57);
    // To 0 then back to 4096 (31 + 4065: 0xe1 0x1f), before a field: the table is emptied.
    assert_eq!(
        decode(&mut d, &[0x20, 0x3f, 0xe1, 0x1f, 0x82]).unwrap(),
        plain(&[(":method", "GET")])
    );
    assert_eq!(d.table_size(), 0);
    assert_eq!(decode(&mut d, &[0xbe]), Err(DecodeError::BadIndex(62)));
    // Above what this end allows.
    let mut small = Decoder::new(100);
    assert_eq!(
        decode(&mut small, &[0x3f, 0x46]),
        Err(DecodeError::TableTooLarge {
            asked: 101,
            limit: 100
        })
    );
    // After a field.
    assert_eq!(decode(&mut d, &[0x82, 0x20]), Err(DecodeError::LateSizeUpdate));
}

#[test]
fn entries_past_the_table_size_evict_the_oldest() {
    let mut d = Decoder::new(100);
    // Each is 4 + 1 + 32 = 37 bytes: two fit in 100, the third evicts the first.
    for name in ["aaaa", "bbbb", "cccc"] {
        decode(&mut d, &literal(0x40, name, "v")).unwrap();
    }
    assert_eq!(d.table_size(), 74);
    assert_eq!(
        decode(&mut d, &[0xbe, 0xbf]).unwrap(),
        plain(&[("cccc", "v"), ("bbbb", "v")])
    );
    assert_eq!(decode(&mut d, &[0xc0]), Err(DecodeError::BadIndex(64)));
    // One larger than the table empties it and is not kept.
    decode(&mut d, &literal(0x40, &"x".repeat(90), "")).unwrap();
    assert_eq!(d.table_size(), 0);
}

#[test]
fn an_oversized_list_is_decoded_to_its_end_and_refused() {
    let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
    // 100 bytes allow the first two fields (42 + 43), not the third, which still enters the
    // table: the connection stays in step with its peer.
    let block = hex("828684418cf1e3c2e5f23a6ba0ab90f4ff");
    let mut seen = 0;
    let result = d.decode(&block, 100, |_| seen += 1);
    assert_eq!(result, Err(DecodeError::ListTooLarge { limit: 100 }));
    assert_eq!(seen, 2);
    assert_eq!(d.table_size(), 57);
    assert_eq!(
        decode(&mut d, &[0xbe]).unwrap(),
        plain(&[(":authority", "www.example.com")])
    );
}

#[test]
fn what_the_encoder_writes_decodes_to_the_same_fields() {
    let mut e = Encoder::default();
    let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
    let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
    for round in 0..200u32 {
        let mut block = Vec::new();
        if round.is_multiple_of(50) {
            e.peer_table_size_changed();
        }
        e.begin(&mut block);
        let status = [200u16, 404, 503, 101, 999][(next() % 5) as usize];
        e.status(status, &mut block);
        let mut want = vec![(":status".to_string(), status.to_string(), false)];
        for _ in 0..(next() % 12) {
            let name = match next() % 3 {
                0 => "content-type".to_string(),
                1 => "set-cookie".to_string(),
                _ => format!("x-{}", "k".repeat((next() % 200) as usize)),
            };
            let value: String = (0..(next() % 300))
                .map(|i| (b' ' + (i % 90) as u8) as char)
                .collect();
            let never = next().is_multiple_of(4);
            e.field(name.as_bytes(), value.as_bytes(), never, &mut block);
            want.push((name, value, never));
        }
        assert_eq!(decode(&mut d, &block).unwrap(), want, "round {round}");
        assert_eq!(d.table_size(), 0);
    }
}

#[test]
fn arbitrary_bytes_never_panic_and_leave_a_bounded_table() {
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
    let mut d = Decoder::new(256);
    for _ in 0..20_000 {
        let len = (next() % 64) as usize;
        let block: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = d.decode(&block, 1024, |_| {});
        assert!(d.table_size() <= 256);
    }
}
