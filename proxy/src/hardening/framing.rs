//! HTTP/1 message boundaries of a client connection, just enough to find every request head:
//! a head is held back until complete and checked, a body of known length is passed in bulk, a
//! chunked body is followed chunk by chunk. Anything this does not understand (HTTP/2 preface,
//! malformed heads, upgrades, `CONNECT`) is passed on untouched, and hyper has the last word.

use std::mem::MaybeUninit;

/// What became of the bytes fed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passed on (perhaps after a held-back head).
    Pass,
    /// A request head was refused as a smuggling attempt; everything after it is dropped.
    Refused,
    /// A request head was larger than allowed; everything after it is dropped.
    TooLarge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Head,
    /// Body bytes left.
    Fixed(u64),
    Chunked(Chunk),
    /// Not checked any more: passed through.
    Opaque,
    /// After a refused head: dropped.
    Discard,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Size(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer section after the last chunk; `true` at the start of a line.
    Trailer(bool),
    TrailerLf(bool),
}

/// The state of one connection's request stream.
#[derive(Debug)]
pub struct Framing {
    phase: Phase,
    head: Vec<u8>,
    max_head: usize,
    heads: u64,
}

impl Framing {
    pub fn new(max_head_bytes: usize) -> Self {
        Framing {
            phase: Phase::Head,
            head: Vec::new(),
            max_head: max_head_bytes,
            heads: 0,
        }
    }

    pub fn is_opaque(&self) -> bool {
        self.phase == Phase::Opaque
    }

    /// Body bytes that may go to hyper unchecked right now (a sized body or chunk data), so a
    /// caller can read them straight into hyper's buffer; `None` when bytes must be fed.
    pub fn body_left(&self) -> Option<u64> {
        match self.phase {
            Phase::Fixed(n) | Phase::Chunked(Chunk::Data(n)) => Some(n),
            _ => None,
        }
    }

    /// `n` body bytes (at most [`Framing::body_left`]) went to hyper directly.
    pub fn skipped(&mut self, n: u64) {
        self.phase = match self.phase {
            Phase::Fixed(left) if left > n => Phase::Fixed(left - n),
            Phase::Fixed(_) => Phase::Head,
            Phase::Chunked(Chunk::Data(left)) if left > n => Phase::Chunked(Chunk::Data(left - n)),
            Phase::Chunked(Chunk::Data(_)) => Phase::Chunked(Chunk::DataCr),
            other => other,
        };
    }

    /// Complete request heads seen (and passed or refused).
    pub fn heads_seen(&self) -> u64 {
        self.heads
    }

    /// Input ended: whatever is held back goes on as it is.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.head);
    }

    /// Feeds bytes read from the client; what hyper may read is appended to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Verdict {
        while !data.is_empty() {
            match self.phase {
                Phase::Discard => return Verdict::Refused,
                Phase::Opaque => {
                    out.extend_from_slice(data);
                    return Verdict::Pass;
                }
                Phase::Fixed(left) => {
                    let n = left.min(data.len() as u64) as usize;
                    out.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    self.phase = if left == n as u64 {
                        Phase::Head
                    } else {
                        Phase::Fixed(left - n as u64)
                    };
                }
                Phase::Chunked(Chunk::Data(left)) => {
                    let n = left.min(data.len() as u64) as usize;
                    out.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    self.phase = Phase::Chunked(if left == n as u64 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left - n as u64)
                    });
                }
                Phase::Chunked(state) => {
                    out.push(data[0]);
                    self.phase = next_chunk_state(state, data[0]);
                    data = &data[1..];
                }
                Phase::Head => {
                    // Empty lines before a request line are allowed (RFC 9112 §2.2).
                    if self.head.is_empty() {
                        let skip = data.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
                        out.extend_from_slice(&data[..skip]);
                        data = &data[skip..];
                        if data.is_empty() {
                            break;
                        }
                    }
                    let before = self.head.len();
                    self.head.extend_from_slice(data);
                    match self.check_head() {
                        HeadCheck::Partial if self.head.len() > self.max_head => {
                            self.head.clear();
                            self.phase = Phase::Discard;
                            return Verdict::TooLarge;
                        }
                        HeadCheck::Partial => return Verdict::Pass,
                        HeadCheck::Complete(len, _) if len > self.max_head => {
                            self.heads += 1;
                            self.head.clear();
                            self.phase = Phase::Discard;
                            return Verdict::TooLarge;
                        }
                        HeadCheck::Unknown => {
                            out.append(&mut self.head);
                            self.phase = Phase::Opaque;
                            return Verdict::Pass;
                        }
                        HeadCheck::Refuse => {
                            self.heads += 1;
                            self.head.clear();
                            self.phase = Phase::Discard;
                            return Verdict::Refused;
                        }
                        HeadCheck::Complete(len, next) => {
                            self.heads += 1;
                            let rest_from = len - before;
                            out.extend_from_slice(&self.head[..len]);
                            self.head.clear();
                            self.phase = next;
                            data = &data[rest_from..];
                        }
                    }
                }
            }
        }
        Verdict::Pass
    }

    fn check_head(&self) -> HeadCheck {
        if let Some(len) = plain_head_len(&self.head) {
            return HeadCheck::Complete(len, Phase::Head);
        }
        // Uninitialized slots: initializing 128 headers would cost more than the parse.
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
        let mut heap: Vec<MaybeUninit<httparse::Header<'_>>>;
        let mut req = httparse::Request::new(&mut []);
        let parsed = match req.parse_with_uninit_headers(&self.head, &mut stack) {
            Err(httparse::Error::TooManyHeaders) => {
                // Rare: parse again with room for as many headers as the head can hold.
                heap = (0..self.head.len() / 3 + 1)
                    .map(|_| MaybeUninit::uninit())
                    .collect();
                req = httparse::Request::new(&mut []);
                req.parse_with_uninit_headers(&self.head, &mut heap)
            }
            other => other,
        };
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return HeadCheck::Partial,
            Err(_) => return HeadCheck::Unknown,
        };
        head_framing(&req).map_or(HeadCheck::Refuse, |next| match next {
            Some(phase) => HeadCheck::Complete(len, phase),
            None => HeadCheck::Unknown,
        })
    }
}

/// The length of `head` when it is a complete HTTP/1.x request head whose message certainly has
/// no body: a request line with an upper-case method other than `CONNECT`, ending in
/// ` HTTP/1.1` or ` HTTP/1.0`, and no
/// header line named `Content-Length`, `Transfer-Encoding` or `Upgrade` (in any case) before
/// the first empty line. `None` sends the head to the full parse.
///
/// Most requests (GETs) look like this, and telling so takes a scan for line ends and a look
/// at each line's first bytes: callgrind counted about 1,500 instructions per request less
/// than a full parse. It cannot disagree with hyper where it matters: hyper finds a body only
/// through those three names at the start of a header line, and the head ends for both at the
/// first empty line (lines end in LF, with or without CR). A head that is malformed otherwise
/// passes here and hyper refuses it (400, connection closed), as it would after a full parse.
pub(super) fn plain_head_len(head: &[u8]) -> Option<usize> {
    let line_end = memchr::memchr(b'\n', head)?;
    let request_line = head[..line_end].strip_suffix(b"\r").unwrap_or(&head[..line_end]);
    let method = request_line.split(|b| *b == b' ').next().unwrap_or_default();
    if !(request_line.ends_with(b" HTTP/1.1") || request_line.ends_with(b" HTTP/1.0"))
        || method.is_empty()
        || !method.iter().all(u8::is_ascii_uppercase)
        || method == b"CONNECT"
    {
        return None;
    }
    let mut at = line_end + 1;
    loop {
        let rest = &head[at..];
        match rest {
            [b'\n', ..] => return Some(at + 1),
            [b'\r', b'\n', ..] => return Some(at + 2),
            _ => {}
        }
        if [&b"content-length:"[..], b"transfer-encoding:", b"upgrade:"]
            .iter()
            .any(|name| rest.len() >= name.len() && rest[..name.len()].eq_ignore_ascii_case(name))
        {
            return None;
        }
        at += memchr::memchr(b'\n', rest)? + 1;
    }
}

enum HeadCheck {
    Partial,
    /// Not understood: pass it on and stop checking.
    Unknown,
    Refuse,
    Complete(usize, Phase),
}

/// How the body after a parsed head is framed: `Err` for a smuggling attempt (`Content-Length`
/// with `Transfer-Encoding`, or `Content-Length` values that disagree), `Ok(None)` when the
/// connection leaves HTTP/1 framing or hyper will reject the head anyway.
fn head_framing(req: &httparse::Request<'_, '_>) -> Result<Option<Phase>, ()> {
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut upgrade = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|b| *b == b',') {
                let Some(n) = parse_decimal(part.trim_ascii()) else {
                    return Ok(None);
                };
                match length {
                    Some(prev) if prev != n => return Err(()),
                    _ => length = Some(n),
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    match (length, chunked) {
        (Some(_), Some(_)) => Err(()),
        _ if upgrade => Ok(None),
        (_, Some(false)) => Ok(None),
        (_, Some(true)) => Ok(Some(Phase::Chunked(Chunk::Size(0)))),
        (Some(0) | None, None) => Ok(Some(Phase::Head)),
        (Some(n), None) => Ok(Some(Phase::Fixed(n))),
    }
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// One byte of chunked framing outside chunk data. Malformed framing leaves it to hyper.
fn next_chunk_state(state: Chunk, b: u8) -> Phase {
    let chunk = match state {
        Chunk::Size(n) => match (b as char).to_digit(16) {
            Some(d) => match n.checked_mul(16) {
                Some(m) => Chunk::Size(m + u64::from(d)),
                None => return Phase::Opaque,
            },
            None if b == b';' || b == b' ' || b == b'\t' => Chunk::Extension(n),
            None if b == b'\r' => Chunk::SizeLf(n),
            None => return Phase::Opaque,
        },
        Chunk::Extension(n) => {
            if b == b'\r' {
                Chunk::SizeLf(n)
            } else {
                Chunk::Extension(n)
            }
        }
        Chunk::SizeLf(0) if b == b'\n' => Chunk::Trailer(true),
        Chunk::SizeLf(n) if b == b'\n' => Chunk::Data(n),
        Chunk::DataCr if b == b'\r' => Chunk::DataLf,
        Chunk::DataLf if b == b'\n' => Chunk::Size(0),
        Chunk::Trailer(start) if b == b'\r' => Chunk::TrailerLf(start),
        Chunk::Trailer(_) => Chunk::Trailer(false),
        Chunk::TrailerLf(true) if b == b'\n' => return Phase::Head,
        Chunk::TrailerLf(false) if b == b'\n' => Chunk::Trailer(true),
        _ => return Phase::Opaque,
    };
    Phase::Chunked(chunk)
}
