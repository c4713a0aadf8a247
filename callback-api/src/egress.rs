//! Outbound HTTP to tenant-supplied URLs (MCP upstreams, OAuth token endpoints), guarded
//! against server-side request forgery.
//!
//! Rules, checked on the URL before a request, by the DNS resolver on every name it resolves,
//! and by the redirect policy on every hop:
//! - https only;
//! - no loopback, private (RFC 1918, CGNAT), link-local (cloud metadata at 169.254.169.254),
//!   unspecified, multicast, reserved, IPv6 unique-local or documentation addresses, and no
//!   IPv4-mapped or NAT64 form of one.
//!
//! Unless the allowlist (`NUBABEL_EGRESS_ALLOW`) permits it: a CIDR entry (`10.1.0.0/16`)
//! permits addresses in it, over http too when the URL names the address itself; a
//! `host:port` entry permits that host and port, over http, whatever it resolves to.
//!
//! IP literals never reach a resolver, so requests must be made through
//! [`Egress::request`] (or the URL passed to [`Egress::check_url`] first).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use reqwest::{
    Method, RequestBuilder,
    dns::{Addrs, Name, Resolve, Resolving},
    redirect,
};
use url::{Host, Url};

/// Most redirects followed.
const MAX_REDIRECTS: usize = 5;

/// Connect timeout of outbound requests; callers set overall timeouts per request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a URL or address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// Not `https` (and not allowlisted for plain http).
    #[error("egress refused: {0} must use https")]
    NotHttps(String),
    /// The URL has no host, or one that cannot be used.
    #[error("egress refused: {0} has no usable host")]
    NoHost(String),
    /// The host is, or resolves only to, an address the rules refuse.
    #[error(
        "egress refused: {host} resolves to {address}, a {kind} address, which is not allowlisted"
    )]
    Forbidden {
        /// The host as written.
        host: String,
        /// The refused address.
        address: IpAddr,
        /// What kind of address it is (loopback, private, ...).
        kind: &'static str,
    },
    /// The name did not resolve.
    #[error("egress refused: {0} did not resolve")]
    Unresolved(String),
    /// Too many redirects.
    #[error("egress refused: more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
}

/// An entry of `NUBABEL_EGRESS_ALLOW` that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NUBABEL_EGRESS_ALLOW: {0:?} is neither a CIDR (10.0.0.0/8) nor host:port")]
pub struct InvalidAllowEntry(pub String);

/// What the allowlist permits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    networks: Vec<IpNet>,
    host_ports: Vec<(String, u16)>,
}

impl Allowlist {
    /// Parses comma-separated entries: CIDRs, bare IPs, and `host:port` (`[::1]:8443`).
    pub fn parse(entries: &[String]) -> Result<Self, InvalidAllowEntry> {
        let mut allow = Self::default();
        for entry in entries
            .iter()
            .flat_map(|e| e.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if let Ok(net) = IpNet::from_str(entry) {
                allow.networks.push(net);
            } else if let Ok(ip) = IpAddr::from_str(entry) {
                allow.networks.push(IpNet::from(ip));
            } else if let Ok(socket) = SocketAddr::from_str(entry) {
                allow
                    .host_ports
                    .push((socket.ip().to_string(), socket.port()));
            } else if let Some((host, port)) = entry.rsplit_once(':')
                && !host.is_empty()
                && !host.contains(['/', '[', ']', ':'])
                && let Ok(port) = port.parse::<u16>()
            {
                allow.host_ports.push((host.to_ascii_lowercase(), port));
            } else {
                return Err(InvalidAllowEntry(entry.to_owned()));
            }
        }
        Ok(allow)
    }

    fn permits_ip(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|net| net.contains(&ip))
    }

    fn permits_host_port(&self, host: &str, port: u16) -> bool {
        self.host_ports
            .iter()
            .any(|(h, p)| *p == port && h.eq_ignore_ascii_case(host))
    }

    fn names_host(&self, host: &str) -> bool {
        self.host_ports
            .iter()
            .any(|(h, _)| h.eq_ignore_ascii_case(host))
    }
}

/// The kind of address the rules refuse, or `None` for a public unicast address.
pub fn forbidden_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4).or(Some("IPv4-mapped"));
            }
            let segments = v6.segments();
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if segments[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if segments[0] & 0xfe00 == 0xfc00 {
                Some("unique-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if segments[0] == 0x0064 && segments[1] == 0xff9b {
                // NAT64 (64:ff9b::/96 and the local-use /48) embeds an IPv4 address.
                Some("NAT64")
            } else if segments[0] == 0x2001 && segments[1] == 0x0db8 {
                Some("documentation")
            } else if segments[..6] == [0; 6] {
                // IPv4-compatible (deprecated) ::a.b.c.d.
                Some("IPv4-compatible")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local (cloud metadata)")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (CGNAT)")
    } else if a == 192 && b == 0 && c == 0 {
        Some("IETF protocol")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("benchmarking")
    } else if ip.is_documentation() {
        Some("documentation")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if a >= 240 {
        Some("reserved")
    } else if ip == Ipv4Addr::new(168, 63, 129, 16) {
        Some("cloud metadata")
    } else {
        None
    }
}

#[derive(Debug)]
struct Rules {
    allow: Allowlist,
}

impl Rules {
    /// Checks a resolved address of `host`. The resolver does not know the port, so a host
    /// named by a `host:port` entry may resolve inward here; the port is checked on the URL.
    fn check_resolved(&self, host: &str, ip: IpAddr) -> Result<(), EgressError> {
        if self.allow.names_host(host) {
            return Ok(());
        }
        self.check_ip(host, ip)
    }

    fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), EgressError> {
        match forbidden_kind(ip) {
            Some(kind) if !self.allow.permits_ip(ip) => Err(EgressError::Forbidden {
                host: host.to_owned(),
                address: ip,
                kind,
            }),
            _ => Ok(()),
        }
    }

    fn check_url(&self, url: &Url) -> Result<(), EgressError> {
        let shown = || {
            let mut shown = format!("{}://", url.scheme());
            if let Some(host) = url.host_str() {
                shown.push_str(host);
            }
            if let Some(port) = url.port() {
                shown.push_str(&format!(":{port}"));
            }
            shown
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| EgressError::NoHost(shown()))?;
        let (host, ip) = match url.host() {
            Some(Host::Domain(domain)) => (domain.to_ascii_lowercase(), None),
            Some(Host::Ipv4(v4)) => (v4.to_string(), Some(IpAddr::V4(v4))),
            Some(Host::Ipv6(v6)) => (v6.to_string(), Some(IpAddr::V6(v6))),
            None => return Err(EgressError::NoHost(shown())),
        };
        if self.allow.permits_host_port(&host, port) {
            return Ok(());
        }
        let ip_allowed = ip.is_some_and(|ip| self.allow.permits_ip(ip));
        match url.scheme() {
            "https" => {}
            "http" if ip_allowed => {}
            _ => return Err(EgressError::NotHttps(shown())),
        }
        match ip {
            Some(ip) => self.check_ip(&host, ip),
            None => Ok(()),
        }
    }
}

/// The resolver: the system's, with refused addresses filtered out.
#[derive(Debug, Clone)]
struct GuardedResolver {
    rules: Arc<Rules>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let rules = Arc::clone(&self.rules);
        Box::pin(async move {
            let host = name.as_str().to_ascii_lowercase();
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|_| EgressError::Unresolved(host.clone()))?
                .collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match rules.check_resolved(&host, addr.ip()) {
                    Ok(()) => true,
                    Err(error) => {
                        refused.get_or_insert(error);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let error = refused.unwrap_or(EgressError::Unresolved(host));
                tracing::warn!(%error, "outbound request refused");
                return Err(error.into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The SSRF-safe outbound client, shared by the MCP gateway and the OAuth refresh.
#[derive(Debug, Clone)]
pub struct Egress {
    client: reqwest::Client,
    rules: Arc<Rules>,
}

/// Building the client failed.
#[derive(Debug, thiserror::Error)]
#[error("building the outbound HTTP client failed")]
pub struct BuildError(#[source] reqwest::Error);

impl Egress {
    /// A client applying the rules with `allow` as the allowlist.
    pub fn new(allow: Allowlist) -> Result<Self, BuildError> {
        let rules = Arc::new(Rules { allow });
        let redirect_rules = Arc::clone(&rules);
        let policy = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(EgressError::TooManyRedirects);
            }
            match redirect_rules.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(error) => {
                    tracing::warn!(%error, "redirect refused");
                    attempt.error(error)
                }
            }
        });
        let client = reqwest::Client::builder()
            .dns_resolver(GuardedResolver {
                rules: Arc::clone(&rules),
            })
            .redirect(policy)
            // A proxy would resolve names itself, out of the resolver's reach.
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(BuildError)?;
        Ok(Self { client, rules })
    }

    /// The client. Hostnames and redirects are checked by it; a URL with an IP literal is
    /// not, so use [`Egress::request`] or [`Egress::check_url`] first.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Checks a URL without resolving it: scheme, IP literals, allowlist.
    pub fn check_url(&self, url: &Url) -> Result<(), EgressError> {
        self.rules.check_url(url)
    }

    /// Checks a URL and resolves its host, refusing names that resolve only to refused
    /// addresses (for validating URLs when they are registered).
    pub async fn check_url_resolved(&self, url: &Url) -> Result<(), EgressError> {
        self.check_url(url)?;
        if let Some(Host::Domain(domain)) = url.host() {
            let port = url.port_or_known_default().unwrap_or(443);
            if self.rules.allow.permits_host_port(domain, port) {
                return Ok(());
            }
            let host = domain.to_ascii_lowercase();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|_| EgressError::Unresolved(host.clone()))?
                .collect();
            let mut first_error = None;
            for addr in &addrs {
                match self.rules.check_ip(&host, addr.ip()) {
                    Ok(()) => return Ok(()),
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
            }
            return Err(first_error.unwrap_or(EgressError::Unresolved(host)));
        }
        Ok(())
    }

    /// A request to `url`, after checking it.
    pub fn request(&self, method: Method, url: Url) -> Result<RequestBuilder, EgressError> {
        self.check_url(&url)?;
        Ok(self.client.request(method, url))
    }
}

/// The egress error in a reqwest error's source chain, if that is why it failed.
pub fn refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a EgressError> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(refusal) = error.downcast_ref::<EgressError>() {
            return Some(refusal);
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str]) -> Rules {
        Rules {
            allow: Allowlist::parse(&allow.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap(),
        }
    }

    fn check(allow: &[&str], url: &str) -> Result<(), EgressError> {
        rules(allow).check_url(&Url::parse(url).unwrap())
    }

    #[test]
    fn inward_addresses_are_refused_without_an_allowlist() {
        for url in [
            "https://127.0.0.1/",
            "https://[::1]/",
            "https://169.254.169.254/latest/meta-data/",
            "https://10.0.0.7/",
            "https://172.16.3.4/",
            "https://192.168.1.1/",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://[::]/",
            "https://[fe80::1]/",
            "https://[fd00:ec2::254]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:169.254.169.254]/",
            "https://[64:ff9b::a9fe:a9fe]/",
        ] {
            assert!(
                matches!(check(&[], url), Err(EgressError::Forbidden { .. })),
                "{url}: {:?}",
                check(&[], url)
            );
        }
    }

    #[test]
    fn public_https_is_allowed_and_http_is_not() {
        assert_eq!(check(&[], "https://93.184.215.14/mcp"), Ok(()));
        assert_eq!(check(&[], "https://mcp.example.com/mcp"), Ok(()));
        assert!(matches!(
            check(&[], "http://mcp.example.com/mcp"),
            Err(EgressError::NotHttps(_))
        ));
        assert!(matches!(
            check(&[], "ftp://mcp.example.com/"),
            Err(EgressError::NotHttps(_))
        ));
    }

    #[test]
    fn a_cidr_entry_allows_its_addresses_over_http_too() {
        let allow = ["127.0.0.0/8", "::1"];
        assert_eq!(check(&allow, "http://127.0.0.1:8080/mcp"), Ok(()));
        assert_eq!(check(&allow, "https://[::1]:8443/"), Ok(()));
        assert!(check(&allow, "http://10.0.0.1/").is_err());
        assert!(check(&allow, "https://169.254.169.254/").is_err());
    }

    #[test]
    fn a_host_port_entry_allows_that_port_only() {
        let allow = ["localhost:9000", "10.1.2.3:443"];
        assert_eq!(check(&allow, "http://localhost:9000/"), Ok(()));
        assert!(check(&allow, "http://localhost:9001/").is_err());
        assert_eq!(check(&allow, "https://10.1.2.3/"), Ok(()));
        assert!(check(&allow, "https://10.1.2.3:8443/").is_err());
    }

    #[test]
    fn malformed_allow_entries_are_refused() {
        for bad in ["not an entry", "10.0.0.0/99", "host:port"] {
            assert!(Allowlist::parse(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
