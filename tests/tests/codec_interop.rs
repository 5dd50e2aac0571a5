//! cogmesh's HPACK codec (`cogmesh_proxy::codec::hpack`) against Python's `hpack`, the HPACK of the
//! python-hyper HTTP/2 stack, in both directions: header blocks that Python encodes (Huffman
//! strings, its dynamic table filling, evicting and resized) decode to the same fields here,
//! and blocks encoded here decode to the same fields in Python.

use std::io::Write;
use std::process::{Command, Stdio};

use cogmesh_e2e::python;
use cogmesh_proxy::codec::frame::{self, ErrorCode, Frame};
use cogmesh_proxy::codec::hpack::{Decoder, Encoder, DEFAULT_TABLE_SIZE};
use serde_json::{json, Value};

/// Prints, per line, a block Python encoded and the fields it holds: 300 requests on one
/// connection, fields drawn with a fixed seed from a small set and from a pool of 40 random
/// ones (so the dynamic table is referred to, and evicts), plus new random ones, a few
/// never-indexed, the table size changed twice.
const PYTHON_ENCODES: &str = r#"
import json, random
from hpack import Encoder, NeverIndexedHeaderTuple
rnd = random.Random(7)
e = Encoder()
def random_field():
    name = "x-" + "".join(rnd.choice("abcdefghij-") for _ in range(rnd.randint(1, 20)))
    value = "".join(chr(rnd.randint(32, 126)) for _ in range(rnd.randint(0, 80)))
    return NeverIndexedHeaderTuple(name, value) if rnd.random() < 0.2 else (name, value)
pool = [random_field() for _ in range(40)]
common = [(":method", "GET"), (":method", "POST"), (":path", "/"), (":authority", "svc.local:8080"),
          ("user-agent", "grpc-python/1.0"), ("content-type", "application/grpc"), ("te", "trailers")]
for i in range(300):
    if i == 100:
        e.header_table_size = 256
    if i == 200:
        e.header_table_size = 4096
    fields = rnd.sample(common, rnd.randint(1, len(common))) + rnd.sample(pool, rnd.randint(0, 6))
    for _ in range(rnd.randint(0, 3)):
        fields.append(random_field())
    block = e.encode(fields, huffman=rnd.random() < 0.8)
    out = [[n, v, isinstance(f, NeverIndexedHeaderTuple)] for f in fields for (n, v) in [tuple(f)]]
    print(json.dumps({"block": block.hex(), "fields": out}))
"#;

/// Reads blocks (hex, one per line) and prints each one's fields as JSON.
const PYTHON_DECODES: &str = r#"
import json, sys
from hpack import Decoder, NeverIndexedHeaderTuple
d = Decoder()
for line in sys.stdin:
    fields = d.decode(bytes.fromhex(line.strip()), raw=True)
    print(json.dumps([[n.decode("latin-1"), v.decode("latin-1"), isinstance(f, NeverIndexedHeaderTuple)]
                      for f in fields for (n, v) in [tuple(f)]]))
"#;

/// What the Python `script` prints, a JSON value a line, for `input` on its standard input.
fn python_lines(script: &str, input: &str) -> Vec<Value> {
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn as_fields(v: &Value) -> Vec<(String, String, bool)> {
    v.as_array()
        .expect("a list of fields")
        .iter()
        .map(|f| {
            (
                f[0].as_str().unwrap().to_string(),
                f[1].as_str().unwrap().to_string(),
                f[2].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn blocks_python_encodes_decode_to_the_same_fields() {
    let out = Command::new(python())
        .args(["-c", PYTHON_ENCODES])
        .output()
        .expect("python runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut decoder = Decoder::new(DEFAULT_TABLE_SIZE);
    let mut blocks = 0;
    let mut largest_table = [0; 3];
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let case: Value = serde_json::from_str(line).unwrap();
        let hex = case["block"].as_str().unwrap();
        let block: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let mut got = Vec::new();
        decoder
            .decode(&block, usize::MAX, |f| {
                got.push((
                    String::from_utf8(f.name.to_vec()).unwrap(),
                    String::from_utf8(f.value.to_vec()).unwrap(),
                    f.never_indexed,
                ))
            })
            .unwrap_or_else(|e| panic!("block {blocks}: {e}"));
        assert_eq!(got, as_fields(&case["fields"]), "block {blocks}");
        let third = &mut largest_table[blocks / 100];
        *third = (*third).max(decoder.table_size());
        blocks += 1;
    }
    assert_eq!(blocks, 300);
    // The table filled up, was cut to 256 bytes by a size update, and grew again.
    assert!(largest_table[0] > 3000, "{largest_table:?}");
    assert!(
        largest_table[1] <= 256 && largest_table[1] > 0,
        "{largest_table:?}"
    );
    assert!(largest_table[2] > 3000, "{largest_table:?}");
}

#[test]
fn blocks_encoded_here_decode_to_the_same_fields_in_python() {
    let mut encoder = Encoder::default();
    let mut sent = Vec::new();
    let mut input = String::new();
    for i in 0..200u32 {
        let mut block = Vec::new();
        if i == 50 {
            encoder.peer_table_size_changed();
        }
        encoder.begin(&mut block);
        let status = [200u16, 201, 404, 503][(i % 4) as usize];
        encoder.status(status, &mut block);
        let mut fields = vec![(":status".to_string(), status.to_string(), false)];
        for (n, name) in ["content-type", "x-request-id", "set-cookie", "server"]
            .iter()
            .enumerate()
        {
            if (i as usize + n).is_multiple_of(3) {
                continue;
            }
            let value = format!("{name}-{i}-{}", "v".repeat((i as usize * 7 + n) % 90));
            let never = *name == "set-cookie";
            encoder.field(name.as_bytes(), value.as_bytes(), never, &mut block);
            fields.push((name.to_string(), value, never));
        }
        input.extend(block.iter().map(|b| format!("{b:02x}")));
        input.push('\n');
        sent.push(fields);
    }
    let decoded: Vec<_> = python_lines(PYTHON_DECODES, &input)
        .iter()
        .map(as_fields)
        .collect();
    assert_eq!(decoded, sent);
}

/// How a frame is described on both sides of the frame tests: its type, then its fields.
const PYTHON_DESCRIBES: &str = r#"
from hyperframe.frame import *
def describe(f):
    flags = f.flags
    if isinstance(f, DataFrame):
        return ["DATA", f.stream_id, "END_STREAM" in flags, f.data.hex(), f.flow_controlled_length]
    if isinstance(f, HeadersFrame):
        prio = [f.exclusive, f.depends_on, f.stream_weight] if "PRIORITY" in flags else None
        return ["HEADERS", f.stream_id, "END_STREAM" in flags, "END_HEADERS" in flags, prio, f.data.hex()]
    if isinstance(f, PriorityFrame):
        return ["PRIORITY", f.stream_id, [f.exclusive, f.depends_on, f.stream_weight]]
    if isinstance(f, RstStreamFrame):
        return ["RST_STREAM", f.stream_id, f.error_code]
    if isinstance(f, SettingsFrame):
        return ["SETTINGS", "ACK" in flags, {str(k): v for k, v in sorted(f.settings.items())}]
    if isinstance(f, PingFrame):
        return ["PING", "ACK" in flags, f.opaque_data.hex()]
    if isinstance(f, GoAwayFrame):
        return ["GOAWAY", f.last_stream_id, f.error_code, f.additional_data.hex()]
    if isinstance(f, WindowUpdateFrame):
        return ["WINDOW_UPDATE", f.stream_id, f.window_increment]
    if isinstance(f, ContinuationFrame):
        return ["CONTINUATION", f.stream_id, "END_HEADERS" in flags, f.data.hex()]
    raise ValueError(f)
"#;

/// Writes frames of every type, one per line: the bytes, then the description.
const PYTHON_WRITES_FRAMES: &str = r#"
import json
S = SettingsFrame
frames = [
    DataFrame(1, data=b"hello", flags=["END_STREAM"]),
    DataFrame(3, data=b"abc", flags=["PADDED"], pad_length=5),
    DataFrame(3, data=b""),
    HeadersFrame(5, data=bytes.fromhex("828684"), flags=["END_HEADERS", "PRIORITY"], depends_on=3,
                 stream_weight=15, exclusive=True),
    HeadersFrame(7, data=b"\x82" * 100, flags=["END_STREAM", "PADDED"], pad_length=17),
    ContinuationFrame(7, data=b"\x84", flags=["END_HEADERS"]),
    PriorityFrame(9, depends_on=1, stream_weight=200, exclusive=False),
    RstStreamFrame(9, error_code=8),
    SettingsFrame(0, settings={S.HEADER_TABLE_SIZE: 0, S.ENABLE_PUSH: 0, S.MAX_CONCURRENT_STREAMS: 100,
                               S.INITIAL_WINDOW_SIZE: 1048576, S.MAX_FRAME_SIZE: 16384,
                               S.MAX_HEADER_LIST_SIZE: 65536}),
    SettingsFrame(0, flags=["ACK"]),
    PingFrame(0, opaque_data=b"12345678", flags=["ACK"]),
    GoAwayFrame(0, last_stream_id=11, error_code=11, additional_data=b"calm down"),
    WindowUpdateFrame(0, window_increment=1000),
    WindowUpdateFrame(13, window_increment=2147483647),
]
for f in frames:
    print(json.dumps({"bytes": f.serialize().hex(), "frame": describe(f)}))
"#;

/// Reads frames (hex, one per line) and prints each one's description.
const PYTHON_READS_FRAMES: &str = r#"
import json, sys
for line in sys.stdin:
    b = bytes.fromhex(line.strip())
    f, length = Frame.parse_frame_header(memoryview(b[:9]))
    f.parse_body(memoryview(b[9:9 + length]))
    assert 9 + length == len(b), "one frame a line"
    print(json.dumps(describe(f)))
"#;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The description of a frame read here, as [`PYTHON_DESCRIBES`] makes it.
fn describe(f: &Frame<'_>) -> Value {
    match *f {
        Frame::Data {
            stream,
            end_stream,
            data,
            flow_len,
        } => json!(["DATA", stream, end_stream, hex(data), flow_len]),
        Frame::Headers {
            stream,
            end_stream,
            end_headers,
            priority,
            fragment,
        } => {
            let priority = priority.map(|p| json!([p.exclusive, p.depends_on, p.weight]));
            json!([
                "HEADERS",
                stream,
                end_stream,
                end_headers,
                priority,
                hex(fragment)
            ])
        }
        Frame::Priority { stream, priority: p } => {
            json!(["PRIORITY", stream, [p.exclusive, p.depends_on, p.weight]])
        }
        Frame::RstStream { stream, code } => json!(["RST_STREAM", stream, code.0]),
        Frame::Settings { ack, settings: s } => {
            let values = [
                (frame::setting::HEADER_TABLE_SIZE, s.header_table_size),
                (frame::setting::ENABLE_PUSH, s.enable_push.map(u32::from)),
                (frame::setting::MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
                (frame::setting::INITIAL_WINDOW_SIZE, s.initial_window_size),
                (frame::setting::MAX_FRAME_SIZE, s.max_frame_size),
                (frame::setting::MAX_HEADER_LIST_SIZE, s.max_header_list_size),
            ];
            let map: serde_json::Map<String, Value> = values
                .iter()
                .filter_map(|(id, v)| v.map(|v| (id.to_string(), json!(v))))
                .collect();
            json!(["SETTINGS", ack, map])
        }
        Frame::Ping { ack, payload } => json!(["PING", ack, hex(&payload)]),
        Frame::GoAway {
            last_stream,
            code,
            debug,
        } => json!(["GOAWAY", last_stream, code.0, hex(debug)]),
        Frame::WindowUpdate { stream, increment } => json!(["WINDOW_UPDATE", stream, increment]),
        Frame::Continuation {
            stream,
            end_headers,
            fragment,
        } => {
            json!(["CONTINUATION", stream, end_headers, hex(fragment)])
        }
        Frame::Unknown { .. } => panic!("Python wrote a frame of an unknown type"),
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn frames_python_writes_read_back_as_python_meant_them() {
    let script = format!("{PYTHON_DESCRIBES}{PYTHON_WRITES_FRAMES}");
    let out = Command::new(python())
        .args(["-c", &script])
        .output()
        .expect("python runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut count = 0;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let case: Value = serde_json::from_str(line).unwrap();
        let bytes = unhex(case["bytes"].as_str().unwrap());
        let (frame, used) = frame::parse(&bytes, frame::DEFAULT_MAX_FRAME_SIZE)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .expect("a whole frame");
        assert_eq!(used, bytes.len(), "{line}");
        assert_eq!(describe(&frame), case["frame"], "{line}");
        count += 1;
    }
    assert_eq!(count, 14);
}

#[test]
fn frames_written_here_read_back_in_python() {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut put = |write: &dyn Fn(&mut Vec<u8>)| {
        let mut out = Vec::new();
        write(&mut out);
        frames.push(out);
    };
    put(&|o| {
        frame::put_data_head(o, 1, 5, true);
        o.extend_from_slice(b"hello");
    });
    put(&|o| frame::put_data_head(o, 3, 0, false));
    put(&|o| frame::put_headers(o, 5, &[0x82; 300], true, frame::DEFAULT_MAX_FRAME_SIZE));
    put(&|o| {
        frame::put_settings(
            o,
            &[
                (frame::setting::ENABLE_PUSH, 0),
                (frame::setting::INITIAL_WINDOW_SIZE, 1 << 20),
            ],
        )
    });
    put(&|o| frame::put_settings_ack(o));
    put(&|o| frame::put_ping(o, false, *b"abcdefgh"));
    put(&|o| frame::put_ping(o, true, *b"abcdefgh"));
    put(&|o| frame::put_window_update(o, 0, 1 << 30));
    put(&|o| frame::put_window_update(o, 7, 1));
    put(&|o| frame::put_rst_stream(o, 9, ErrorCode::REFUSED_STREAM));
    put(&|o| frame::put_goaway(o, 11, ErrorCode::NO_ERROR, b""));
    put(&|o| frame::put_goaway(o, 13, ErrorCode::ENHANCE_YOUR_CALM, b"too many resets"));
    // A block three frames long: HEADERS and two CONTINUATIONs, each a line of its own.
    let mut split = Vec::new();
    frame::put_headers(
        &mut split,
        15,
        &[0x86; 40_000],
        false,
        frame::DEFAULT_MAX_FRAME_SIZE,
    );
    let mut rest = split.as_slice();
    while let Some((_, used)) = frame::parse(rest, frame::DEFAULT_MAX_FRAME_SIZE).unwrap() {
        frames.push(rest[..used].to_vec());
        rest = &rest[used..];
    }
    assert_eq!(frames.len(), 15);

    let want: Vec<Value> = frames
        .iter()
        .map(|f| describe(&frame::parse(f, frame::DEFAULT_MAX_FRAME_SIZE).unwrap().unwrap().0))
        .collect();
    let script = format!("{PYTHON_DESCRIBES}{PYTHON_READS_FRAMES}");
    let input: String = frames.iter().map(|f| hex(f) + "\n").collect();
    assert_eq!(python_lines(&script, &input), want);
}
