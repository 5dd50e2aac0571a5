//! HPACK (RFC 7541), the header compression of HTTP/2.
//!
//! - [`Decoder`] decodes a header block field by field into a callback, names and values
//!   borrowed from the block, the dynamic table or a buffer it reuses (Huffman-coded strings).
//!   A block over the header-list limit is still decoded to its end, so the table stays in
//!   step with the peer's and only that stream needs refusing (RFC 9113 §10.5.1).
//! - [`Encoder`] never indexes: every field is a literal without indexing (its name indexed
//!   when the static table has it), or never-indexed when it came in so (RFC 7541 §7.1.3),
//!   strings as they are. The peer's dynamic table stays empty, and encoding is a copy.

mod huffman;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

pub use huffman::HuffmanError;

/// The static table (RFC 7541 Appendix A); index 1 is the first entry.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// What an entry costs in a dynamic table besides its name and value (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// The dynamic table size both ends start with (RFC 9113 §6.5.2, SETTINGS_HEADER_TABLE_SIZE).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Why a header block cannot be decoded. Every variant but [`DecodeError::ListTooLarge`] is a
/// COMPRESSION_ERROR of the connection (RFC 9113 §4.3): the tables are out of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the header block ends inside a field")]
    Truncated,
    #[error("an integer in the header block is too large")]
    IntegerTooLarge,
    #[error("index {0} is in neither the static nor the dynamic table")]
    BadIndex(usize),
    #[error("a Huffman-coded string is invalid: {0:?}")]
    Huffman(HuffmanError),
    #[error("a dynamic table size update to {asked} exceeds the limit of {limit}")]
    TableTooLarge { asked: usize, limit: usize },
    #[error("a dynamic table size update after the first field of a block")]
    LateSizeUpdate,
    /// The fields add up to more than the limit; the block was still decoded to its end and
    /// the table is in step, so only the stream is refused.
    #[error("the header list is larger than {limit} bytes")]
    ListTooLarge { limit: usize },
}

/// A decoded field: name and value as they were sent (not checked for HTTP validity here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
    /// Sent as never-indexed (RFC 7541 §6.2.3): an intermediary forwards it so again.
    pub never_indexed: bool,
}

// === impl DynamicTable ===

/// A dynamic table entry: name and value in one buffer.
#[derive(Debug)]
struct Entry {
    bytes: Vec<u8>,
    name_len: usize,
}

/// How many evicted entries' buffers are kept for the next ones.
const SPARE_BUFFERS: usize = 16;

/// A dynamic table: the newest entry first (index 62), evicted from the oldest. Evicted
/// entries' buffers are reused, so a peer that indexes every field (nginx does) costs no
/// allocation per field.
#[derive(Debug, Default)]
struct DynamicTable {
    entries: VecDeque<Entry>,
    spare: Vec<Vec<u8>>,
    size: usize,
    max_size: usize,
}

impl DynamicTable {
    fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
        self.evict_to(max_size);
    }

    fn evict_to(&mut self, size: usize) {
        while self.size > size {
            let entry = self.entries.pop_back().expect("a table with a size has entries");
            self.size -= entry.bytes.len() + ENTRY_OVERHEAD;
            if self.spare.len() < SPARE_BUFFERS {
                let mut bytes = entry.bytes;
                bytes.clear();
                self.spare.push(bytes);
            }
        }
    }

    /// Adds an entry; one larger than the whole table empties it and is not kept (§4.4).
    fn insert(&mut self, entry: Entry) {
        let size = entry.bytes.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max_size - size);
        self.entries.push_front(entry);
        self.size += size;
    }
}

// === impl Decoder ===

/// The decoding side of one connection: its dynamic table and the limit the peer must keep it
/// to (the SETTINGS_HEADER_TABLE_SIZE this end sent).
#[derive(Debug)]
pub struct Decoder {
    table: DynamicTable,
    limit: usize,
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl Decoder {
    /// A decoder whose peer may use a dynamic table of up to `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Decoder {
            table: DynamicTable {
                max_size: limit,
                ..DynamicTable::default()
            },
            limit,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// The dynamic table's current size in bytes, entries' overhead included.
    pub fn table_size(&self) -> usize {
        self.table.size
    }

    /// Decodes one complete header block (its HEADERS and CONTINUATION fragments joined),
    /// calling `each` for every field in order. Once the fields add up to more than
    /// `max_list_size` bytes (RFC 9113 §6.5.2, 32 bytes a field included), `each` is no longer
    /// called, the rest is decoded all the same, and the result is
    /// [`DecodeError::ListTooLarge`].
    pub fn decode(
        &mut self,
        mut block: &[u8],
        max_list_size: usize,
        mut each: impl FnMut(Field<'_>),
    ) -> Result<(), DecodeError> {
        let mut list_size = 0usize;
        let mut too_large = false;
        let mut first = true;
        while let Some(&byte) = block.first() {
            let (indexing, never_indexed, prefix) = match byte {
                0x80.. => (false, false, 7),
                0x40.. => (true, false, 6),
                0x20.. => {
                    if !first {
                        return Err(DecodeError::LateSizeUpdate);
                    }
                    let asked = integer(&mut block, 5)?;
                    if asked > self.limit {
                        return Err(DecodeError::TableTooLarge {
                            asked,
                            limit: self.limit,
                        });
                    }
                    self.table.set_max_size(asked);
                    continue;
                }
                0x10.. => (false, true, 4),
                _ => (false, false, 4),
            };
            first = false;
            let index = integer(&mut block, prefix)?;
            let (name, value): (&[u8], &[u8]) = if prefix == 7 {
                // An indexed field: name and value from the tables.
                lookup(&self.table.entries, index)?
            } else {
                let name = if index == 0 {
                    let (name, rest) = string(block, &mut self.name_buf)?;
                    block = rest;
                    name
                } else {
                    lookup(&self.table.entries, index)?.0
                };
                let (value, rest) = string(block, &mut self.value_buf)?;
                block = rest;
                (name, value)
            };
            list_size = list_size.saturating_add(name.len() + value.len() + ENTRY_OVERHEAD);
            too_large |= list_size > max_list_size;
            if !too_large {
                each(Field {
                    name,
                    value,
                    never_indexed,
                });
            }
            if indexing {
                // Copied out before anything is evicted: `name` may be an entry's.
                let mut bytes = self.table.spare.pop().unwrap_or_default();
                bytes.extend_from_slice(name);
                bytes.extend_from_slice(value);
                let name_len = name.len();
                self.table.insert(Entry { bytes, name_len });
            }
        }
        if too_large {
            return Err(DecodeError::ListTooLarge { limit: max_list_size });
        }
        Ok(())
    }
}

/// Entry `index` of the static table (1–61) or of the dynamic table's `entries` (62 on).
fn lookup(entries: &VecDeque<Entry>, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
    match index {
        0 => Err(DecodeError::BadIndex(0)),
        1..=61 => Ok(STATIC[index - 1]),
        _ => entries
            .get(index - 62)
            .map(|e| e.bytes.split_at(e.name_len))
            .ok_or(DecodeError::BadIndex(index)),
    }
}

/// Reads an integer with a `prefix`-bit prefix (RFC 7541 §5.1) from the front of `input`.
fn integer(input: &mut &[u8], prefix: u32) -> Result<usize, DecodeError> {
    let (&first, rest) = input.split_first().ok_or(DecodeError::Truncated)?;
    *input = rest;
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let (&byte, rest) = input.split_first().ok_or(DecodeError::Truncated)?;
        *input = rest;
        // Four continuation bytes carry 28 bits: more than any size or index needs.
        if shift > 21 {
            return Err(DecodeError::IntegerTooLarge);
        }
        value += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// Reads a string literal (RFC 7541 §5.2) from the front of `input`: the string, borrowed from
/// `input` when sent as is or decoded into `buf` when Huffman-coded, and the rest of `input`.
fn string<'o, 'i: 'o, 'b: 'o>(
    mut input: &'i [u8],
    buf: &'b mut Vec<u8>,
) -> Result<(&'o [u8], &'i [u8]), DecodeError> {
    let coded = input.first().ok_or(DecodeError::Truncated)? & 0x80 != 0;
    let len = integer(&mut input, 7)?;
    if len > input.len() {
        return Err(DecodeError::Truncated);
    }
    let (raw, rest) = input.split_at(len);
    if !coded {
        return Ok((raw, rest));
    }
    buf.clear();
    huffman::decode(raw, buf).map_err(DecodeError::Huffman)?;
    Ok((buf.as_slice(), rest))
}

// === impl Encoder ===

/// The encoding side of one connection. It keeps no dynamic table; it only owes the peer a
/// size update when the peer lowers SETTINGS_HEADER_TABLE_SIZE (RFC 7541 §4.2).
#[derive(Debug, Default)]
pub struct Encoder {
    size_update_due: bool,
}

impl Encoder {
    /// The peer's SETTINGS_HEADER_TABLE_SIZE changed: the next block starts by setting the
    /// table to 0, which is within any limit and is what this encoder uses.
    pub fn peer_table_size_changed(&mut self) {
        self.size_update_due = true;
    }

    /// Starts a header block in `out`.
    pub fn begin(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.size_update_due) {
            out.push(0x20);
        }
    }

    /// Appends `:status`: one byte for the seven statuses of the static table.
    pub fn status(&self, status: u16, out: &mut Vec<u8>) {
        let indexed = match status {
            200 => 8,
            204 => 9,
            206 => 10,
            304 => 11,
            400 => 12,
            404 => 13,
            500 => 14,
            _ => 0,
        };
        if indexed != 0 {
            out.push(0x80 | indexed);
            return;
        }
        let digits = [
            b'0' + (status / 100 % 10) as u8,
            b'0' + (status / 10 % 10) as u8,
            b'0' + (status % 10) as u8,
        ];
        put_integer(out, 0x00, 4, 8);
        put_string(out, &digits);
    }

    /// Appends a field as a literal without indexing, or never-indexed when `never_indexed`.
    pub fn field(&self, name: &[u8], value: &[u8], never_indexed: bool, out: &mut Vec<u8>) {
        let flags = if never_indexed { 0x10 } else { 0x00 };
        match static_name_index(name) {
            Some(index) => put_integer(out, flags, 4, index),
            None => {
                out.push(flags);
                put_string(out, name);
            }
        }
        put_string(out, value);
    }
}

/// The first static-table index with this name.
fn static_name_index(name: &[u8]) -> Option<usize> {
    STATIC.iter().position(|(n, _)| *n == name).map(|i| i + 1)
}

/// Appends `value` as an integer with a `prefix`-bit prefix, the first byte's other bits `flags`.
fn put_integer(out: &mut Vec<u8>, flags: u8, prefix: u32, mut value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push(0x80 | (value & 0x7f) as u8);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a string literal as it is (not Huffman-coded).
fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    put_integer(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}
