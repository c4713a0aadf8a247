//! Outbound HTTP to tenant-supplied URLs (MCP upstreams, OAuth token endpoints), guarded
//! against server-side request forgery.
//!
//! Rules, checked on the URL before a request, by the DNS resolver on every name it resolves,
//! and by the redirect policy on every hop:
//! - https only;
//! - no loopback, private (RFC 1918, CGNAT), link-local (cloud metadata at 169.254.169.254),
//!   unspecified, multicast, reserved, documentation or benchmarking addresses; no IPv6
//!   unique-local, site-local, discard-only, 6to4, Teredo or other tunnelling and
//!   translation addresses; an IPv4-mapped (`::ffff:0:0/96`) or NAT64 (`64:ff9b::/96`)
//!   address is judged by the IPv4 address it carries.
//!
//! Unless the allowlist (`NUBABEL_EGRESS_ALLOW`) permits it: a CIDR entry (`10.1.0.0/16`)
//! permits addresses in it on every port, over http too when the URL names the address
//! itself; a `host:port` entry permits that host on that port, over http, whatever it
//! resolves to. A host named by `host:port` entries is reachable on those ports only: the
//! resolver cannot see the port, so the URL check refuses the others.
//!
//! Redirects never carry credentials to another origin (scheme, host and port): a request
//! made with [`Redirects::SameOrigin`] follows redirects on its own origin only and fails on
//! one elsewhere; a request made with [`Redirects::Refused`] follows none.
//!
//! IP literals never reach a resolver, so requests must be made through
//! [`Egress::request`].

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use ipnet::IpNet;
use reqwest::{
    Method, RequestBuilder,
    dns::{Addrs, Name, Resolve, Resolving},
    redirect,
};
use url::{Host, Url};

/// Whether two URLs have the same origin (scheme, host and port): the unit stored secrets are
/// bound to, and so the one redirects may not leave.
pub use nubabel_store::connections::same_origin;

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
    /// The host is allowlisted by `host:port` entries, none of them for this port.
    #[error("egress refused: {host} is allowlisted on port {allowed} only, not on {port}")]
    PortNotAllowed {
        /// The host as written.
        host: String,
        /// The port asked for.
        port: u16,
        /// The ports its entries name, comma-separated.
        allowed: String,
    },
    /// The name did not resolve.
    #[error("egress refused: {0} did not resolve")]
    Unresolved(String),
    /// Too many redirects.
    #[error("egress refused: more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    /// A redirect to another origin, where the request's credentials must not go.
    #[error(
        "egress refused: {from} redirected to {to}, another origin; credentials are not sent \
         to another origin, so the redirect is not followed"
    )]
    CrossOriginRedirect {
        /// The origin of the request.
        from: String,
        /// The origin redirected to.
        to: String,
    },
    /// A redirect where none is followed.
    #[error("egress refused: the server redirected to {0}; this endpoint must answer directly")]
    RedirectNotFollowed(String),
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
    /// Parses comma-separated entries: CIDRs, bare IPs, and `host:port` (`[::1]:8443`). A
    /// host without a port is refused: every `host:port` entry names its port.
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

    /// Whether a CIDR entry holds `ip`, or the IPv4 address it carries.
    fn permits_ip(&self, ip: IpAddr) -> bool {
        let carried = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.networks
            .iter()
            .any(|net| net.contains(&ip) || carried.is_some_and(|v4| net.contains(&v4)))
    }

    fn permits_host_port(&self, host: &str, port: u16) -> bool {
        self.ports_of(host).any(|p| p == port)
    }

    /// The ports `host:port` entries name for `host`.
    fn ports_of<'a>(&'a self, host: &'a str) -> impl Iterator<Item = u16> + 'a {
        self.host_ports
            .iter()
            .filter(move |(h, _)| h.eq_ignore_ascii_case(host))
            .map(|(_, port)| *port)
    }

    fn names_host(&self, host: &str) -> bool {
        self.ports_of(host).next().is_some()
    }
}

/// The kind of address the rules refuse, or `None` for a public unicast address.
pub fn forbidden_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

/// The IPv4 address that traffic to `ip` reaches, for the forms that carry one: IPv4-mapped
/// `::ffff:a.b.c.d` (the socket connects over IPv4) and NAT64 `64:ff9b::a.b.c.d` (RFC 6052;
/// a translator forwards it).
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let segments = ip.segments();
    (segments[..6] == [0x0064, 0xff9b, 0, 0, 0, 0])
        .then(|| Ipv4Addr::from((u32::from(segments[6]) << 16) | u32::from(segments[7])))
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return forbidden_v4(v4);
    }
    let segments = ip.segments();
    let (first, second) = (segments[0], segments[1]);
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if segments[..6] == [0; 6] {
        // ::a.b.c.d, deprecated.
        Some("IPv4-compatible")
    } else if segments[..6] == [0, 0, 0, 0, 0xffff, 0] {
        // ::ffff:0:a.b.c.d (RFC 2765).
        Some("IPv4-translated")
    } else if first == 0x0064 && second == 0xff9b {
        // The local-use 64:ff9b:1::/48 (RFC 8215), whose embedding is the operator's choice.
        Some("NAT64 local-use")
    } else if segments[..4] == [0x0100, 0, 0, 0] {
        Some("discard-only")
    } else if first == 0x2001 && second == 0 {
        // Teredo tunnels to an IPv4 server and client written into the address.
        Some("Teredo")
    } else if first == 0x2001 && second < 0x0200 {
        Some("IETF protocol assignment")
    } else if (first == 0x2001 && second == 0x0db8) || (first == 0x3fff && second < 0x1000) {
        Some("documentation")
    } else if first == 0x2002 {
        // 6to4 tunnels to the IPv4 address in bits 16 to 47.
        Some("6to4")
    } else if first & 0xfe00 == 0xfc00 {
        Some("unique-local")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if first & 0xffc0 == 0xfec0 {
        Some("site-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
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
    } else if a == 192 && b == 88 && c == 99 {
        Some("6to4 relay")
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

/// `scheme://host[:port]` of a URL: what messages show of it (its path or query may hold a
/// key).
fn shown(url: &Url) -> String {
    let mut shown = format!("{}://", url.scheme());
    if let Some(host) = url.host_str() {
        shown.push_str(host);
    }
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown
}

/// Which redirects a request follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirects {
    /// Those to the request's own origin; one to another origin fails the request. For
    /// requests with credentials in headers (every header stays on the origin it was meant
    /// for).
    SameOrigin,
    /// None: a redirect fails the request. For requests with credentials in the body (a 307
    /// or 308 would post it again to wherever the server points).
    Refused,
}

#[derive(Debug)]
struct Rules {
    allow: Allowlist,
}

impl Rules {
    /// Checks a resolved address of `host`. The resolver does not know the port, so a host
    /// named by a `host:port` entry may resolve inward here; its port is checked on the URL.
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
        let port = url
            .port_or_known_default()
            .ok_or_else(|| EgressError::NoHost(shown(url)))?;
        let (host, ip) = match url.host() {
            Some(Host::Domain(domain)) => (domain.to_ascii_lowercase(), None),
            Some(Host::Ipv4(v4)) => (v4.to_string(), Some(IpAddr::V4(v4))),
            Some(Host::Ipv6(v6)) => (v6.to_string(), Some(IpAddr::V6(v6))),
            None => return Err(EgressError::NoHost(shown(url))),
        };
        if self.allow.permits_host_port(&host, port) {
            return Ok(());
        }
        if ip.is_none() && self.allow.names_host(&host) {
            // The resolver lets this name resolve anywhere, so only its own ports may be used.
            let allowed: Vec<String> = self.allow.ports_of(&host).map(|p| p.to_string()).collect();
            return Err(EgressError::PortNotAllowed {
                host,
                port,
                allowed: allowed.join(", "),
            });
        }
        let ip_allowed = ip.is_some_and(|ip| self.allow.permits_ip(ip));
        match url.scheme() {
            "https" => {}
            "http" if ip_allowed => {}
            _ => return Err(EgressError::NotHttps(shown(url))),
        }
        match ip {
            Some(ip) => self.check_ip(&host, ip),
            None => Ok(()),
        }
    }

    /// Whether a redirect to `next` may be followed; `chain` holds the URLs requested so far,
    /// the original first.
    fn check_redirect(
        &self,
        redirects: Redirects,
        next: &Url,
        chain: &[Url],
    ) -> Result<(), EgressError> {
        if redirects == Redirects::Refused {
            return Err(EgressError::RedirectNotFollowed(shown(next)));
        }
        if chain.len() > MAX_REDIRECTS {
            return Err(EgressError::TooManyRedirects);
        }
        self.check_url(next)?;
        match chain.first() {
            Some(original) if !same_origin(original, next) => {
                Err(EgressError::CrossOriginRedirect {
                    from: shown(original),
                    to: shown(next),
                })
            }
            _ => Ok(()),
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
    /// Follows redirects on the request's origin.
    follow_same_origin: reqwest::Client,
    /// Follows none.
    follow_none: reqwest::Client,
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
        Ok(Self {
            follow_same_origin: client(&rules, Redirects::SameOrigin)?,
            follow_none: client(&rules, Redirects::Refused)?,
            rules,
        })
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

    /// A request to `url`, after checking it, following `redirects`.
    pub fn request(
        &self,
        method: Method,
        url: Url,
        redirects: Redirects,
    ) -> Result<RequestBuilder, EgressError> {
        self.check_url(&url)?;
        let client = match redirects {
            Redirects::SameOrigin => &self.follow_same_origin,
            Redirects::Refused => &self.follow_none,
        };
        Ok(client.request(method, url))
    }
}

/// A client whose resolver and redirect policy apply `rules`.
fn client(rules: &Arc<Rules>, redirects: Redirects) -> Result<reqwest::Client, BuildError> {
    let redirect_rules = Arc::clone(rules);
    let policy = redirect::Policy::custom(move |attempt| {
        match redirect_rules.check_redirect(redirects, attempt.url(), attempt.previous()) {
            Ok(()) => attempt.follow(),
            Err(error) => {
                tracing::warn!(%error, "redirect refused");
                attempt.error(error)
            }
        }
    });
    reqwest::Client::builder()
        .dns_resolver(GuardedResolver {
            rules: Arc::clone(rules),
        })
        .redirect(policy)
        // A proxy would resolve names itself, out of the resolver's reach.
        .no_proxy()
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .map_err(BuildError)
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

/// Why a response body was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The body is larger than the cap (announced, or found while reading).
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    /// Reading failed.
    #[error("reading the answer failed")]
    Body(#[source] reqwest::Error),
}

/// Reads a response body of at most `max` bytes, refusing a larger announced length before
/// reading and stopping as soon as the bytes read pass the cap.
pub async fn read_capped(response: reqwest::Response, max: usize) -> Result<Vec<u8>, ReadError> {
    if response
        .content_length()
        .is_some_and(|length| length > u64::try_from(max).unwrap_or(u64::MAX))
    {
        return Err(ReadError::TooLarge(max));
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ReadError::Body)?;
        if body.len() + chunk.len() > max {
            return Err(ReadError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
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
        // Over https too: the resolver lets an allowlisted name resolve anywhere, so the
        // URL check is what keeps other ports out.
        assert_eq!(
            check(&allow, "https://localhost:9001/"),
            Err(EgressError::PortNotAllowed {
                host: "localhost".into(),
                port: 9001,
                allowed: "9000".into()
            })
        );
        assert!(matches!(
            check(&allow, "https://LOCALHOST/"),
            Err(EgressError::PortNotAllowed { port: 443, .. })
        ));
    }

    #[test]
    fn a_port_allowed_by_any_entry_of_a_host_is_allowed() {
        let allow = ["mcp.internal:8443", "mcp.internal:443"];
        assert_eq!(check(&allow, "https://mcp.internal/"), Ok(()));
        assert_eq!(check(&allow, "https://mcp.internal:8443/"), Ok(()));
        let refused = check(&allow, "https://mcp.internal:9443/").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "egress refused: mcp.internal is allowlisted on port 8443, 443 only, not on 9443"
        );
    }

    #[test]
    fn tunnelling_translation_and_deprecated_ipv6_ranges_are_refused() {
        for (address, kind) in [
            ("2002:7f00:1::1", "6to4"),
            ("2002:5db8:d70e::1", "6to4"),
            ("fec0::1", "site-local"),
            ("feff::1", "site-local"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:2::1", "IETF protocol assignment"),
            ("64:ff9b:1::a00:1", "NAT64 local-use"),
            ("100::1", "discard-only"),
            ("::ffff:0:7f00:1", "IPv4-translated"),
            ("::7f00:1", "IPv4-compatible"),
            ("3fff::1", "documentation"),
            ("2001:db8::1", "documentation"),
        ] {
            let ip: IpAddr = address.parse().unwrap();
            assert_eq!(forbidden_kind(ip), Some(kind), "{address}");
            let url = format!("https://[{address}]/");
            assert!(
                matches!(check(&[], &url), Err(EgressError::Forbidden { .. })),
                "{url}"
            );
        }
        for public in ["2606:4700::1111", "2a00:1450:4001::200e", "2001:200::1"] {
            assert_eq!(forbidden_kind(public.parse().unwrap()), None, "{public}");
        }
    }

    #[test]
    fn an_embedded_ipv4_address_is_judged_by_the_ipv4_rules() {
        for (address, expected) in [
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.0.0.1", Some("private")),
            ("::ffff:100.64.0.1", Some("shared (CGNAT)")),
            ("64:ff9b::a9fe:a9fe", Some("link-local (cloud metadata)")),
            ("64:ff9b::c0a8:1", Some("private")),
            ("::ffff:93.184.215.14", None),
            ("64:ff9b::5db8:d70e", None),
        ] {
            let ip: IpAddr = address.parse().unwrap();
            assert_eq!(forbidden_kind(ip), expected, "{address}");
        }
        assert_eq!(
            embedded_v4("64:ff9b::5db8:d70e".parse().unwrap()),
            Some(Ipv4Addr::new(93, 184, 215, 14))
        );
        assert_eq!(embedded_v4("2002:5db8:d70e::1".parse().unwrap()), None);
        // An IPv4 entry of the allowlist covers the IPv6 forms of its addresses.
        let allow = ["127.0.0.0/8"];
        assert_eq!(check(&allow, "http://[::ffff:127.0.0.1]:8080/"), Ok(()));
        assert_eq!(check(&allow, "https://[64:ff9b::7f00:1]/"), Ok(()));
        assert!(check(&allow, "https://[::ffff:10.0.0.1]/").is_err());
    }

    #[test]
    fn an_origin_is_scheme_host_and_port() {
        let url = |s: &str| Url::parse(s).unwrap();
        let origin = url("https://mcp.example.com/mcp");
        for same in [
            "https://mcp.example.com/other?q=1",
            "https://MCP.example.com:443/",
        ] {
            assert!(same_origin(&origin, &url(same)), "{same}");
        }
        for other in [
            "http://mcp.example.com/mcp",
            "https://mcp.example.com:8443/mcp",
            "https://evil.example.com/mcp",
            "https://example.com/mcp",
        ] {
            assert!(!same_origin(&origin, &url(other)), "{other}");
        }
        assert!(!same_origin(
            &url("data:text/plain,x"),
            &url("data:text/plain,x")
        ));
    }

    #[test]
    fn redirects_stay_on_the_origin_and_pass_the_rules_on_every_hop() {
        let url = |s: &str| Url::parse(s).unwrap();
        let rules = rules(&["127.0.0.0/8"]);
        let chain = [url("http://127.0.0.1:8080/mcp")];
        let follow = |next: &str| rules.check_redirect(Redirects::SameOrigin, &url(next), &chain);
        assert_eq!(follow("http://127.0.0.1:8080/moved"), Ok(()));
        assert_eq!(
            follow("http://127.0.0.1:8081/mcp"),
            Err(EgressError::CrossOriginRedirect {
                from: "http://127.0.0.1:8080".into(),
                to: "http://127.0.0.1:8081".into()
            })
        );
        assert!(matches!(
            follow("https://10.0.0.1/"),
            Err(EgressError::Forbidden { .. })
        ));
        // Compared with the original request, not just the previous hop.
        let bounced = [
            url("http://127.0.0.1:8080/mcp"),
            url("http://127.0.0.1:8080/moved"),
        ];
        assert!(matches!(
            rules.check_redirect(
                Redirects::SameOrigin,
                &url("http://127.0.0.2:8080/"),
                &bounced
            ),
            Err(EgressError::CrossOriginRedirect { .. })
        ));
        let long: Vec<Url> = (0..=MAX_REDIRECTS).map(|_| chain[0].clone()).collect();
        assert_eq!(
            rules.check_redirect(Redirects::SameOrigin, &chain[0], &long),
            Err(EgressError::TooManyRedirects)
        );
        assert_eq!(
            rules.check_redirect(Redirects::Refused, &url("http://127.0.0.1:8080/x"), &chain),
            Err(EgressError::RedirectNotFollowed(
                "http://127.0.0.1:8080".into()
            ))
        );
    }

    #[test]
    fn malformed_allow_entries_are_refused() {
        for bad in ["not an entry", "10.0.0.0/99", "host:port", "mcp.internal"] {
            assert!(Allowlist::parse(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
