//! Which control-plane replica the sidecar talks to: it is given several addresses (`--control
//! a,b` or `control.addresses`), uses one at a time, and moves to the next when a session
//! ends or cannot start. Within a round the next address is tried at once; only after every
//! address failed in a row does the caller back off (see [`super::backoff`]).

/// The control-plane addresses (`host:port`; names are resolved on every connect, so a
/// Kubernetes Service or a headless Service's pod names work) and the one in use.
#[derive(Debug, Clone)]
pub struct ControlTargets {
    addresses: Vec<String>,
    current: usize,
    /// Addresses that failed in a row since the last successful session.
    failed_in_row: usize,
}

/// What to do before the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextAttempt {
    /// Try the next address now.
    Now,
    /// Every address failed: wait with the backoff of attempt `round` (0-based).
    Backoff { round: u32 },
}

impl ControlTargets {
    /// `addresses` must not be empty (the configuration checks it).
    pub fn new(addresses: Vec<String>) -> Self {
        assert!(!addresses.is_empty(), "at least one control-plane address");
        ControlTargets {
            addresses,
            current: 0,
            failed_in_row: 0,
        }
    }

    /// The address to use now.
    pub fn current(&self) -> &str {
        &self.addresses[self.current]
    }

    /// Records how the session with the current address ended (`joined`: it got as far as the
    /// stream) and moves to the next address.
    pub fn after_session(&mut self, joined: bool) -> NextAttempt {
        self.current = (self.current + 1) % self.addresses.len();
        if joined {
            // The replica we were on went away: another one is worth a try at once (the same
            // one, alone, after the shortest backoff, as before failover existed).
            self.failed_in_row = 0;
            return if self.addresses.len() > 1 {
                NextAttempt::Now
            } else {
                NextAttempt::Backoff { round: 0 }
            };
        }
        self.failed_in_row += 1;
        if self.failed_in_row.is_multiple_of(self.addresses.len()) {
            let round = (self.failed_in_row / self.addresses.len() - 1) as u32;
            NextAttempt::Backoff { round }
        } else {
            NextAttempt::Now
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_every_address_before_backing_off() {
        let mut t = ControlTargets::new(vec!["a:1".into(), "b:2".into()]);
        assert_eq!(t.current(), "a:1");
        assert_eq!(t.after_session(false), NextAttempt::Now);
        assert_eq!(t.current(), "b:2");
        assert_eq!(t.after_session(false), NextAttempt::Backoff { round: 0 });
        assert_eq!(t.current(), "a:1");
        assert_eq!(t.after_session(false), NextAttempt::Now);
        assert_eq!(t.after_session(false), NextAttempt::Backoff { round: 1 });
        // A session that joined resets the count and fails over at once.
        assert_eq!(t.after_session(true), NextAttempt::Now);
        assert_eq!(t.current(), "b:2");
        assert_eq!(t.after_session(false), NextAttempt::Now);
        assert_eq!(t.after_session(false), NextAttempt::Backoff { round: 0 });
    }

    #[test]
    fn one_address_backs_off_every_time() {
        let mut t = ControlTargets::new(vec!["a:1".into()]);
        assert_eq!(t.after_session(false), NextAttempt::Backoff { round: 0 });
        assert_eq!(t.after_session(false), NextAttempt::Backoff { round: 1 });
        assert_eq!(t.after_session(true), NextAttempt::Backoff { round: 0 });
        assert_eq!(t.current(), "a:1");
    }
}
