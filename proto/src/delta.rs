//! Incremental routing tables: [`diff`] says what changed between two versions of a table
//! (the control plane sends that to a sidecar that runs the older one), [`apply`] turns the
//! older table and those changes back into the newer one (the sidecar then checks and answers
//! the result as a whole table). Both are pure; the semantics are documented on
//! `RoutingTableDelta` in `mesh.proto`.
//!
//! The one difference between `apply(base, &diff(base, next))` and `next` is order: endpoints
//! and services `next` added come after the ones `base` had, in `next`'s order. Weights,
//! membership and version are the same.

use std::collections::{HashMap, HashSet};

use crate::v1::{RoutingTable, RoutingTableDelta, ServiceDelta, ServiceEndpoints, WeightedEndpoint};

/// Why a delta does not fit the table it was applied to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeltaError {
    #[error(
        "the delta to version {version} is against version {base}, but this sidecar runs version {running}"
    )]
    WrongBase { version: u64, base: u64, running: u64 },
    #[error("the delta removes service {service:?}, which the table does not have")]
    NoSuchService { service: String },
    #[error("the delta removes endpoint {address} of service {service:?}, which the table does not have")]
    NoSuchEndpoint { service: String, address: String },
}

/// What turns `base` into `next`: the services and endpoints `next` added or removed, and the
/// endpoints whose weight changed. Empty (but for the versions) when only the version moved.
pub fn diff(base: &RoutingTable, next: &RoutingTable) -> RoutingTableDelta {
    let before: HashMap<&str, &ServiceEndpoints> =
        base.services.iter().map(|s| (s.name.as_str(), s)).collect();
    let after: HashSet<&str> = next.services.iter().map(|s| s.name.as_str()).collect();
    let mut services = Vec::new();
    for service in &next.services {
        let change = match before.get(service.name.as_str()) {
            None => ServiceDelta {
                name: service.name.clone(),
                upserted: service.endpoints.clone(),
                removed: Vec::new(),
            },
            Some(old) => service_diff(old, service),
        };
        if !change.upserted.is_empty()
            || !change.removed.is_empty()
            || !before.contains_key(service.name.as_str())
        {
            services.push(change);
        }
    }
    RoutingTableDelta {
        version: next.version,
        base_version: base.version,
        services,
        removed_services: base
            .services
            .iter()
            .filter(|s| !after.contains(s.name.as_str()))
            .map(|s| s.name.clone())
            .collect(),
    }
}

/// One service's changes (possibly none).
fn service_diff(old: &ServiceEndpoints, new: &ServiceEndpoints) -> ServiceDelta {
    let weights: HashMap<&str, f64> = old
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.weight))
        .collect();
    let kept: HashSet<&str> = new.endpoints.iter().map(|e| e.address.as_str()).collect();
    ServiceDelta {
        name: new.name.clone(),
        upserted: new
            .endpoints
            .iter()
            // Bit equality: a weight is either the one sent before or a change.
            .filter(|e| weights.get(e.address.as_str()).map(|w| w.to_bits()) != Some(e.weight.to_bits()))
            .cloned()
            .collect(),
        removed: old
            .endpoints
            .iter()
            .filter(|e| !kept.contains(e.address.as_str()))
            .map(|e| e.address.clone())
            .collect(),
    }
}

/// `base` with `delta` applied: the table of version `delta.version`.
pub fn apply(base: &RoutingTable, delta: &RoutingTableDelta) -> Result<RoutingTable, DeltaError> {
    if delta.base_version != base.version {
        return Err(DeltaError::WrongBase {
            version: delta.version,
            base: delta.base_version,
            running: base.version,
        });
    }
    let mut services = base.services.clone();
    for name in &delta.removed_services {
        let Some(at) = services.iter().position(|s| &s.name == name) else {
            return Err(DeltaError::NoSuchService {
                service: name.clone(),
            });
        };
        services.remove(at);
    }
    for change in &delta.services {
        let at = match services.iter().position(|s| s.name == change.name) {
            Some(at) => at,
            None => {
                services.push(ServiceEndpoints {
                    name: change.name.clone(),
                    endpoints: Vec::new(),
                });
                services.len() - 1
            }
        };
        apply_service(&mut services[at], change)?;
    }
    Ok(RoutingTable {
        version: delta.version,
        services,
    })
}

fn apply_service(service: &mut ServiceEndpoints, change: &ServiceDelta) -> Result<(), DeltaError> {
    if !change.removed.is_empty() {
        let removed: HashSet<&str> = change.removed.iter().map(String::as_str).collect();
        let present: HashSet<&str> = service.endpoints.iter().map(|e| e.address.as_str()).collect();
        if let Some(missing) = change.removed.iter().find(|a| !present.contains(a.as_str())) {
            return Err(DeltaError::NoSuchEndpoint {
                service: service.name.clone(),
                address: missing.clone(),
            });
        }
        service
            .endpoints
            .retain(|e| !removed.contains(e.address.as_str()));
    }
    let mut index: HashMap<String, usize> = service
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| (e.address.clone(), i))
        .collect();
    for e in &change.upserted {
        match index.get(&e.address) {
            Some(&i) => service.endpoints[i].weight = e.weight,
            None => {
                index.insert(e.address.clone(), service.endpoints.len());
                service.endpoints.push(WeightedEndpoint {
                    address: e.address.clone(),
                    weight: e.weight,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, endpoints: &[(&str, f64)]) -> ServiceEndpoints {
        ServiceEndpoints {
            name: name.into(),
            endpoints: endpoints
                .iter()
                .map(|(a, w)| WeightedEndpoint {
                    address: a.to_string(),
                    weight: *w,
                })
                .collect(),
        }
    }

    fn table(version: u64, services: Vec<ServiceEndpoints>) -> RoutingTable {
        RoutingTable { version, services }
    }

    #[test]
    fn a_weight_change_is_one_endpoint() {
        let base = table(
            4,
            vec![
                service(
                    "reasoning",
                    &[("10.0.0.1:80", 1.0), ("10.0.0.2:80", 1.0), ("10.0.0.3:80", 1.0)],
                ),
                service("memory", &[("10.0.1.1:80", 1.0)]),
            ],
        );
        let next = table(
            5,
            vec![
                service(
                    "reasoning",
                    &[("10.0.0.1:80", 0.4), ("10.0.0.2:80", 1.3), ("10.0.0.3:80", 1.0)],
                ),
                service("memory", &[("10.0.1.1:80", 1.0)]),
            ],
        );
        let delta = diff(&base, &next);
        assert_eq!(
            delta,
            RoutingTableDelta {
                version: 5,
                base_version: 4,
                services: vec![ServiceDelta {
                    name: "reasoning".into(),
                    upserted: service("reasoning", &[("10.0.0.1:80", 0.4), ("10.0.0.2:80", 1.3)]).endpoints,
                    removed: vec![],
                }],
                removed_services: vec![],
            }
        );
        assert_eq!(apply(&base, &delta), Ok(next));
    }

    #[test]
    fn joins_leaves_and_services_coming_and_going() {
        let base = table(
            9,
            vec![
                service("reasoning", &[("10.0.0.1:80", 1.0), ("10.0.0.3:80", 2.0)]),
                service("old", &[("10.0.2.1:80", 1.0)]),
            ],
        );
        let next = table(
            12,
            vec![
                service("new", &[]),
                service("reasoning", &[("10.0.0.2:80", 0.5), ("10.0.0.3:80", 2.0)]),
            ],
        );
        let delta = diff(&base, &next);
        assert_eq!(
            delta,
            RoutingTableDelta {
                version: 12,
                base_version: 9,
                services: vec![
                    // A new service is listed even with no endpoints.
                    ServiceDelta {
                        name: "new".into(),
                        upserted: vec![],
                        removed: vec![],
                    },
                    ServiceDelta {
                        name: "reasoning".into(),
                        upserted: service("", &[("10.0.0.2:80", 0.5)]).endpoints,
                        removed: vec!["10.0.0.1:80".into()],
                    },
                ],
                removed_services: vec!["old".into()],
            }
        );
        // Kept endpoints and services keep their place; new ones come after them.
        assert_eq!(
            apply(&base, &delta),
            Ok(table(
                12,
                vec![
                    service("reasoning", &[("10.0.0.3:80", 2.0), ("10.0.0.2:80", 0.5)]),
                    service("new", &[]),
                ],
            ))
        );
    }

    #[test]
    fn only_the_version_moved() {
        let base = table(1, vec![service("r", &[("10.0.0.1:80", 1.0)])]);
        let next = table(2, base.services.clone());
        let delta = diff(&base, &next);
        assert!(
            delta.services.is_empty() && delta.removed_services.is_empty(),
            "{delta:?}"
        );
        assert_eq!(apply(&base, &delta), Ok(next));
    }

    #[test]
    fn a_delta_that_does_not_fit_is_refused_saying_why() {
        let base = table(3, vec![service("r", &[("10.0.0.1:80", 1.0)])]);
        let wrong_base = RoutingTableDelta {
            version: 8,
            base_version: 7,
            ..Default::default()
        };
        assert_eq!(
            apply(&base, &wrong_base).unwrap_err().to_string(),
            "the delta to version 8 is against version 7, but this sidecar runs version 3"
        );
        let gone_service = RoutingTableDelta {
            version: 4,
            base_version: 3,
            removed_services: vec!["s".into()],
            ..Default::default()
        };
        assert_eq!(
            apply(&base, &gone_service),
            Err(DeltaError::NoSuchService { service: "s".into() })
        );
        let gone_endpoint = RoutingTableDelta {
            version: 4,
            base_version: 3,
            services: vec![ServiceDelta {
                name: "r".into(),
                upserted: vec![],
                removed: vec!["10.0.0.2:80".into()],
            }],
            ..Default::default()
        };
        assert_eq!(
            apply(&base, &gone_endpoint),
            Err(DeltaError::NoSuchEndpoint {
                service: "r".into(),
                address: "10.0.0.2:80".into()
            })
        );
    }

    #[test]
    fn an_endpoint_upserted_twice_takes_the_last_weight() {
        let base = table(1, vec![service("r", &[])]);
        let delta = RoutingTableDelta {
            version: 2,
            base_version: 1,
            services: vec![ServiceDelta {
                name: "r".into(),
                upserted: service("", &[("10.0.0.1:80", 1.0), ("10.0.0.1:80", 3.0)]).endpoints,
                removed: vec![],
            }],
            removed_services: vec![],
        };
        assert_eq!(
            apply(&base, &delta),
            Ok(table(2, vec![service("r", &[("10.0.0.1:80", 3.0)])]))
        );
    }
}
