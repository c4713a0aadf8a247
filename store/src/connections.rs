//! A tenant's MCP connections: which upstream MCP server a provider's tools come from, and the
//! credentials the gateway calls it with, sealed by the vault.
//!
//! [`Connection`] carries no secret and is safe to print; secrets come out only through
//! [`load`] (and the OAuth refresh path, which locks the row), as [`Secrets`] whose values are
//! `SecretString`s. Plaintext JSON of the secrets lives only in zeroized buffers.
//!
//! Secrets are sealed to their destination as well as their owner (see
//! [`crate::vault::connection_aad`]): every write that changes where they are sent seals them
//! again, and moving the upstream URL to another origin needs the credentials again, since
//! stored secrets are sent only to the origin they were given for.

use std::fmt;

use jiff::Timestamp;
use nubabel_contract::identity::OrganizationId;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};
use url::Url;
use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::vault::{AadVersion, ConnectionBinding, Keyring, Sealed, VaultError, connection_aad};

/// Longest provider name; tool names are `<provider>_<tool>` and MCP caps names at 128.
pub const MAX_PROVIDER_LEN: usize = 32;

/// How the gateway authenticates to the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthKind {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// `<header>: <key>`.
    ApiKey {
        /// The header name (lower case).
        header: String,
    },
    /// `Authorization: Bearer <access token>`, refreshed with the refresh token.
    OAuth2 {
        /// The token endpoint refreshes go to.
        token_url: Url,
        /// The OAuth client id.
        client_id: String,
    },
}

impl AuthKind {
    /// The stored name: `bearer`, `api_key` or `oauth2`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Bearer => "bearer",
            Self::ApiKey { .. } => "api_key",
            Self::OAuth2 { .. } => "oauth2",
        }
    }
}

/// Whether the connection can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Usable.
    Active,
    /// The OAuth grant was refused (`invalid_grant`): an admin must store new tokens.
    NeedsReauthorization,
}

impl ConnectionState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::NeedsReauthorization => "needs_reauthorization",
        }
    }

    fn parse(value: &str) -> Result<Self, crate::Error> {
        match value {
            "active" => Ok(Self::Active),
            "needs_reauthorization" => Ok(Self::NeedsReauthorization),
            other => Err(crate::Error::Corrupt(format!(
                "unknown connection state {other:?}"
            ))),
        }
    }
}

/// One registered connection, without its secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// Row id; part of the secrets' associated data.
    pub id: Uuid,
    /// The tenant.
    pub organization_id: String,
    /// `[a-z0-9-]{1,32}`, unique per tenant.
    pub provider: String,
    /// The upstream MCP server (streamable HTTP).
    pub upstream_url: Url,
    /// How to authenticate upstream.
    pub auth_kind: AuthKind,
    /// Usable, or waiting for re-authorization.
    pub state: ConnectionState,
    /// When the OAuth access token expires, if known.
    pub token_expires_at: Option<Timestamp>,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed (also by a token refresh or re-encryption).
    pub updated_at: Timestamp,
}

/// The secrets of one connection; their values never print.
#[derive(Clone)]
pub enum Secrets {
    /// A static bearer token.
    Bearer {
        /// The token.
        token: SecretString,
    },
    /// A static API key.
    ApiKey {
        /// The key.
        key: SecretString,
    },
    /// OAuth 2 tokens and client credentials.
    OAuth2 {
        /// The current access token.
        access_token: SecretString,
        /// The refresh token, if the grant has one.
        refresh_token: Option<SecretString>,
        /// The client secret, for confidential clients.
        client_secret: Option<SecretString>,
    },
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({:?}, [redacted])", self.names())
    }
}

impl Secrets {
    /// Which secrets are set, by their API names (`token`, `apiKey`, `accessToken`,
    /// `refreshToken`, `clientSecret`): what responses may show instead of the values.
    pub fn names(&self) -> Vec<&'static str> {
        match self {
            Self::Bearer { .. } => vec!["token"],
            Self::ApiKey { .. } => vec!["apiKey"],
            Self::OAuth2 {
                refresh_token,
                client_secret,
                ..
            } => {
                let mut names = vec!["accessToken"];
                if refresh_token.is_some() {
                    names.push("refreshToken");
                }
                if client_secret.is_some() {
                    names.push("clientSecret");
                }
                names
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Bearer { .. } => "bearer",
            Self::ApiKey { .. } => "api_key",
            Self::OAuth2 { .. } => "oauth2",
        }
    }

    fn to_document(&self) -> SecretDocument {
        let reveal = |s: &SecretString| s.expose_secret().to_owned();
        let mut doc = SecretDocument::default();
        match self {
            Self::Bearer { token } => doc.token = Some(reveal(token)),
            Self::ApiKey { key } => doc.api_key = Some(reveal(key)),
            Self::OAuth2 {
                access_token,
                refresh_token,
                client_secret,
            } => {
                doc.access_token = Some(reveal(access_token));
                doc.refresh_token = refresh_token.as_ref().map(reveal);
                doc.client_secret = client_secret.as_ref().map(reveal);
            }
        }
        doc
    }

    fn from_document(kind: &str, doc: &SecretDocument) -> Result<Self, crate::Error> {
        let secret = |value: &Option<String>, name: &str| {
            value
                .as_deref()
                .map(SecretString::from)
                .ok_or_else(|| crate::Error::Corrupt(format!("sealed secrets lack {name}")))
        };
        let optional = |value: &Option<String>| value.as_deref().map(SecretString::from);
        Ok(match kind {
            "bearer" => Self::Bearer {
                token: secret(&doc.token, "token")?,
            },
            "api_key" => Self::ApiKey {
                key: secret(&doc.api_key, "apiKey")?,
            },
            "oauth2" => Self::OAuth2 {
                access_token: secret(&doc.access_token, "accessToken")?,
                refresh_token: optional(&doc.refresh_token),
                client_secret: optional(&doc.client_secret),
            },
            other => {
                return Err(crate::Error::Corrupt(format!(
                    "unknown auth kind {other:?}"
                )));
            }
        })
    }
}

/// The plaintext form of [`Secrets`] inside the ciphertext; wiped when dropped.
#[derive(Default, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SecretDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_secret: Option<String>,
}

/// What can go wrong with connections.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Postgres failed, or a stored value is corrupt.
    #[error(transparent)]
    Store(#[from] crate::Error),
    /// The vault refused (unknown key id, or a ciphertext that is not this row's).
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The tenant already has a connection for this provider.
    #[error("a connection for provider {0:?} already exists")]
    Exists(String),
    /// A field is invalid (the message names it).
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, as the API names it.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The secrets do not match the auth kind.
    #[error("credentials of kind {secrets} cannot be used with auth kind {auth}")]
    KindMismatch {
        /// The auth kind.
        auth: &'static str,
        /// The secrets' kind.
        secrets: &'static str,
    },
}

impl From<sqlx::Error> for ConnectionError {
    fn from(error: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &error
            && db.constraint() == Some("mcp_connections_organization_provider_key")
        {
            return Self::Exists(String::new());
        }
        Self::Store(error.into())
    }
}

/// Checks a provider name: `[a-z0-9-]{1,32}`.
pub fn validate_provider(provider: &str) -> Result<(), ConnectionError> {
    let ok = !provider.is_empty()
        && provider.len() <= MAX_PROVIDER_LEN
        && provider
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConnectionError::Invalid {
            field: "provider",
            reason: format!("must be 1 to {MAX_PROVIDER_LEN} characters of [a-z0-9-]"),
        })
    }
}

/// The credentials of a connection: how to authenticate, the secrets, the token expiry.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// How to authenticate.
    pub auth_kind: AuthKind,
    /// The secrets (their kind must match `auth_kind`).
    pub secrets: Secrets,
    /// When the OAuth access token expires, if known.
    pub token_expires_at: Option<Timestamp>,
}

impl Credentials {
    fn check(&self) -> Result<(), ConnectionError> {
        if self.auth_kind.as_str() != self.secrets.kind() {
            return Err(ConnectionError::KindMismatch {
                auth: self.auth_kind.as_str(),
                secrets: self.secrets.kind(),
            });
        }
        Ok(())
    }
}

/// A connection to register.
#[derive(Debug, Clone)]
pub struct NewConnection<'a> {
    /// The tenant.
    pub organization_id: &'a OrganizationId,
    /// The provider name.
    pub provider: &'a str,
    /// The upstream MCP server (validated against SSRF by the caller).
    pub upstream_url: &'a Url,
    /// Auth kind and secrets.
    pub credentials: &'a Credentials,
}

/// A connection with its secrets, opened.
#[derive(Debug, Clone)]
pub struct Unsealed {
    /// The connection as stored now.
    pub connection: Connection,
    /// Its secrets.
    pub secrets: Secrets,
}

/// The columns every query returns, as a literal so queries stay `&'static str`.
macro_rules! columns {
    () => {
        "id, organization_id, provider, upstream_url, auth_kind, auth_header,
    oauth_token_url, oauth_client_id, state, key_id, nonce, ciphertext, aad_version,
    (extract(epoch from token_expires_at) * 1000000)::int8 as token_expires_at_us,
    (extract(epoch from created_at) * 1000000)::int8 as created_at_us,
    (extract(epoch from updated_at) * 1000000)::int8 as updated_at_us"
    };
}

fn timestamp(micros: i64) -> Result<Timestamp, crate::Error> {
    Timestamp::from_microsecond(micros).map_err(|e| crate::Error::Corrupt(e.to_string()))
}

fn micros(at: Option<Timestamp>) -> Option<i64> {
    at.map(Timestamp::as_microsecond)
}

fn url(value: &str, column: &str) -> Result<Url, crate::Error> {
    Url::parse(value).map_err(|e| crate::Error::Corrupt(format!("{column}: {e}")))
}

fn connection_from_row(row: &PgRow) -> Result<Connection, ConnectionError> {
    let kind: String = row.try_get("auth_kind")?;
    let auth_kind = match kind.as_str() {
        "bearer" => AuthKind::Bearer,
        "api_key" => AuthKind::ApiKey {
            header: row
                .try_get::<Option<String>, _>("auth_header")?
                .unwrap_or_default(),
        },
        "oauth2" => AuthKind::OAuth2 {
            token_url: url(
                &row.try_get::<Option<String>, _>("oauth_token_url")?
                    .unwrap_or_default(),
                "oauth_token_url",
            )?,
            client_id: row
                .try_get::<Option<String>, _>("oauth_client_id")?
                .unwrap_or_default(),
        },
        other => {
            return Err(crate::Error::Corrupt(format!("unknown auth kind {other:?}")).into());
        }
    };
    Ok(Connection {
        id: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        provider: row.try_get("provider")?,
        upstream_url: url(&row.try_get::<String, _>("upstream_url")?, "upstream_url")?,
        auth_kind,
        state: ConnectionState::parse(&row.try_get::<String, _>("state")?)?,
        token_expires_at: row
            .try_get::<Option<i64>, _>("token_expires_at_us")?
            .map(timestamp)
            .transpose()?,
        created_at: timestamp(row.try_get("created_at_us")?)?,
        updated_at: timestamp(row.try_get("updated_at_us")?)?,
    })
}

fn sealed_from_row(row: &PgRow) -> Result<Sealed, ConnectionError> {
    Ok(Sealed {
        key_id: row.try_get("key_id")?,
        nonce: row.try_get("nonce")?,
        ciphertext: row.try_get("ciphertext")?,
    })
}

/// Whether two URLs have the same origin (scheme, host and port, a default port written out
/// or not): the unit stored secrets may be sent within.
pub fn same_origin(a: &Url, b: &Url) -> bool {
    let origin = a.origin();
    origin.is_tuple() && origin == b.origin()
}

/// Where secrets of `auth_kind` for `upstream_url` are sent, as the vault binds them.
fn destination<'a>(upstream_url: &'a Url, auth_kind: &'a AuthKind) -> Vec<(&'a str, &'a str)> {
    let mut fields = vec![
        ("auth_kind", auth_kind.as_str()),
        ("upstream_url", upstream_url.as_str()),
    ];
    match auth_kind {
        AuthKind::Bearer => {}
        AuthKind::ApiKey { header } => fields.push(("auth_header", header.as_str())),
        AuthKind::OAuth2 {
            token_url,
            client_id,
        } => {
            fields.push(("oauth_token_url", token_url.as_str()));
            fields.push(("oauth_client_id", client_id.as_str()));
        }
    }
    fields
}

/// The associated data of the secrets of connection `id` under `version`.
fn aad(
    version: AadVersion,
    organization_id: &str,
    id: Uuid,
    upstream_url: &Url,
    auth_kind: &AuthKind,
) -> Vec<u8> {
    let connection_id = id.to_string();
    let destination = destination(upstream_url, auth_kind);
    connection_aad(
        version,
        &ConnectionBinding {
            organization_id,
            connection_id: &connection_id,
            destination: &destination,
        },
    )
}

/// Seals `secrets` for their owner and destination under the current associated-data version.
fn seal(
    keyring: &Keyring,
    organization_id: &str,
    id: Uuid,
    upstream_url: &Url,
    auth_kind: &AuthKind,
    secrets: &Secrets,
) -> Result<Sealed, ConnectionError> {
    let document = secrets.to_document();
    let plaintext = Zeroizing::new(
        serde_json::to_vec(&document)
            .map_err(|e| crate::Error::Corrupt(format!("encoding secrets: {e}")))?,
    );
    Ok(keyring.seal(
        &aad(
            AadVersion::CURRENT,
            organization_id,
            id,
            upstream_url,
            auth_kind,
        ),
        &plaintext,
    )?)
}

fn open(keyring: &Keyring, row: &PgRow) -> Result<Unsealed, ConnectionError> {
    let connection = connection_from_row(row)?;
    let sealed = sealed_from_row(row)?;
    let version = AadVersion::from_i16(row.try_get("aad_version")?)?;
    let plaintext = keyring.open(
        &aad(
            version,
            &connection.organization_id,
            connection.id,
            &connection.upstream_url,
            &connection.auth_kind,
        ),
        &sealed,
    )?;
    let document: SecretDocument = serde_json::from_slice(&plaintext)
        .map_err(|_| crate::Error::Corrupt("sealed secrets are not a secret document".into()))?;
    let secrets = Secrets::from_document(connection.auth_kind.as_str(), &document)?;
    Ok(Unsealed {
        connection,
        secrets,
    })
}

fn auth_columns(kind: &AuthKind) -> (Option<&str>, Option<&str>, Option<&str>) {
    match kind {
        AuthKind::Bearer => (None, None, None),
        AuthKind::ApiKey { header } => (Some(header.as_str()), None, None),
        AuthKind::OAuth2 {
            token_url,
            client_id,
        } => (None, Some(token_url.as_str()), Some(client_id.as_str())),
    }
}

/// Registers a connection; its secrets are sealed with the keyring's current key.
pub async fn create(
    db: &PgPool,
    keyring: &Keyring,
    new: &NewConnection<'_>,
) -> Result<Connection, ConnectionError> {
    validate_provider(new.provider)?;
    new.credentials.check()?;
    let id = Uuid::now_v7();
    let organization_id = new.organization_id.as_str();
    let sealed = seal(
        keyring,
        organization_id,
        id,
        new.upstream_url,
        &new.credentials.auth_kind,
        &new.credentials.secrets,
    )?;
    let (header, token_url, client_id) = auth_columns(&new.credentials.auth_kind);
    let row = sqlx::query(concat!(
        "insert into mcp_connections (id, organization_id, provider, upstream_url, auth_kind,
             auth_header, oauth_token_url, oauth_client_id, key_id, nonce, ciphertext,
             token_expires_at, aad_version)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                 to_timestamp($12::float8 / 1000000), $13)
         returning ",
        columns!(),
        ""
    ))
    .bind(id)
    .bind(organization_id)
    .bind(new.provider)
    .bind(new.upstream_url.as_str())
    .bind(new.credentials.auth_kind.as_str())
    .bind(header)
    .bind(token_url)
    .bind(client_id)
    .bind(&sealed.key_id)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .bind(micros(new.credentials.token_expires_at))
    .bind(AadVersion::CURRENT.as_i16())
    .fetch_one(db)
    .await
    .map_err(|e| match ConnectionError::from(e) {
        ConnectionError::Exists(_) => ConnectionError::Exists(new.provider.to_owned()),
        other => other,
    })?;
    connection_from_row(&row)
}

/// The tenant's connections, by provider name.
pub async fn list(db: &PgPool, organization_id: &str) -> Result<Vec<Connection>, ConnectionError> {
    let rows = sqlx::query(concat!(
        "select ",
        columns!(),
        " from mcp_connections where organization_id = $1 order by provider"
    ))
    .bind(organization_id)
    .fetch_all(db)
    .await?;
    rows.iter().map(connection_from_row).collect()
}

/// The tenant's connection for `provider`.
pub async fn find(
    db: &PgPool,
    organization_id: &str,
    provider: &str,
) -> Result<Option<Connection>, ConnectionError> {
    let row = sqlx::query(concat!(
        "select ",
        columns!(),
        " from mcp_connections where organization_id = $1 and provider = $2"
    ))
    .bind(organization_id)
    .bind(provider)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(connection_from_row).transpose()
}

/// The connection `connection` names (re-read now) with its secrets opened.
///
/// Fails with [`VaultError::Decrypt`] when the row's ciphertext was not sealed for it.
pub async fn load(
    db: &PgPool,
    keyring: &Keyring,
    connection: &Connection,
) -> Result<Option<Unsealed>, ConnectionError> {
    let row = sqlx::query(concat!(
        "select ",
        columns!(),
        " from mcp_connections where organization_id = $1 and id = $2"
    ))
    .bind(&connection.organization_id)
    .bind(connection.id)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(|row| open(keyring, row)).transpose()
}

/// Like [`load`], inside the caller's transaction, holding the row lock until it ends: the
/// OAuth refresh runs under it, so replicas refresh one at a time and each re-reads what the
/// previous one stored.
pub async fn lock(
    tx: &mut PgConnection,
    keyring: &Keyring,
    connection: &Connection,
) -> Result<Option<Unsealed>, ConnectionError> {
    let row = sqlx::query(concat!(
        "select ",
        columns!(),
        " from mcp_connections
         where organization_id = $1 and id = $2 for update"
    ))
    .bind(&connection.organization_id)
    .bind(connection.id)
    .fetch_optional(&mut *tx)
    .await?;
    row.as_ref().map(|row| open(keyring, row)).transpose()
}

/// Stores new secrets and expiry for an existing connection in one statement (a refreshed
/// access token and its rotated refresh token land together), and marks it active.
pub async fn store_secrets(
    tx: &mut PgConnection,
    keyring: &Keyring,
    connection: &Connection,
    secrets: &Secrets,
    token_expires_at: Option<Timestamp>,
) -> Result<(), ConnectionError> {
    let sealed = seal(
        keyring,
        &connection.organization_id,
        connection.id,
        &connection.upstream_url,
        &connection.auth_kind,
        secrets,
    )?;
    sqlx::query(
        "update mcp_connections
         set key_id = $3, nonce = $4, ciphertext = $5, aad_version = $7,
             token_expires_at = to_timestamp($6::float8 / 1000000), state = 'active'
         where organization_id = $1 and id = $2",
    )
    .bind(&connection.organization_id)
    .bind(connection.id)
    .bind(&sealed.key_id)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .bind(micros(token_expires_at))
    .bind(AadVersion::CURRENT.as_i16())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Marks the connection as needing re-authorization (its grant was refused).
pub async fn mark_needs_reauthorization(
    tx: &mut PgConnection,
    connection: &Connection,
) -> Result<(), ConnectionError> {
    sqlx::query(
        "update mcp_connections set state = 'needs_reauthorization'
         where organization_id = $1 and id = $2",
    )
    .bind(&connection.organization_id)
    .bind(connection.id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// What an update changes; `None` keeps the stored value.
#[derive(Debug, Clone, Default)]
pub struct ConnectionUpdate<'a> {
    /// A new upstream URL.
    pub upstream_url: Option<&'a Url>,
    /// New credentials (replace the old ones entirely and make the connection active).
    pub credentials: Option<&'a Credentials>,
}

/// Updates the tenant's connection for `provider`; `None` when there is none.
pub async fn update(
    db: &PgPool,
    keyring: &Keyring,
    organization_id: &str,
    provider: &str,
    change: &ConnectionUpdate<'_>,
) -> Result<Option<Connection>, ConnectionError> {
    let mut tx = db.begin().await?;
    let row = sqlx::query(concat!(
        "select ",
        columns!(),
        " from mcp_connections
         where organization_id = $1 and provider = $2 for update"
    ))
    .bind(organization_id)
    .bind(provider)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let current = connection_from_row(&row)?;
    let upstream_url = change.upstream_url.unwrap_or(&current.upstream_url);
    if let Some(credentials) = change.credentials {
        credentials.check()?;
        let sealed = seal(
            keyring,
            organization_id,
            current.id,
            upstream_url,
            &credentials.auth_kind,
            &credentials.secrets,
        )?;
        let (header, token_url, client_id) = auth_columns(&credentials.auth_kind);
        sqlx::query(
            "update mcp_connections
             set upstream_url = $2, auth_kind = $3, auth_header = $4, oauth_token_url = $5,
                 oauth_client_id = $6, key_id = $7, nonce = $8, ciphertext = $9,
                 aad_version = $10, token_expires_at = to_timestamp($11::float8 / 1000000),
                 state = 'active'
             where id = $1",
        )
        .bind(current.id)
        .bind(upstream_url.as_str())
        .bind(credentials.auth_kind.as_str())
        .bind(header)
        .bind(token_url)
        .bind(client_id)
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(AadVersion::CURRENT.as_i16())
        .bind(micros(credentials.token_expires_at))
        .execute(&mut *tx)
        .await?;
    } else if *upstream_url != current.upstream_url {
        // The stored secrets move with the URL only within their origin; sealed again, for
        // the new URL.
        if !same_origin(upstream_url, &current.upstream_url) {
            return Err(ConnectionError::Invalid {
                field: "auth",
                reason: "required when upstreamUrl moves to another origin (scheme, host or \
                         port): stored secrets are sent only to the origin they were given for"
                    .to_owned(),
            });
        }
        let unsealed = open(keyring, &row).map_err(|_| ConnectionError::Invalid {
            field: "auth",
            reason: "required: the stored secrets cannot be decrypted with the configured \
                     keys, so they cannot be sealed for the new upstreamUrl"
                .to_owned(),
        })?;
        let sealed = seal(
            keyring,
            organization_id,
            current.id,
            upstream_url,
            &current.auth_kind,
            &unsealed.secrets,
        )?;
        sqlx::query(
            "update mcp_connections
             set upstream_url = $2, key_id = $3, nonce = $4, ciphertext = $5, aad_version = $6
             where id = $1",
        )
        .bind(current.id)
        .bind(upstream_url.as_str())
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(AadVersion::CURRENT.as_i16())
        .execute(&mut *tx)
        .await?;
    }
    let row = sqlx::query(concat!(
        "select ",
        columns!(),
        " from mcp_connections where id = $1"
    ))
    .bind(current.id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    connection_from_row(&row).map(Some)
}

/// Deletes the tenant's connection for `provider`; false when there was none.
pub async fn delete(
    db: &PgPool,
    organization_id: &str,
    provider: &str,
) -> Result<bool, ConnectionError> {
    let result =
        sqlx::query("delete from mcp_connections where organization_id = $1 and provider = $2")
            .bind(organization_id)
            .bind(provider)
            .execute(db)
            .await?;
    Ok(result.rows_affected() > 0)
}

/// Rows sealed under a key other than the current one, re-encrypted per batch.
const REENCRYPT_BATCH: i64 = 100;

/// Re-encrypts every row sealed with an older key or an older associated-data version under
/// the current key and version; returns how many.
///
/// Rows locked by a concurrent refresh are skipped in that batch and picked up by the next
/// (the refresh re-seals them under the current key anyway). A row that no key opens is left
/// as it is and counted in the error, so one bad row does not stop the rest.
pub async fn reencrypt_stale(db: &PgPool, keyring: &Keyring) -> Result<u64, ConnectionError> {
    let current = keyring.current_key_id().to_owned();
    let mut done = 0u64;
    let mut failed: Vec<Uuid> = Vec::new();
    loop {
        let mut tx = db.begin().await?;
        let rows = sqlx::query(concat!(
            "select ",
            columns!(),
            " from mcp_connections
             where (key_id <> $1 or aad_version <> $4) and not (id = any($2))
             order by id limit $3 for update skip locked"
        ))
        .bind(&current)
        .bind(&failed)
        .bind(REENCRYPT_BATCH)
        .bind(AadVersion::CURRENT.as_i16())
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            break;
        }
        for row in &rows {
            match open(keyring, row) {
                Ok(unsealed) => {
                    store_secrets(
                        &mut tx,
                        keyring,
                        &unsealed.connection,
                        &unsealed.secrets,
                        unsealed.connection.token_expires_at,
                    )
                    .await?;
                    // store_secrets marks the row active; keep a refused grant visible.
                    if unsealed.connection.state == ConnectionState::NeedsReauthorization {
                        mark_needs_reauthorization(&mut tx, &unsealed.connection).await?;
                    }
                    done += 1;
                }
                Err(_) => failed.push(row.try_get("id")?),
            }
        }
        tx.commit().await?;
    }
    if let Some(first) = failed.first() {
        return Err(ConnectionError::Invalid {
            field: "ciphertext",
            reason: format!(
                "{} connection(s) could not be re-encrypted (first: {first}); {done} were",
                failed.len()
            ),
        });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_are_short_lowercase_and_underscore_free() {
        for ok in ["github", "linear-2", "a"] {
            assert!(validate_provider(ok).is_ok(), "{ok}");
        }
        for bad in ["", "GitHub", "my_tool", "a b", &"x".repeat(33)] {
            assert!(validate_provider(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_print_their_names_but_never_their_values() {
        let secrets = Secrets::OAuth2 {
            access_token: "at-123".into(),
            refresh_token: Some("rt-456".into()),
            client_secret: None,
        };
        let printed = format!("{secrets:?}");
        assert!(printed.contains("accessToken") && printed.contains("refreshToken"));
        assert!(!printed.contains("at-123") && !printed.contains("rt-456"));
    }

    #[test]
    fn secret_documents_round_trip_per_kind() {
        let secrets = Secrets::ApiKey { key: "k-1".into() };
        let doc = secrets.to_document();
        let back = Secrets::from_document("api_key", &doc).unwrap();
        let Secrets::ApiKey { key } = back else {
            panic!("kind changed")
        };
        assert_eq!(key.expose_secret(), "k-1");
        assert!(Secrets::from_document("bearer", &doc).is_err());
    }
}
