use super::*;

const MAX: u32 = DEFAULT_MAX_FRAME_SIZE;

/// The one frame in `buf`, which must take all of it.
fn only(buf: &[u8]) -> Frame<'_> {
    let (frame, used) = parse(buf, MAX).unwrap().expect("a whole frame");
    assert_eq!(used, buf.len());
    frame
}

fn raw(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_head(&mut out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
    out
}

fn error(buf: &[u8]) -> FrameError {
    parse(buf, MAX).unwrap_err()
}

fn connection(code: ErrorCode) -> impl Fn(FrameError) -> bool {
    move |e| e.code == code && e.stream.is_none()
}

#[test]
fn what_is_written_reads_back() {
    let mut out = Vec::new();
    put_settings(
        &mut out,
        &[
            (setting::MAX_CONCURRENT_STREAMS, 100),
            (setting::INITIAL_WINDOW_SIZE, 1 << 20),
        ],
    );
    let settings = Settings {
        max_concurrent_streams: Some(100),
        initial_window_size: Some(1 << 20),
        ..Settings::default()
    };
    assert_eq!(only(&out), Frame::Settings { ack: false, settings });
    out.clear();
    put_settings_ack(&mut out);
    assert_eq!(
        only(&out),
        Frame::Settings {
            ack: true,
            settings: Settings::default()
        }
    );
    out.clear();
    put_ping(&mut out, true, *b"12345678");
    assert_eq!(
        only(&out),
        Frame::Ping {
            ack: true,
            payload: *b"12345678"
        }
    );
    out.clear();
    put_window_update(&mut out, 3, 65_535);
    assert_eq!(
        only(&out),
        Frame::WindowUpdate {
            stream: 3,
            increment: 65_535
        }
    );
    out.clear();
    put_rst_stream(&mut out, 5, ErrorCode::CANCEL);
    assert_eq!(
        only(&out),
        Frame::RstStream {
            stream: 5,
            code: ErrorCode::CANCEL
        }
    );
    out.clear();
    put_goaway(&mut out, 7, ErrorCode::ENHANCE_YOUR_CALM, b"too many resets");
    let goaway = Frame::GoAway {
        last_stream: 7,
        code: ErrorCode::ENHANCE_YOUR_CALM,
        debug: b"too many resets",
    };
    assert_eq!(only(&out), goaway);
    out.clear();
    put_data_head(&mut out, 9, 5, true);
    out.extend_from_slice(b"hello");
    assert_eq!(
        only(&out),
        Frame::Data {
            stream: 9,
            end_stream: true,
            data: b"hello",
            flow_len: 5
        }
    );
}

#[test]
fn a_frame_is_read_once_it_is_whole_and_refused_once_its_length_is_known_too_large() {
    let mut out = Vec::new();
    put_ping(&mut out, false, [0; 8]);
    for cut in 0..out.len() {
        assert_eq!(parse(&out[..cut], MAX), Ok(None), "{cut} bytes");
    }
    // Two frames back to back: the first is read, and says where the second starts.
    put_window_update(&mut out, 0, 1);
    let (_, used) = parse(&out, MAX).unwrap().unwrap();
    assert_eq!(
        only(&out[used..]),
        Frame::WindowUpdate {
            stream: 0,
            increment: 1
        }
    );
    // Only the header of a frame one byte too long: refused at once.
    let mut head = Vec::new();
    put_head(&mut head, MAX as usize + 1, DATA, 0, 1);
    assert!(connection(ErrorCode::FRAME_SIZE_ERROR)(error(&head)));
    // The reserved bit of the stream identifier is ignored.
    let mut reserved = raw(DATA, 0, 1, b"x");
    reserved[5] |= 0x80;
    assert!(matches!(only(&reserved), Frame::Data { stream: 1, .. }));
}

#[test]
fn padding_is_removed_and_counted_against_the_window() {
    // Pad length 3, "abc", 3 bytes of padding.
    let frame = raw(DATA, PADDED | END_STREAM, 1, b"\x03abc\0\0\0");
    assert_eq!(
        only(&frame),
        Frame::Data {
            stream: 1,
            end_stream: true,
            data: b"abc",
            flow_len: 7
        }
    );
    assert!(connection(ErrorCode::PROTOCOL_ERROR)(error(&raw(
        DATA, PADDED, 1, b"\x04abc"
    ))));
    assert!(connection(ErrorCode::FRAME_SIZE_ERROR)(error(&raw(
        DATA, PADDED, 1, b""
    ))));
    // HEADERS with padding and a priority: exclusive, on stream 3, weight 16.
    let frame = raw(
        HEADERS,
        PADDED | PRIORITY_FLAG | END_HEADERS,
        5,
        b"\x02\x80\0\0\x03\x10\x82\0\0",
    );
    let priority = Some(Priority {
        exclusive: true,
        depends_on: 3,
        weight: 16,
    });
    let headers = Frame::Headers {
        stream: 5,
        end_stream: false,
        end_headers: true,
        priority,
        fragment: b"\x82",
    };
    assert_eq!(only(&frame), headers);
}

#[test]
fn each_type_is_checked_against_its_rules() {
    let protocol = connection(ErrorCode::PROTOCOL_ERROR);
    let size = connection(ErrorCode::FRAME_SIZE_ERROR);
    // On the wrong kind of stream.
    for kind in [DATA, HEADERS, PRIORITY, RST_STREAM, CONTINUATION] {
        assert!(
            protocol(error(&raw(kind, 0, 0, &[0; 5]))),
            "type {kind} on stream 0"
        );
    }
    for (kind, len) in [(SETTINGS, 0), (PING, 8), (GOAWAY, 8)] {
        assert!(
            protocol(error(&raw(kind, 0, 1, &vec![0; len]))),
            "type {kind} on a stream"
        );
    }
    // Of the wrong length.
    assert!(size(error(&raw(RST_STREAM, 0, 1, &[0; 5]))));
    assert!(size(error(&raw(PING, 0, 0, &[0; 7]))));
    assert!(size(error(&raw(GOAWAY, 0, 0, &[0; 7]))));
    assert!(size(error(&raw(WINDOW_UPDATE, 0, 0, &[0; 3]))));
    assert!(size(error(&raw(SETTINGS, 0, 0, &[0; 5]))));
    assert!(size(error(&raw(SETTINGS, ACK, 0, &[0; 6]))));
    assert!(size(error(&raw(HEADERS, PRIORITY_FLAG, 1, &[0; 4]))));
    let e = error(&raw(PRIORITY, 0, 3, &[0; 4]));
    assert_eq!((e.code, e.stream), (ErrorCode::FRAME_SIZE_ERROR, Some(3)));
    // A stream that depends on itself: that stream's error.
    let e = error(&raw(PRIORITY, 0, 3, &[0, 0, 0, 3, 0]));
    assert_eq!((e.code, e.stream), (ErrorCode::PROTOCOL_ERROR, Some(3)));
    // A window update of 0: the stream's error, or the connection's.
    let e = error(&raw(WINDOW_UPDATE, 0, 3, &[0; 4]));
    assert_eq!((e.code, e.stream), (ErrorCode::PROTOCOL_ERROR, Some(3)));
    assert!(protocol(error(&raw(WINDOW_UPDATE, 0, 0, &[0; 4]))));
    // Push is off at both ends.
    assert!(protocol(error(&raw(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]))));
    // An unknown type is passed on, to be ignored.
    assert_eq!(
        only(&raw(0x42, 0xff, 7, b"anything")),
        Frame::Unknown {
            kind: 0x42,
            stream: 7
        }
    );
}

#[test]
fn settings_values_are_checked_and_unknown_ones_ignored() {
    let settings = |params: &[(u16, u32)]| {
        let mut out = Vec::new();
        put_settings(&mut out, params);
        match parse(&out, MAX) {
            Ok(Some((Frame::Settings { settings, .. }, _))) => Ok(settings),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        }
    };
    let read = settings(&[
        (setting::ENABLE_PUSH, 0),
        (0x99, 7),
        (setting::MAX_FRAME_SIZE, 20_000),
        (setting::MAX_FRAME_SIZE, 30_000),
    ]);
    let want = Settings {
        enable_push: Some(false),
        max_frame_size: Some(30_000),
        ..Settings::default()
    };
    assert_eq!(read, Ok(want));
    let code = |params: &[(u16, u32)]| settings(params).unwrap_err().code;
    assert_eq!(code(&[(setting::ENABLE_PUSH, 2)]), ErrorCode::PROTOCOL_ERROR);
    assert_eq!(
        code(&[(setting::INITIAL_WINDOW_SIZE, MAX_WINDOW + 1)]),
        ErrorCode::FLOW_CONTROL_ERROR
    );
    assert_eq!(
        code(&[(setting::MAX_FRAME_SIZE, DEFAULT_MAX_FRAME_SIZE - 1)]),
        ErrorCode::PROTOCOL_ERROR
    );
    assert_eq!(
        code(&[(setting::MAX_FRAME_SIZE, MAX_MAX_FRAME_SIZE + 1)]),
        ErrorCode::PROTOCOL_ERROR
    );
}

#[test]
fn a_large_header_block_is_split_into_continuations() {
    let block: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
    let mut out = Vec::new();
    put_headers(&mut out, 1, &block, true, MAX);
    let mut rest = out.as_slice();
    let mut fragments = Vec::new();
    let mut kinds = Vec::new();
    while let Some((frame, used)) = parse(rest, MAX).unwrap() {
        match frame {
            Frame::Headers {
                end_stream,
                end_headers,
                fragment,
                ..
            } => {
                kinds.push(("headers", end_stream, end_headers));
                fragments.extend_from_slice(fragment);
            }
            Frame::Continuation {
                end_headers,
                fragment,
                ..
            } => {
                kinds.push(("continuation", false, end_headers));
                fragments.extend_from_slice(fragment);
            }
            other => panic!("{other:?}"),
        }
        rest = &rest[used..];
    }
    assert_eq!(
        kinds,
        [
            ("headers", true, false),
            ("continuation", false, false),
            ("continuation", false, true)
        ]
    );
    assert_eq!(fragments, block);
    // Written straight into the output, the same frames.
    let mut direct = Vec::new();
    put_headers_with(&mut direct, 1, true, MAX, |b| b.extend_from_slice(&block));
    assert_eq!(direct, out);
    // A small one is one HEADERS.
    out.clear();
    put_headers(&mut out, 3, b"\x82", false, MAX);
    let mut direct = vec![0xaa];
    put_headers_with(&mut direct, 3, false, MAX, |b| b.push(0x82));
    assert_eq!(direct[1..], out[..]);
    let headers = Frame::Headers {
        stream: 3,
        end_stream: false,
        end_headers: true,
        priority: None,
        fragment: b"\x82",
    };
    assert_eq!(only(&out), headers);
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut state = 0x243f_6a88_85a3_08d3u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let len = (next() % 40) as usize;
        let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Mostly plausible lengths, so that payloads get checked too.
        if buf.len() >= 3 && next() % 4 != 0 {
            buf[0] = 0;
            buf[1] = 0;
            buf[2] = (next() % 32) as u8;
        }
        let _ = parse(&buf, MAX);
    }
}

#[test]
fn header_blocks_are_joined_and_not_interrupted() {
    let headers = |end_headers| Frame::Headers {
        stream: 1,
        end_stream: true,
        end_headers,
        priority: None,
        fragment: b"ab",
    };
    let continuation = |stream, end_headers, fragment| Frame::Continuation {
        stream,
        end_headers,
        fragment,
    };
    let mut blocks = BlockAssembly::default();
    // Whole in one HEADERS: borrowed as it is.
    let (stream, end, block) = blocks.feed(&headers(true), 100).unwrap().unwrap();
    assert_eq!((stream, end, &*block), (1, true, &b"ab"[..]));
    // Over three frames.
    assert_eq!(blocks.feed(&headers(false), 100), Ok(None));
    assert_eq!(blocks.feed(&continuation(1, false, b"cd"), 100), Ok(None));
    let (_, _, block) = blocks.feed(&continuation(1, true, b"ef"), 100).unwrap().unwrap();
    assert_eq!(&*block, b"abcdef");
    // Other frames pass when no block is open.
    assert_eq!(
        blocks.feed(
            &Frame::Ping {
                ack: false,
                payload: [0; 8]
            },
            100
        ),
        Ok(None)
    );
    // Interrupted by another frame, or by a CONTINUATION of another stream.
    let protocol = connection(ErrorCode::PROTOCOL_ERROR);
    blocks.feed(&headers(false), 100).unwrap();
    assert!(protocol(
        blocks
            .feed(
                &Frame::Ping {
                    ack: false,
                    payload: [0; 8]
                },
                100
            )
            .unwrap_err()
    ));
    let mut blocks = BlockAssembly::default();
    blocks.feed(&headers(false), 100).unwrap();
    assert!(protocol(
        blocks.feed(&continuation(3, true, b"x"), 100).unwrap_err()
    ));
    // A CONTINUATION with no HEADERS before it.
    let mut blocks = BlockAssembly::default();
    assert!(protocol(
        blocks.feed(&continuation(1, true, b"x"), 100).unwrap_err()
    ));
    // Longer than the limit.
    let mut blocks = BlockAssembly::default();
    blocks.feed(&headers(false), 3).unwrap();
    let calm = connection(ErrorCode::ENHANCE_YOUR_CALM);
    assert!(calm(blocks.feed(&continuation(1, false, b"cd"), 3).unwrap_err()));
}
