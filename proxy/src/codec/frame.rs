//! HTTP/2 frames (RFC 9113 §4 and §6): read in place from the bytes received, each checked
//! against the rules of its type, and written.
//!
//! [`parse`] takes the front of a read buffer and returns the first frame with its payload
//! borrowed, `None` while the frame is incomplete, or the error the connection must answer
//! with. A frame longer than this end's SETTINGS_MAX_FRAME_SIZE is refused as soon as its
//! header is in, before its payload is buffered. What needs the connection's state (which
//! stream may send what, CONTINUATION following HEADERS, windows) is the connection's job.
//! Neither end of a cogmesh connection accepts server push, so PUSH_PROMISE is always an error.

/// What every client connection starts with (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The length of a frame header.
pub const HEAD_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE before the peer's SETTINGS, and the least it may be.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
/// The largest SETTINGS_MAX_FRAME_SIZE allowed.
pub const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;
/// The largest flow-control window (RFC 9113 §6.9.1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// The setting identifiers (RFC 9113 §6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// An error code of RST_STREAM and GOAWAY (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    pub const NO_ERROR: ErrorCode = ErrorCode(0x0);
    pub const PROTOCOL_ERROR: ErrorCode = ErrorCode(0x1);
    pub const INTERNAL_ERROR: ErrorCode = ErrorCode(0x2);
    pub const FLOW_CONTROL_ERROR: ErrorCode = ErrorCode(0x3);
    pub const SETTINGS_TIMEOUT: ErrorCode = ErrorCode(0x4);
    pub const STREAM_CLOSED: ErrorCode = ErrorCode(0x5);
    pub const FRAME_SIZE_ERROR: ErrorCode = ErrorCode(0x6);
    pub const REFUSED_STREAM: ErrorCode = ErrorCode(0x7);
    pub const CANCEL: ErrorCode = ErrorCode(0x8);
    pub const COMPRESSION_ERROR: ErrorCode = ErrorCode(0x9);
    pub const CONNECT_ERROR: ErrorCode = ErrorCode(0xa);
    pub const ENHANCE_YOUR_CALM: ErrorCode = ErrorCode(0xb);
    pub const INADEQUATE_SECURITY: ErrorCode = ErrorCode(0xc);
    pub const HTTP_1_1_REQUIRED: ErrorCode = ErrorCode(0xd);
}

/// A frame that breaks the rules: the connection answers with GOAWAY (`stream` is `None`) or
/// resets the one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({code:?})")]
pub struct FrameError {
    pub code: ErrorCode,
    pub stream: Option<u32>,
    pub reason: &'static str,
}

/// An error of the whole connection (answered with GOAWAY).
pub fn connection_error(code: ErrorCode, reason: &'static str) -> FrameError {
    FrameError {
        code,
        stream: None,
        reason,
    }
}

/// What is left of a connection's receive `window` after a DATA frame of `flow_len`, or the
/// connection's FLOW_CONTROL_ERROR when the frame did not fit in it.
pub fn take_window(window: i64, flow_len: u32) -> Result<i64, FrameError> {
    let left = window - i64::from(flow_len);
    if left < 0 {
        return Err(connection_error(
            ErrorCode::FLOW_CONTROL_ERROR,
            "DATA past the connection window",
        ));
    }
    Ok(left)
}

/// A stream's priority as HEADERS or PRIORITY carry it; RFC 9113 deprecates the scheme, so it
/// is only checked, not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    pub exclusive: bool,
    pub depends_on: u32,
    pub weight: u8,
}

/// The parameters of a SETTINGS frame, each `None` when it did not carry it (the last value
/// wins when one comes twice; unknown identifiers are ignored, RFC 9113 §6.5.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    pub header_table_size: Option<u32>,
    pub enable_push: Option<bool>,
    pub max_concurrent_streams: Option<u32>,
    pub initial_window_size: Option<u32>,
    pub max_frame_size: Option<u32>,
    pub max_header_list_size: Option<u32>,
}

/// One frame, its payload borrowed from the buffer it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Data {
        stream: u32,
        end_stream: bool,
        data: &'a [u8],
        /// What the frame counts against the windows: its whole payload, padding included.
        flow_len: u32,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        priority: Option<Priority>,
        fragment: &'a [u8],
    },
    Priority {
        stream: u32,
        priority: Priority,
    },
    RstStream {
        stream: u32,
        code: ErrorCode,
    },
    Settings {
        ack: bool,
        settings: Settings,
    },
    Ping {
        ack: bool,
        payload: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: ErrorCode,
        debug: &'a [u8],
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        fragment: &'a [u8],
    },
    /// A frame of a type this codec does not know, which is ignored (RFC 9113 §5.5).
    Unknown {
        kind: u8,
        stream: u32,
    },
}

/// Reads the frame at the front of `buf`: the frame and how many bytes it took, or `None`
/// while it is incomplete. `max_frame_size` is the SETTINGS_MAX_FRAME_SIZE this end sent.
pub fn parse(buf: &[u8], max_frame_size: u32) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(head) = buf.get(..HEAD_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
    let (kind, flags) = (head[3], head[4]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & MAX_WINDOW;
    if len > max_frame_size {
        return Err(connection_error(
            ErrorCode::FRAME_SIZE_ERROR,
            "frame longer than SETTINGS_MAX_FRAME_SIZE",
        ));
    }
    let end = HEAD_LEN + len as usize;
    let Some(payload) = buf.get(HEAD_LEN..end) else {
        return Ok(None);
    };
    let frame = match kind {
        DATA => {
            on_a_stream(stream, "DATA on stream 0")?;
            Frame::Data {
                stream,
                end_stream: flags & END_STREAM != 0,
                data: unpadded(payload, flags)?,
                flow_len: len,
            }
        }
        HEADERS => {
            on_a_stream(stream, "HEADERS on stream 0")?;
            let mut fragment = unpadded(payload, flags)?;
            let priority = if flags & PRIORITY_FLAG != 0 {
                let Some((fields, rest)) = fragment.split_first_chunk::<5>() else {
                    return Err(connection_error(
                        ErrorCode::FRAME_SIZE_ERROR,
                        "HEADERS too short for its priority",
                    ));
                };
                fragment = rest;
                Some(priority(stream, fields)?)
            } else {
                None
            };
            Frame::Headers {
                stream,
                end_stream: flags & END_STREAM != 0,
                end_headers: flags & END_HEADERS != 0,
                priority,
                fragment,
            }
        }
        PRIORITY => {
            on_a_stream(stream, "PRIORITY on stream 0")?;
            let Ok(fields) = <&[u8; 5]>::try_from(payload) else {
                return Err(FrameError {
                    code: ErrorCode::FRAME_SIZE_ERROR,
                    stream: Some(stream),
                    reason: "PRIORITY is not 5 bytes long",
                });
            };
            Frame::Priority {
                stream,
                priority: priority(stream, fields)?,
            }
        }
        RST_STREAM => {
            on_a_stream(stream, "RST_STREAM on stream 0")?;
            let code = exactly::<4>(payload, "RST_STREAM is not 4 bytes long")?;
            Frame::RstStream {
                stream,
                code: ErrorCode(u32::from_be_bytes(code)),
            }
        }
        SETTINGS => {
            on_the_connection(stream, "SETTINGS on a stream")?;
            let ack = flags & ACK != 0;
            if ack && len != 0 {
                return Err(connection_error(
                    ErrorCode::FRAME_SIZE_ERROR,
                    "SETTINGS ack with a payload",
                ));
            }
            Frame::Settings {
                ack,
                settings: settings(payload)?,
            }
        }
        PUSH_PROMISE => {
            return Err(connection_error(
                ErrorCode::PROTOCOL_ERROR,
                "PUSH_PROMISE, and push is disabled",
            ))
        }
        PING => {
            on_the_connection(stream, "PING on a stream")?;
            Frame::Ping {
                ack: flags & ACK != 0,
                payload: exactly::<8>(payload, "PING is not 8 bytes long")?,
            }
        }
        GOAWAY => {
            on_the_connection(stream, "GOAWAY on a stream")?;
            let Some((fields, debug)) = payload.split_first_chunk::<8>() else {
                return Err(connection_error(
                    ErrorCode::FRAME_SIZE_ERROR,
                    "GOAWAY shorter than 8 bytes",
                ));
            };
            let [a, b, c, d, e, f, g, h] = *fields;
            Frame::GoAway {
                last_stream: u32::from_be_bytes([a, b, c, d]) & MAX_WINDOW,
                code: ErrorCode(u32::from_be_bytes([e, f, g, h])),
                debug,
            }
        }
        WINDOW_UPDATE => {
            let increment = u32::from_be_bytes(exactly::<4>(payload, "WINDOW_UPDATE is not 4 bytes long")?);
            let increment = increment & MAX_WINDOW;
            if increment == 0 {
                return Err(FrameError {
                    code: ErrorCode::PROTOCOL_ERROR,
                    stream: (stream != 0).then_some(stream),
                    reason: "WINDOW_UPDATE of 0",
                });
            }
            Frame::WindowUpdate { stream, increment }
        }
        CONTINUATION => {
            on_a_stream(stream, "CONTINUATION on stream 0")?;
            Frame::Continuation {
                stream,
                end_headers: flags & END_HEADERS != 0,
                fragment: payload,
            }
        }
        kind => Frame::Unknown { kind, stream },
    };
    Ok(Some((frame, end)))
}

fn on_a_stream(stream: u32, reason: &'static str) -> Result<(), FrameError> {
    match stream {
        0 => Err(connection_error(ErrorCode::PROTOCOL_ERROR, reason)),
        _ => Ok(()),
    }
}

fn on_the_connection(stream: u32, reason: &'static str) -> Result<(), FrameError> {
    match stream {
        0 => Ok(()),
        _ => Err(connection_error(ErrorCode::PROTOCOL_ERROR, reason)),
    }
}

fn exactly<const N: usize>(payload: &[u8], reason: &'static str) -> Result<[u8; N], FrameError> {
    <[u8; N]>::try_from(payload).map_err(|_| connection_error(ErrorCode::FRAME_SIZE_ERROR, reason))
}

/// The payload of a DATA or HEADERS frame without its padding (RFC 9113 §6.1).
fn unpadded(payload: &[u8], flags: u8) -> Result<&[u8], FrameError> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let Some((&pad, rest)) = payload.split_first() else {
        return Err(connection_error(
            ErrorCode::FRAME_SIZE_ERROR,
            "padded frame without a pad length",
        ));
    };
    match rest.len().checked_sub(usize::from(pad)) {
        Some(len) => Ok(&rest[..len]),
        None => Err(connection_error(
            ErrorCode::PROTOCOL_ERROR,
            "padding longer than the payload",
        )),
    }
}

fn priority(stream: u32, fields: &[u8; 5]) -> Result<Priority, FrameError> {
    let word = u32::from_be_bytes([fields[0], fields[1], fields[2], fields[3]]);
    let depends_on = word & MAX_WINDOW;
    if depends_on == stream {
        return Err(FrameError {
            code: ErrorCode::PROTOCOL_ERROR,
            stream: Some(stream),
            reason: "a stream depends on itself",
        });
    }
    Ok(Priority {
        exclusive: word >> 31 == 1,
        depends_on,
        weight: fields[4],
    })
}

fn settings(payload: &[u8]) -> Result<Settings, FrameError> {
    if !payload.len().is_multiple_of(6) {
        return Err(connection_error(
            ErrorCode::FRAME_SIZE_ERROR,
            "SETTINGS not a multiple of 6 bytes long",
        ));
    }
    let mut s = Settings::default();
    for param in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([param[0], param[1]]);
        let value = u32::from_be_bytes([param[2], param[3], param[4], param[5]]);
        match id {
            setting::HEADER_TABLE_SIZE => s.header_table_size = Some(value),
            setting::ENABLE_PUSH => match value {
                0 | 1 => s.enable_push = Some(value == 1),
                _ => {
                    return Err(connection_error(
                        ErrorCode::PROTOCOL_ERROR,
                        "SETTINGS_ENABLE_PUSH not 0 or 1",
                    ))
                }
            },
            setting::MAX_CONCURRENT_STREAMS => s.max_concurrent_streams = Some(value),
            setting::INITIAL_WINDOW_SIZE if value > MAX_WINDOW => {
                return Err(connection_error(
                    ErrorCode::FLOW_CONTROL_ERROR,
                    "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                ))
            }
            setting::INITIAL_WINDOW_SIZE => s.initial_window_size = Some(value),
            setting::MAX_FRAME_SIZE if !(DEFAULT_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&value) => {
                return Err(connection_error(
                    ErrorCode::PROTOCOL_ERROR,
                    "SETTINGS_MAX_FRAME_SIZE outside 2^14..2^24-1",
                ))
            }
            setting::MAX_FRAME_SIZE => s.max_frame_size = Some(value),
            setting::MAX_HEADER_LIST_SIZE => s.max_header_list_size = Some(value),
            _ => {}
        }
    }
    Ok(s)
}

/// Joins a header block's fragments: HEADERS, then CONTINUATIONs on the same stream until
/// END_HEADERS, nothing else in between (RFC 9113 §6.10).
#[derive(Debug, Default)]
pub struct BlockAssembly {
    /// The stream, its END_STREAM, and the fragments so far.
    pending: Option<(u32, bool, Vec<u8>)>,
}

/// A complete header block: its stream, whether it ends the stream, and the block.
pub type HeaderBlock<'a> = (u32, bool, std::borrow::Cow<'a, [u8]>);

impl BlockAssembly {
    /// Takes every frame in order: a header block once complete (`None` for other frames and
    /// while one is incomplete), or the error of a block interrupted or longer than
    /// `max_len`.
    pub fn feed<'a>(
        &mut self,
        frame: &Frame<'a>,
        max_len: usize,
    ) -> Result<Option<HeaderBlock<'a>>, FrameError> {
        match *frame {
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                fragment,
                ..
            } if self.pending.is_none() => {
                if end_headers {
                    return Ok(Some((stream, end_stream, std::borrow::Cow::Borrowed(fragment))));
                }
                self.pending = Some((stream, end_stream, fragment.to_vec()));
                Ok(None)
            }
            Frame::Continuation {
                stream,
                end_headers,
                fragment,
            } => match self.pending.take() {
                Some((id, end_stream, mut block)) if id == stream => {
                    block.extend_from_slice(fragment);
                    if block.len() > max_len {
                        return Err(FrameError {
                            code: ErrorCode::ENHANCE_YOUR_CALM,
                            stream: None,
                            reason: "a header block longer than the limit",
                        });
                    }
                    if end_headers {
                        return Ok(Some((id, end_stream, std::borrow::Cow::Owned(block))));
                    }
                    self.pending = Some((id, end_stream, block));
                    Ok(None)
                }
                _ => Err(connection_error(
                    ErrorCode::PROTOCOL_ERROR,
                    "CONTINUATION without its HEADERS",
                )),
            },
            _ if self.pending.is_some() => Err(connection_error(
                ErrorCode::PROTOCOL_ERROR,
                "a header block interrupted",
            )),
            _ => Ok(None),
        }
    }
}

// === writing ===

/// Appends a frame header.
pub fn put_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len <= MAX_MAX_FRAME_SIZE as usize);
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&(stream & MAX_WINDOW).to_be_bytes());
}

/// Appends the header of a DATA frame of `len` bytes; the data follows it on the wire.
pub fn put_data_head(out: &mut Vec<u8>, stream: u32, len: usize, end_stream: bool) {
    put_head(out, len, DATA, if end_stream { END_STREAM } else { 0 }, stream);
}

/// Appends a header block as HEADERS and, past `max_frame_size` (the peer's), CONTINUATIONs.
pub fn put_headers(out: &mut Vec<u8>, stream: u32, block: &[u8], end_stream: bool, max_frame_size: u32) {
    let max = max_frame_size as usize;
    let mut chunks = block.chunks(max.max(1)).peekable();
    let first = chunks.next().unwrap_or_default();
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if chunks.peek().is_none() {
        flags |= END_HEADERS;
    }
    put_head(out, first.len(), HEADERS, flags, stream);
    out.extend_from_slice(first);
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() { END_HEADERS } else { 0 };
        put_head(out, chunk.len(), CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
    }
}

/// Appends a header block that `encode` writes straight into `out`, as HEADERS (and, past
/// `max_frame_size`, CONTINUATIONs): no copy of the block when it fits one frame.
pub fn put_headers_with(
    out: &mut Vec<u8>,
    stream: u32,
    end_stream: bool,
    max_frame_size: u32,
    encode: impl FnOnce(&mut Vec<u8>),
) {
    let head = out.len();
    out.extend_from_slice(&[0; HEAD_LEN]);
    encode(out);
    let len = out.len() - head - HEAD_LEN;
    if len > max_frame_size as usize {
        let block = out.split_off(head + HEAD_LEN);
        out.truncate(head);
        put_headers(out, stream, &block, end_stream, max_frame_size);
        return;
    }
    let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
    let mut fields = Vec::with_capacity(HEAD_LEN);
    put_head(&mut fields, len, HEADERS, flags, stream);
    out[head..head + HEAD_LEN].copy_from_slice(&fields);
}

/// Appends SETTINGS with these (identifier, value) pairs.
pub fn put_settings(out: &mut Vec<u8>, params: &[(u16, u32)]) {
    put_head(out, params.len() * 6, SETTINGS, 0, 0);
    for (id, value) in params {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// Appends the acknowledgement of the peer's SETTINGS.
pub fn put_settings_ack(out: &mut Vec<u8>) {
    put_head(out, 0, SETTINGS, ACK, 0);
}

/// Appends a PING, or the answer to one (`ack`, with the payload it carried).
pub fn put_ping(out: &mut Vec<u8>, ack: bool, payload: [u8; 8]) {
    put_head(out, 8, PING, if ack { ACK } else { 0 }, 0);
    out.extend_from_slice(&payload);
}

/// Appends a WINDOW_UPDATE of the connection (`stream` 0) or a stream.
pub fn put_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    put_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&(increment & MAX_WINDOW).to_be_bytes());
}

/// Appends an RST_STREAM.
pub fn put_rst_stream(out: &mut Vec<u8>, stream: u32, code: ErrorCode) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.extend_from_slice(&code.0.to_be_bytes());
}

/// Appends a GOAWAY: the last stream this end has acted on or may act on, and why.
pub fn put_goaway(out: &mut Vec<u8>, last_stream: u32, code: ErrorCode, debug: &[u8]) {
    put_head(out, 8 + debug.len(), GOAWAY, 0, 0);
    out.extend_from_slice(&(last_stream & MAX_WINDOW).to_be_bytes());
    out.extend_from_slice(&code.0.to_be_bytes());
    out.extend_from_slice(debug);
}

#[cfg(test)]
mod tests;
