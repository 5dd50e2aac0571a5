//! cogmesh's HPACK codec (`cogmesh_proxy::hpack`) against Python's `hpack`, the HPACK of the
//! python-hyper HTTP/2 stack, in both directions: header blocks that Python encodes (Huffman
//! strings, its dynamic table filling, evicting and resized) decode to the same fields here,
//! and blocks encoded here decode to the same fields in Python.

use std::io::Write;
use std::process::{Command, Stdio};

use cogmesh_e2e::python;
use cogmesh_proxy::hpack::{Decoder, Encoder, DEFAULT_TABLE_SIZE};
use serde_json::Value;

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
    let mut child = Command::new(python())
        .args(["-c", PYTHON_DECODES])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let decoded: Vec<_> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| as_fields(&serde_json::from_str(l).unwrap()))
        .collect();
    assert_eq!(decoded, sent);
}
