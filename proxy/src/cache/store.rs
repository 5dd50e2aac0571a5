//! The in-memory store of one route's cache: stored responses by key and `Vary` variant,
//! bounded in bytes, least recently used evicted first.
//!
//! A plain synchronous structure; [`super::RouteCache`] keeps it behind one mutex whose critical
//! sections are a hash lookup and a `BTreeMap` update (O(log n), no I/O, no await) — the body
//! itself is a refcounted `Bytes`, so a hit clones no payload under the lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};

use super::policy::{self, Timing};

/// Bytes charged per entry on top of its headers and body (maps, `Arc`, key).
pub const ENTRY_OVERHEAD_BYTES: usize = 128;

/// One stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// Without hop-by-hop headers and `Age` (computed when served).
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request's values of the headers `Vary` named when this was stored.
    pub vary: Vec<(HeaderName, Option<Vec<u8>>)>,
    pub timing: Timing,
}

impl Entry {
    /// What the entry counts against the cache's `max_bytes`.
    pub fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        ENTRY_OVERHEAD_BYTES + headers + self.body.len()
    }
}

struct Slot {
    key: Arc<str>,
    entry: Arc<Entry>,
    size: usize,
    last_used: u64,
}

/// What [`Store::insert`] did: bytes now stored, and how many entries it evicted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inserted {
    pub evicted: u64,
    pub stored: bool,
}

#[derive(Default)]
pub struct Store {
    max_bytes: usize,
    bytes: usize,
    tick: u64,
    next_id: u64,
    slots: HashMap<u64, Slot>,
    by_key: HashMap<Arc<str>, Vec<u64>>,
    /// last_used → id, oldest first.
    lru: BTreeMap<u64, u64>,
}

impl Store {
    pub fn new(max_bytes: usize) -> Store {
        Store {
            max_bytes,
            ..Store::default()
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The variant of `key` that `request` selects, marked as used.
    pub fn get(&mut self, key: &str, request: &HeaderMap) -> Option<Arc<Entry>> {
        let id = *self
            .by_key
            .get(key)?
            .iter()
            .find(|id| policy::vary_matches(request, &self.slots[id].entry.vary))?;
        self.tick += 1;
        let slot = self.slots.get_mut(&id)?;
        self.lru.remove(&slot.last_used);
        slot.last_used = self.tick;
        self.lru.insert(self.tick, id);
        Some(Arc::clone(&slot.entry))
    }

    /// Stores `entry` under `key`, replacing the variant with the same `Vary` values, then
    /// evicts least recently used entries until the store fits. An entry larger than the whole
    /// store is not stored.
    pub fn insert(&mut self, key: &str, entry: Entry) -> Inserted {
        let size = entry.size();
        if size > self.max_bytes {
            return Inserted::default();
        }
        let existing = self.by_key.get(key).and_then(|ids| {
            ids.iter()
                .copied()
                .find(|id| self.slots[id].entry.vary == entry.vary)
        });
        if let Some(id) = existing {
            self.remove(id);
        }
        let key: Arc<str> = match self.by_key.get_key_value(key) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(key),
        };
        self.tick += 1;
        self.next_id += 1;
        let id = self.next_id;
        self.by_key.entry(Arc::clone(&key)).or_default().push(id);
        self.slots.insert(
            id,
            Slot {
                key,
                entry: Arc::new(entry),
                size,
                last_used: self.tick,
            },
        );
        self.lru.insert(self.tick, id);
        self.bytes += size;
        let mut evicted = 0;
        while self.bytes > self.max_bytes {
            let Some((_, oldest)) = self.lru.pop_first() else {
                break;
            };
            self.remove(oldest);
            evicted += 1;
        }
        Inserted {
            evicted,
            stored: true,
        }
    }

    /// Drops every variant of `key` (after an unsafe method on it, RFC 9111 §4.4).
    pub fn invalidate(&mut self, key: &str) {
        if let Some(ids) = self.by_key.get(key).cloned() {
            for id in ids {
                self.remove(id);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(slot) = self.slots.remove(&id) else {
            return;
        };
        self.lru.remove(&slot.last_used);
        self.bytes -= slot.size;
        if let Some(ids) = self.by_key.get_mut(&slot.key) {
            ids.retain(|x| *x != id);
            if ids.is_empty() {
                self.by_key.remove(&slot.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn entry(body: usize, vary: Option<&str>) -> Entry {
        let now = SystemTime::UNIX_EPOCH;
        Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body]),
            vary: vary
                .map(|v| vec![(http::header::ACCEPT_ENCODING, Some(v.as_bytes().to_vec()))])
                .unwrap_or_default(),
            timing: Timing {
                request_time: now,
                response_time: now,
                date: now,
                age: Duration::ZERO,
                lifetime: Duration::from_secs(60),
            },
        }
    }

    fn req(accept: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = accept {
            h.insert(http::header::ACCEPT_ENCODING, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let one = entry(872, None).size();
        assert_eq!(one, 1000);
        let mut s = Store::new(3000);
        for k in ["a", "b", "c"] {
            assert_eq!(
                s.insert(k, entry(872, None)),
                Inserted {
                    evicted: 0,
                    stored: true
                }
            );
        }
        assert_eq!((s.len(), s.bytes()), (3, 3000));
        assert!(s.get("a", &req(None)).is_some(), "a is now the most recent");
        assert_eq!(s.insert("d", entry(872, None)).evicted, 1);
        assert!(s.get("b", &req(None)).is_none(), "b was the least recently used");
        assert!(s.get("a", &req(None)).is_some());
        assert!(s.get("c", &req(None)).is_some());
        // Too large for the whole store: refused, nothing evicted.
        assert_eq!(s.insert("big", entry(5000, None)), Inserted::default());
        assert_eq!((s.len(), s.bytes()), (3, 3000));
    }

    #[test]
    fn variants_are_selected_and_replaced_by_vary_values() {
        let mut s = Store::new(10_000);
        s.insert("k", entry(10, Some("gzip")));
        s.insert("k", entry(20, Some("br")));
        assert_eq!(s.get("k", &req(Some("gzip"))).unwrap().body.len(), 10);
        assert_eq!(s.get("k", &req(Some("br"))).unwrap().body.len(), 20);
        assert!(s.get("k", &req(None)).is_none());
        s.insert("k", entry(30, Some("gzip")));
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("k", &req(Some("gzip"))).unwrap().body.len(), 30);
        s.invalidate("k");
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }
}
