//! Tenant API tokens: opaque bearer tokens for `POST /api/delegate`, each bound to one
//! organization and the namespace where its tasks are created.
//!
//! A token is 32 random bytes, shown once when issued; Postgres keeps only its SHA-256, so a
//! database dump reveals no usable token. Lookups go by that hash (a unique index).

use base64::Engine as _;
use nubabel_contract::identity::{OrganizationId, validate_namespace};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::Result;

/// Every token starts with this, so leaked tokens are easy to recognise (and scan for).
pub const TOKEN_PREFIX: &str = "nbt_";

/// A token just issued: the only time its secret exists outside the caller's hands.
#[derive(Clone)]
pub struct IssuedToken {
    /// The token's id (for revoking it).
    pub id: Uuid,
    /// The bearer token.
    pub token: String,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What a valid token allows: creating tasks for one organization in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// The token's id.
    pub id: Uuid,
    /// The tenant.
    pub organization_id: String,
    /// Where the tenant's tasks are created.
    pub namespace: String,
}

/// A stored token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The token's id.
    pub id: Uuid,
    /// The name it was issued with.
    pub name: String,
    /// The tenant.
    pub organization_id: String,
    /// Where the tenant's tasks are created.
    pub namespace: String,
    /// Whether it was revoked.
    pub revoked: bool,
}

fn digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Issues a token for `organization_id` whose tasks go to `namespace`.
pub async fn issue(
    pool: &PgPool,
    organization_id: &OrganizationId,
    namespace: &str,
    name: &str,
) -> Result<IssuedToken> {
    validate_namespace(namespace)?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|e| crate::Error::Corrupt(format!("no randomness: {e}")))?;
    let token = format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into api_tokens (id, token_sha256, organization_id, namespace, name)
         values ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(digest(&token))
    .bind(organization_id.as_str())
    .bind(namespace)
    .bind(name)
    .execute(pool)
    .await?;
    Ok(IssuedToken { id, token })
}

/// The grant of `token`, or `None` when it is unknown or revoked.
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Option<TokenGrant>> {
    if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
        return Ok(None);
    }
    let row = sqlx::query(
        "select id, organization_id, namespace from api_tokens
         where token_sha256 = $1 and revoked_at is null",
    )
    .bind(digest(token))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| TokenGrant {
        id: row.get("id"),
        organization_id: row.get("organization_id"),
        namespace: row.get("namespace"),
    }))
}

/// Revokes token `id`; false when there is no such token or it was revoked before.
pub async fn revoke(pool: &PgPool, id: Uuid) -> Result<bool> {
    let done = sqlx::query(
        "update api_tokens set revoked_at = now() where id = $1 and revoked_at is null",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Every token, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<TokenInfo>> {
    let rows = sqlx::query(
        "select id, name, organization_id, namespace, revoked_at is not null as revoked
         from api_tokens order by created_at, id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| TokenInfo {
            id: row.get("id"),
            name: row.get("name"),
            organization_id: row.get("organization_id"),
            namespace: row.get("namespace"),
            revoked: row.get("revoked"),
        })
        .collect())
}
