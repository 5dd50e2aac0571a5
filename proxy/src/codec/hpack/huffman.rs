//! The Huffman code of HPACK (RFC 7541 Appendix B), decoding only: cogmesh sends its strings
//! as they are (a literal costs a few bytes more and no work), but peers send theirs coded.
//!
//! The code is canonical: codes of one length are consecutive and follow the symbols' order,
//! and each length's first code follows from the previous length's last. So the table below
//! needs only each symbol's code length. Decoding walks the code's tree four bits at a time: a
//! table built once gives, for each node and each four bits, the node they lead to and the
//! symbol completed on the way (codes are at least 5 bits long, so never two).

/// The length in bits of the code of each symbol: the 256 octets, then EOS (RFC 7541 Appendix B).
const CODE_BITS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];

const EOS: u16 = 256;
const SHORTEST: usize = 5;
const LONGEST: usize = 30;

/// What decoding needs, per code length: the first code of that length, how many symbols have
/// it, and where they start in `symbols` (ordered by length, then symbol).
struct Canonical {
    first: [u32; LONGEST + 1],
    count: [u16; LONGEST + 1],
    start: [u16; LONGEST + 1],
    symbols: [u16; 257],
}

const CANONICAL: Canonical = canonical();

const fn canonical() -> Canonical {
    let mut count = [0u16; LONGEST + 1];
    let mut s = 0;
    while s < 257 {
        count[CODE_BITS[s] as usize] += 1;
        s += 1;
    }
    let mut first = [0u32; LONGEST + 1];
    let mut start = [0u16; LONGEST + 1];
    let mut code = 0u32;
    let mut index = 0u16;
    let mut len = 1;
    while len <= LONGEST {
        first[len] = code;
        start[len] = index;
        code = (code + count[len] as u32) << 1;
        index += count[len];
        len += 1;
    }
    // Symbols ordered by code length, then by value: the order codes are handed out in.
    let mut symbols = [0u16; 257];
    let mut next = start;
    let mut s = 0;
    while s < 257 {
        let len = CODE_BITS[s] as usize;
        symbols[next[len] as usize] = s as u16;
        next[len] += 1;
        s += 1;
    }
    Canonical {
        first,
        count,
        start,
        symbols,
    }
}

/// The code of `symbol` (an octet, or 256 for EOS) and its length in bits.
#[cfg(test)]
pub fn code_of(symbol: u16) -> (u32, u8) {
    let len = CODE_BITS[usize::from(symbol)];
    let table = &CANONICAL;
    let rank = table.symbols[usize::from(table.start[usize::from(len)])..]
        .iter()
        .position(|&s| s == symbol)
        .expect("every symbol has a code");
    (table.first[usize::from(len)] + rank as u32, len)
}

/// Why a Huffman-coded string is not valid (RFC 7541 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HuffmanError {
    /// The string holds the EOS symbol.
    Eos,
    /// The string ends in more than 7 bits of padding, in padding that is not all ones, or in
    /// the middle of a code.
    Padding,
}

/// One step of decoding: the node four bits lead to, and the symbol completed on the way.
#[derive(Clone, Copy)]
struct Step {
    next: u16,
    symbol: u16,
}

const NO_SYMBOL: u16 = u16::MAX;
const INVALID: u16 = u16::MAX - 1;

struct Walk {
    steps: Vec<[Step; 16]>,
    /// Nodes a string may end at: on EOS's path (all ones), at most 7 bits deep.
    accepting: Vec<bool>,
}

/// The code's tree, as children of each node: another node, or a symbol (a leaf).
#[derive(Clone, Copy)]
enum Child {
    Missing,
    Node(u16),
    Leaf(u16),
}

fn walk() -> &'static Walk {
    static WALK: std::sync::OnceLock<Walk> = std::sync::OnceLock::new();
    WALK.get_or_init(|| {
        let table = &CANONICAL;
        let mut tree: Vec<[Child; 2]> = vec![[Child::Missing; 2]];
        for len in SHORTEST..=LONGEST {
            for rank in 0..table.count[len] {
                let symbol = table.symbols[usize::from(table.start[len] + rank)];
                let code = table.first[len] + u32::from(rank);
                let mut node = 0usize;
                for depth in (0..len).rev() {
                    let bit = ((code >> depth) & 1) as usize;
                    if depth == 0 {
                        tree[node][bit] = Child::Leaf(symbol);
                        break;
                    }
                    node = match tree[node][bit] {
                        Child::Node(next) => usize::from(next),
                        _ => {
                            tree.push([Child::Missing; 2]);
                            let next = tree.len() - 1;
                            tree[node][bit] = Child::Node(next as u16);
                            next
                        }
                    };
                }
            }
        }
        let mut accepting = vec![false; tree.len()];
        let mut node = 0usize;
        accepting[0] = true;
        for _ in 0..7 {
            match tree[node][1] {
                Child::Node(next) => {
                    node = usize::from(next);
                    accepting[node] = true;
                }
                _ => break,
            }
        }
        let steps = (0..tree.len())
            .map(|start| {
                std::array::from_fn(|bits| {
                    let mut node = start;
                    let mut symbol = NO_SYMBOL;
                    for shift in (0..4).rev() {
                        match tree[node][(bits >> shift) & 1] {
                            Child::Node(next) => node = usize::from(next),
                            Child::Leaf(EOS) | Child::Missing => {
                                symbol = INVALID;
                                break;
                            }
                            Child::Leaf(s) => {
                                symbol = s;
                                node = 0;
                            }
                        }
                    }
                    Step {
                        next: node as u16,
                        symbol,
                    }
                })
            })
            .collect();
        Walk { steps, accepting }
    })
}

/// Appends the decoding of `coded` to `out`.
pub fn decode(coded: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    let walk = walk();
    let mut node = 0usize;
    out.reserve(coded.len() * 8 / 5);
    for &byte in coded {
        for bits in [byte >> 4, byte & 0x0f] {
            let step = walk.steps[node][usize::from(bits)];
            match step.symbol {
                NO_SYMBOL => {}
                INVALID => return Err(HuffmanError::Eos),
                symbol => out.push(symbol as u8),
            }
            node = usize::from(step.next);
        }
    }
    // What is left must be the most significant bits of EOS (all ones), at most 7 of them.
    if !walk.accepting[node] {
        return Err(HuffmanError::Padding);
    }
    Ok(())
}
