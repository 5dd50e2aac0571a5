//! The log filter, changeable at run time: `GET /log-level` shows it, `PUT /log-level` with a
//! filter in the body (`debug`, `info,cogmesh_proxy::forward=trace`; RUST_LOG syntax) replaces
//! it. The binary installs the setter at start ([`install`]); without one (the library used on
//! its own) the endpoint answers 501.
//!
//! Changing the filter is the admin server's only mutation, and it is served only when the admin
//! server listens on a loopback address (the default `127.0.0.1:4191`): anyone who can reach a
//! non-loopback admin port could otherwise turn on trace logging and fill the disk.

use std::sync::{Mutex, OnceLock};

type Setter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

struct LogFilter {
    set: Setter,
    current: Mutex<String>,
}

static FILTER: OnceLock<LogFilter> = OnceLock::new();

/// Makes the filter changeable through the admin server: `set` applies a new filter (or says
/// why it cannot), `initial` is the one in force.
pub fn install(initial: &str, set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) {
    let _ = FILTER.set(LogFilter {
        set: Box::new(set),
        current: Mutex::new(initial.to_owned()),
    });
}

/// The filter in force, if the binary installed one.
pub fn current() -> Option<String> {
    let f = FILTER.get()?;
    Some(f.current.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// Why a new filter was not applied.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    NotInstalled,
    Invalid(String),
}

/// Applies `filter` (surrounding white space ignored).
pub fn set(filter: &str) -> Result<(), Refused> {
    let f = FILTER.get().ok_or(Refused::NotInstalled)?;
    let filter = filter.trim();
    if filter.is_empty() {
        return Err(Refused::Invalid(
            "the body must be a log filter, e.g. debug".into(),
        ));
    }
    (f.set)(filter).map_err(Refused::Invalid)?;
    *f.current.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_owned();
    Ok(())
}
