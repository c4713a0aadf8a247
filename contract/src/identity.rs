//! Who is calling: tenants, sidecars and the Kubernetes names that identify them.
//!
//! These strings are bound into signing keys with NUL separators, so each type refuses NUL and
//! other control characters; a parsed value is safe to derive a key from.

use std::fmt;

/// A field of an identity that failed validation, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidIdentity {
    /// The field, as a client names it (`organizationId`, `namespace`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Longest organization id accepted; the CRDs allow the same.
pub const MAX_ORGANIZATION_ID_LEN: usize = 253;

/// A Nubabel organization id: the tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrganizationId(String);

impl OrganizationId {
    /// Accepts 1 to 253 bytes without control characters or whitespace.
    pub fn parse(value: &str) -> Result<Self, InvalidIdentity> {
        let invalid = |reason| InvalidIdentity {
            field: "organizationId",
            reason,
        };
        if value.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if value.len() > MAX_ORGANIZATION_ID_LEN {
            return Err(invalid("must be at most 253 bytes"));
        }
        if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid("must not contain whitespace or control characters"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrganizationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a Kubernetes namespace name (an RFC 1123 label: at most 63 characters).
pub fn validate_namespace(value: &str) -> Result<(), InvalidIdentity> {
    validate_dns_name(value, 63, false).map_err(|reason| InvalidIdentity {
        field: "namespace",
        reason,
    })
}

/// Checks a Kubernetes object name (an RFC 1123 subdomain: at most 253 characters).
pub fn validate_object_name(field: &'static str, value: &str) -> Result<(), InvalidIdentity> {
    validate_dns_name(value, 253, true).map_err(|reason| InvalidIdentity { field, reason })
}

fn validate_dns_name(value: &str, max: usize, dots: bool) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > max {
        return Err(if max == 63 {
            "must be at most 63 characters"
        } else {
            "must be at most 253 characters"
        });
    }
    let allowed =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    if !value.chars().all(allowed) {
        return Err("must consist of lowercase letters, digits and '-'");
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(value.chars().next()) || !alnum(value.chars().last()) {
        return Err("must start and end with a lowercase letter or digit");
    }
    Ok(())
}

/// One sidecar fleet (an `OpencodeSidecar`) of one tenant: the identity a signing key belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SidecarIdentity {
    organization_id: OrganizationId,
    namespace: String,
    name: String,
}

impl SidecarIdentity {
    /// Builds an identity from its three parts, validating each.
    pub fn new(
        organization_id: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Self, InvalidIdentity> {
        let organization_id = OrganizationId::parse(organization_id)?;
        validate_namespace(namespace)?;
        validate_object_name("name", name)?;
        Ok(Self {
            organization_id,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Parses the `x-nubabel-organization` and `x-nubabel-sidecar: <namespace>/<name>` pair.
    pub fn from_headers(organization_id: &str, sidecar: &str) -> Result<Self, InvalidIdentity> {
        let (namespace, name) = sidecar.split_once('/').ok_or(InvalidIdentity {
            field: "x-nubabel-sidecar",
            reason: "must be <namespace>/<name>",
        })?;
        Self::new(organization_id, namespace, name)
    }

    /// The tenant.
    pub fn organization_id(&self) -> &OrganizationId {
        &self.organization_id
    }

    /// The namespace of the `OpencodeSidecar`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The name of the `OpencodeSidecar`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for SidecarIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.organization_id, self.namespace, self.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organization_ids_with_nul_or_whitespace_are_refused() {
        assert!(OrganizationId::parse("org-1").is_ok());
        assert!(OrganizationId::parse("").is_err());
        assert!(OrganizationId::parse("a\0b").is_err());
        assert!(OrganizationId::parse("a b").is_err());
        assert!(OrganizationId::parse(&"x".repeat(254)).is_err());
    }

    #[test]
    fn sidecar_header_must_name_namespace_and_sidecar() {
        let id = SidecarIdentity::from_headers("org-1", "tenant-a/fleet").unwrap();
        assert_eq!(id.namespace(), "tenant-a");
        assert_eq!(id.name(), "fleet");
        assert!(SidecarIdentity::from_headers("org-1", "fleet").is_err());
        assert!(SidecarIdentity::from_headers("org-1", "Tenant/fleet").is_err());
        assert!(SidecarIdentity::from_headers("org-1", "tenant/-fleet").is_err());
        assert!(SidecarIdentity::from_headers("org-1", "a/b/c").is_err());
        assert!(SidecarIdentity::from_headers("org-1", &format!("{}/x", "a".repeat(64))).is_err());
    }
}
