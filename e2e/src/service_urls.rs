//! Service addresses for the node shim's pods, which have neither cluster DNS nor kube-proxy.
//!
//! When a pod starts, the shim finds the URLs in its containers' arguments and environment
//! values (`scheme://[user@]host[:port]...`) whose host names a Service the way cluster DNS
//! would resolve it from the pod's namespace: `<svc>.<ns>.svc.cluster.local`, `<svc>.<ns>.svc`,
//! `<svc>.<ns>`, or a bare `<svc>`. Each such URL is rewritten to a ready pod behind the Service
//! (`podIP:targetPort`), as kube-proxy would route a connection. The choice is made once, at the
//! pod's start: a backend that goes away later is not replaced, so tests keep the Services'
//! backends running while their clients run. Hosts that name no Service (IP addresses,
//! `localhost`, external names) are left alone.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use nubabel_operator::controller::fleet;

/// How long a starting pod waits for a Service it names to have a ready backend.
pub const BACKEND_WAIT: Duration = Duration::from_secs(60);

/// A Service port a URL names: namespace, Service name and port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServicePort {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The Service port (the URL's port, or its scheme's default).
    pub port: u16,
}

/// One URL authority found in a value: where its host and port are, and what they may name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Authority {
    /// Byte range of `host[:port]` in the value.
    start: usize,
    end: usize,
    /// The Services the host may name, most specific first.
    candidates: Vec<ServicePort>,
}

/// The Services `value`'s URLs may name, seen from a pod in `namespace`.
pub fn service_candidates(value: &str, namespace: &str) -> Vec<ServicePort> {
    authorities(value, namespace)
        .into_iter()
        .flat_map(|a| a.candidates)
        .collect()
}

/// Rewrites every URL in `value` whose host names a Service in `resolved` to that Service's
/// backend address; other URLs stay as they are.
pub fn rewrite_service_urls(
    value: &str,
    namespace: &str,
    resolved: &BTreeMap<ServicePort, SocketAddrV4>,
) -> String {
    let mut out = String::with_capacity(value.len());
    let mut copied = 0;
    for authority in authorities(value, namespace) {
        let Some(backend) = authority
            .candidates
            .iter()
            .find_map(|candidate| resolved.get(candidate))
        else {
            continue;
        };
        out.push_str(&value[copied..authority.start]);
        out.push_str(&backend.to_string());
        copied = authority.end;
    }
    out.push_str(&value[copied..]);
    out
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        "postgres" | "postgresql" => Some(5432),
        "redis" => Some(6379),
        _ => None,
    }
}

/// A DNS label as Service and namespace names are (RFC 1123, lowercase).
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.bytes().all(|b| b.is_ascii_digit())
}

fn authorities(value: &str, namespace: &str) -> Vec<Authority> {
    let mut found = Vec::new();
    let mut search = 0;
    while let Some(at) = value[search..].find("://") {
        let separator = search + at;
        let scheme_start = value[..separator]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let scheme = &value[scheme_start..separator];
        let begin = separator + 3;
        let end = value[begin..]
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | ',' | ';') || c.is_whitespace()
            })
            .map_or(value.len(), |i| begin + i);
        search = end.max(begin);
        // Credentials come before the last `@`; the host and port after it.
        let host_start = value[begin..end]
            .rfind('@')
            .map_or(begin, |i| begin + i + 1);
        let host_port = &value[host_start..end];
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) => match port.parse::<u16>() {
                Ok(port) => (host, Some(port)),
                Err(_) => continue,
            },
            None => (host_port, default_port(scheme)),
        };
        let Some(port) = port else { continue };
        let labels: Vec<&str> = host.split('.').collect();
        let names: Vec<(String, String)> = match labels.as_slice() {
            [svc, ns, "svc", "cluster", "local"] | [svc, ns, "svc"] => {
                vec![((*ns).to_owned(), (*svc).to_owned())]
            }
            [svc, ns] => vec![((*ns).to_owned(), (*svc).to_owned())],
            [svc] if *svc != "localhost" => vec![(namespace.to_owned(), (*svc).to_owned())],
            _ => Vec::new(),
        };
        let candidates: Vec<ServicePort> = names
            .into_iter()
            .filter(|(ns, svc)| is_label(ns) && is_label(svc))
            .map(|(namespace, name)| ServicePort {
                namespace,
                name,
                port,
            })
            .collect();
        if !candidates.is_empty() {
            found.push(Authority {
                start: host_start,
                end,
                candidates,
            });
        }
    }
    found
}

/// Finds a ready backend for each of `wanted` that names an existing Service with a selector,
/// waiting up to [`BACKEND_WAIT`] for one to be ready. Names that are no Service (or no such
/// port of one) are left out: such hosts are not cluster names.
pub async fn resolve_services(
    client: &Client,
    wanted: &[ServicePort],
) -> Result<BTreeMap<ServicePort, SocketAddrV4>> {
    let mut resolved = BTreeMap::new();
    for service_port in wanted {
        if resolved.contains_key(service_port) {
            continue;
        }
        let services: Api<Service> = Api::namespaced(client.clone(), &service_port.namespace);
        let Some(service) = services.get_opt(&service_port.name).await? else {
            continue;
        };
        let spec = service.spec.clone().unwrap_or_default();
        let Some(port) = spec
            .ports
            .iter()
            .flatten()
            .find(|p| p.port == i32::from(service_port.port))
        else {
            continue;
        };
        let Some(selector) = spec.selector.filter(|s| !s.is_empty()) else {
            continue;
        };
        let selector = selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let target = port.target_port.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &service_port.namespace);
        let deadline = Instant::now() + BACKEND_WAIT;
        let backend = loop {
            let listed = pods.list(&ListParams::default().labels(&selector)).await?;
            if let Some(backend) = listed
                .items
                .iter()
                .find_map(|pod| ready_backend(pod, target.as_ref(), service_port.port))
            {
                break backend;
            }
            if Instant::now() > deadline {
                bail!(
                    "Service {}/{} has no ready pod after {BACKEND_WAIT:?}",
                    service_port.namespace,
                    service_port.name
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        tracing::info!(
            service = %format!("{}/{}:{}", service_port.namespace, service_port.name, service_port.port),
            %backend,
            "service address resolved for a starting pod"
        );
        resolved.insert(service_port.clone(), backend);
    }
    Ok(resolved)
}

/// The pod's address for a Service port, if the pod is ready and not terminating: its IP and
/// the target port (a number, a named container port, or the Service port itself).
fn ready_backend(pod: &Pod, target: Option<&IntOrString>, port: u16) -> Option<SocketAddrV4> {
    if !fleet::pod_ready(pod) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ip: Ipv4Addr = status.pod_ip.as_deref()?.parse().ok()?;
    let target_port = match target {
        None => port,
        Some(IntOrString::Int(p)) => u16::try_from(*p).ok()?,
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())?,
    };
    tracing::debug!(pod = %pod.name_any(), %ip, target_port, "ready backend");
    Some(SocketAddrV4::new(ip, target_port))
}

/// Resolves and rewrites the Service URLs of a pod's values in one go.
pub async fn rewrite_all(
    client: &Client,
    namespace: &str,
    values: &[String],
) -> Result<Vec<String>> {
    let wanted: Vec<ServicePort> = values
        .iter()
        .flat_map(|v| service_candidates(v, namespace))
        .collect();
    if wanted.is_empty() {
        return Ok(values.to_vec());
    }
    let resolved = resolve_services(client, &wanted)
        .await
        .context("resolving the Services the pod's URLs name")?;
    Ok(values
        .iter()
        .map(|v| rewrite_service_urls(v, namespace, &resolved))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(namespace: &str, name: &str, port: u16) -> ServicePort {
        ServicePort {
            namespace: namespace.into(),
            name: name.into(),
            port,
        }
    }

    #[test]
    fn every_dns_form_of_a_service_is_a_candidate() {
        for host in [
            "api.sys.svc.cluster.local:8080",
            "api.sys.svc:8080",
            "api.sys:8080",
        ] {
            assert_eq!(
                service_candidates(&format!("http://{host}/v1"), "tenant"),
                vec![port("sys", "api", 8080)],
                "{host}"
            );
        }
        // A bare name is a Service in the pod's own namespace; the scheme gives the port.
        assert_eq!(
            service_candidates("--url=http://api/x", "tenant"),
            vec![port("tenant", "api", 80)]
        );
        assert_eq!(
            service_candidates("postgres://u:p@db.data.svc/app", "t"),
            vec![port("data", "db", 5432)]
        );
    }

    #[test]
    fn addresses_and_other_names_are_not_candidates() {
        for value in [
            "http://127.0.2.1:8080",
            "http://localhost:4096",
            "http://example.com.evil.org/",
            "plain text api.sys.svc:8080",
            "unknown://api",
            "http://[::1]:80",
            "http://api:notaport/",
        ] {
            assert_eq!(service_candidates(value, "tenant"), vec![], "{value}");
        }
        // `github.com` has the `<svc>.<ns>` shape, as cluster DNS would try it first; it is
        // rewritten only if Service `github` exists in namespace `com`.
        assert_eq!(
            service_candidates("https://github.com", "tenant"),
            vec![port("com", "github", 443)]
        );
    }

    #[test]
    fn resolved_services_are_rewritten_and_the_rest_kept() {
        let resolved: BTreeMap<_, _> = [(
            port("sys", "api", 8080),
            SocketAddrV4::new(Ipv4Addr::new(127, 20, 1, 7), 9090),
        )]
        .into();
        assert_eq!(
            rewrite_service_urls(
                "http://api.sys.svc:8080/callbacks?x=1 and https://other.sys.svc:8080",
                "tenant",
                &resolved
            ),
            "http://127.20.1.7:9090/callbacks?x=1 and https://other.sys.svc:8080"
        );
        assert_eq!(
            rewrite_service_urls("http://user:pw@api:8080", "sys", &resolved),
            "http://user:pw@127.20.1.7:9090"
        );
        // The same name from another namespace is another Service.
        assert_eq!(
            rewrite_service_urls("http://api:8080", "tenant", &resolved),
            "http://api:8080"
        );
        assert_eq!(
            rewrite_service_urls("no urls here", "sys", &resolved),
            "no urls here"
        );
    }
}
