//! The credential broker: the header the gateway sends to a tenant's upstream, from the
//! connection's sealed secrets, with OAuth 2 access tokens refreshed on time.
//!
//! A refresh happens when the access token expires within the skew (60 s by default) or after
//! the upstream answered 401. It is single-flight per connection: within a replica through a
//! per-connection mutex, across replicas through the connection row's lock (`select ... for
//! update`), held while the token endpoint is called. Whoever gets the lock re-reads the row
//! first, so a waiter finds the token its predecessor stored and uses it. The new access token
//! and a rotated refresh token are sealed and stored in one update. `invalid_grant` marks the
//! connection as needing re-authorization.
//!
//! The token endpoint gets the refresh token and client secret in the form body, so it must
//! answer directly (no redirect is followed), and its answer is read up to a cap.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use http::{HeaderName, HeaderValue, header};
use jiff::{SignedDuration, Timestamp};
use nubabel_store::{
    connections::{
        self, AuthKind, Connection, ConnectionError, ConnectionState, Secrets, Unsealed,
    },
    vault::Keyring,
};
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::egress::{self, Egress, ReadError, Redirects};

/// Default time before expiry at which an access token is refreshed.
pub const DEFAULT_REFRESH_SKEW: Duration = Duration::from_secs(60);

/// How long a token endpoint may take.
const TOKEN_ENDPOINT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest token endpoint response read.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// Per-connection mutexes kept before the map starts over.
const LOCAL_LOCKS_CAPACITY: usize = 10_000;

/// The header to send upstream. The value never prints.
#[derive(Clone)]
pub struct UpstreamAuth {
    /// `authorization`, or the API key's header.
    pub header: HeaderName,
    /// The header's value (`Bearer <token>`, or the key).
    pub value: SecretString,
}

impl fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpstreamAuth({}: [redacted])", self.header)
    }
}

impl UpstreamAuth {
    fn bearer(token: &SecretString) -> Self {
        Self {
            header: header::AUTHORIZATION,
            value: format!("Bearer {}", token.expose_secret()).into(),
        }
    }

    /// The value as a header value, marked sensitive so HTTP layers never log it.
    pub fn header_value(&self) -> Result<HeaderValue, CredentialError> {
        let mut value = HeaderValue::from_str(self.value.expose_secret()).map_err(|_| {
            CredentialError::Unavailable(
                "the stored credential is not a valid header value".to_owned(),
            )
        })?;
        value.set_sensitive(true);
        Ok(value)
    }

    fn same_value(&self, other: &Self) -> bool {
        self.header == other.header && self.value.expose_secret() == other.value.expose_secret()
    }
}

/// Why no credential could be produced. The message is meant for the tool result: it says
/// what happened and what to do, and never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The OAuth grant was refused: an admin must re-authorize the connection.
    #[error(
        "the {provider} connection needs re-authorization: its OAuth grant was refused; \
         an administrator must store new tokens"
    )]
    NeedsReauthorization {
        /// The provider.
        provider: String,
    },
    /// The upstream refused the stored static credentials.
    #[error(
        "the {provider} upstream refused the stored credentials; an administrator must update them"
    )]
    Rejected {
        /// The provider.
        provider: String,
    },
    /// The connection no longer exists.
    #[error("the connection no longer exists")]
    NotFound,
    /// Credentials cannot be produced now (vault not configured, Postgres or the token
    /// endpoint failing).
    #[error("credentials are unavailable: {0}")]
    Unavailable(String),
}

/// The credential broker, one per replica.
pub struct Broker {
    db: PgPool,
    keyring: Option<Arc<Keyring>>,
    egress: Egress,
    skew: Duration,
    local: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("keyring", &self.keyring)
            .field("skew", &self.skew)
            .finish_non_exhaustive()
    }
}

/// A token endpoint's answer (RFC 6749 section 5); wiped when dropped.
#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct TokenResponse {
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

/// Why a refresh is wanted.
enum Need<'a> {
    /// The token expires within the skew.
    Expiring,
    /// The upstream refused this value.
    Rejected(&'a UpstreamAuth),
}

impl Broker {
    /// A broker over `db`, opening secrets with `keyring` (without one, every connection is
    /// unavailable) and calling token endpoints through `egress`.
    pub fn new(db: PgPool, keyring: Option<Arc<Keyring>>, egress: Egress, skew: Duration) -> Self {
        Self {
            db,
            keyring,
            egress,
            skew,
            local: Mutex::default(),
        }
    }

    /// The keyring, if the vault is configured.
    pub fn keyring(&self) -> Option<&Arc<Keyring>> {
        self.keyring.as_ref()
    }

    fn require_keyring(&self) -> Result<&Keyring, CredentialError> {
        self.keyring.as_deref().ok_or_else(|| {
            CredentialError::Unavailable(
                "the credential vault is not configured (NUBABEL_VAULT_KEYS)".to_owned(),
            )
        })
    }

    /// The header to send upstream now (refreshing an OAuth token first when it is about to
    /// expire).
    pub async fn authorize(
        &self,
        connection: &Connection,
    ) -> Result<UpstreamAuth, CredentialError> {
        let keyring = self.require_keyring()?;
        let unsealed = connections::load(&self.db, keyring, connection)
            .await
            .map_err(|e| unavailable(&e, connection))?
            .ok_or(CredentialError::NotFound)?;
        check_state(&unsealed.connection)?;
        if self.needs_refresh(&unsealed, &Need::Expiring) {
            return self.refresh(connection, Need::Expiring).await;
        }
        auth_of(&unsealed)
    }

    /// After the upstream answered 401 with `rejected`: refresh once (single-flight) and
    /// return the new header.
    pub async fn reauthorize(
        &self,
        connection: &Connection,
        rejected: &UpstreamAuth,
    ) -> Result<UpstreamAuth, CredentialError> {
        self.refresh(connection, Need::Rejected(rejected)).await
    }

    fn needs_refresh(&self, unsealed: &Unsealed, need: &Need<'_>) -> bool {
        match need {
            Need::Expiring => {
                matches!(unsealed.secrets, Secrets::OAuth2 { .. })
                    && unsealed.connection.token_expires_at.is_some_and(|at| {
                        let skew =
                            SignedDuration::try_from(self.skew).unwrap_or(SignedDuration::MAX);
                        at.duration_since(Timestamp::now()) <= skew
                    })
            }
            Need::Rejected(rejected) => {
                auth_of(unsealed).is_ok_and(|current| current.same_value(rejected))
            }
        }
    }

    fn local_lock(&self, id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if locks.len() >= LOCAL_LOCKS_CAPACITY && !locks.contains_key(&id) {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        Arc::clone(locks.entry(id).or_default())
    }

    async fn refresh(
        &self,
        connection: &Connection,
        need: Need<'_>,
    ) -> Result<UpstreamAuth, CredentialError> {
        let keyring = self.require_keyring()?;
        let local = self.local_lock(connection.id);
        let _local = local.lock().await;
        let fail = |e: ConnectionError| unavailable(&e, connection);
        let mut tx = self.db.begin().await.map_err(|e| fail(e.into()))?;
        let unsealed = connections::lock(&mut tx, keyring, connection)
            .await
            .map_err(fail)?
            .ok_or(CredentialError::NotFound)?;
        check_state(&unsealed.connection)?;
        if !self.needs_refresh(&unsealed, &need) {
            // Someone refreshed while this call waited for the lock, or an admin stored new
            // credentials: use what is there.
            return auth_of(&unsealed);
        }
        let current = &unsealed.connection;
        let (token_url, client_id, access_token, refresh_token, client_secret) =
            match (&current.auth_kind, &unsealed.secrets) {
                (
                    AuthKind::OAuth2 {
                        token_url,
                        client_id,
                    },
                    Secrets::OAuth2 {
                        access_token,
                        refresh_token,
                        client_secret,
                    },
                ) => (
                    token_url,
                    client_id,
                    access_token,
                    refresh_token,
                    client_secret,
                ),
                _ => {
                    return Err(CredentialError::Rejected {
                        provider: current.provider.clone(),
                    });
                }
            };
        let Some(refresh_token) = refresh_token else {
            return match need {
                // Unknown whether the token still works: let the upstream decide.
                Need::Expiring => Ok(UpstreamAuth::bearer(access_token)),
                Need::Rejected(_) => {
                    self.give_up(tx, current).await?;
                    Err(needs_reauthorization(current))
                }
            };
        };
        let outcome = self
            .call_token_endpoint(
                current,
                token_url,
                client_id,
                refresh_token,
                client_secret.as_ref(),
            )
            .await;
        match outcome {
            Ok(tokens) => {
                let access = tokens
                    .access_token
                    .as_deref()
                    .map(SecretString::from)
                    .ok_or_else(|| {
                        CredentialError::Unavailable(format!(
                            "the token endpoint of {} answered without an access_token",
                            current.provider
                        ))
                    })?;
                // A rotated refresh token replaces the old one in the same update.
                let refresh = tokens
                    .refresh_token
                    .as_deref()
                    .map(SecretString::from)
                    .unwrap_or_else(|| refresh_token.clone());
                let expires_at = tokens.expires_in.and_then(|seconds| {
                    Timestamp::now()
                        .checked_add(SignedDuration::from_secs(
                            i64::try_from(seconds).unwrap_or(i64::MAX / 2),
                        ))
                        .ok()
                });
                let secrets = Secrets::OAuth2 {
                    access_token: access.clone(),
                    refresh_token: Some(refresh),
                    client_secret: client_secret.clone(),
                };
                connections::store_secrets(&mut tx, keyring, current, &secrets, expires_at)
                    .await
                    .map_err(fail)?;
                tx.commit().await.map_err(|e| fail(e.into()))?;
                tracing::info!(
                    organization_id = %current.organization_id,
                    provider = %current.provider,
                    "refreshed an OAuth access token"
                );
                Ok(UpstreamAuth::bearer(&access))
            }
            Err(RefreshFailure::InvalidGrant) => {
                self.give_up(tx, current).await?;
                tracing::warn!(
                    organization_id = %current.organization_id,
                    provider = %current.provider,
                    "the OAuth grant was refused; the connection needs re-authorization"
                );
                Err(needs_reauthorization(current))
            }
            Err(RefreshFailure::Other(message)) => {
                tracing::warn!(
                    organization_id = %current.organization_id,
                    provider = %current.provider,
                    reason = %message,
                    "refreshing an OAuth access token failed"
                );
                Err(CredentialError::Unavailable(message))
            }
        }
    }

    async fn give_up(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        connection: &Connection,
    ) -> Result<(), CredentialError> {
        let fail = |e: ConnectionError| unavailable(&e, connection);
        connections::mark_needs_reauthorization(&mut tx, connection)
            .await
            .map_err(fail)?;
        tx.commit().await.map_err(|e| fail(e.into()))
    }

    async fn call_token_endpoint(
        &self,
        connection: &Connection,
        token_url: &url::Url,
        client_id: &str,
        refresh_token: &SecretString,
        client_secret: Option<&SecretString>,
    ) -> Result<TokenResponse, RefreshFailure> {
        let provider = &connection.provider;
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", refresh_token.expose_secret())
                .append_pair("client_id", client_id);
            if let Some(secret) = client_secret {
                form.append_pair("client_secret", secret.expose_secret());
            }
            Zeroizing::new(form.finish())
        };
        let request = self
            .egress
            // The form carries the refresh token and client secret: a 307 would post them
            // again to wherever the endpoint points, so no redirect is followed.
            .request(Method::POST, token_url.clone(), Redirects::Refused)
            .map_err(|e| RefreshFailure::Other(format!("token endpoint of {provider}: {e}")))?;
        let response = request
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .timeout(TOKEN_ENDPOINT_TIMEOUT)
            .body(body.as_bytes().to_vec())
            .send()
            .await
            .map_err(|e| {
                let reason = egress::refusal(&e).map_or_else(
                    || {
                        if e.is_timeout() {
                            "timed out".to_owned()
                        } else {
                            "could not be reached".to_owned()
                        }
                    },
                    ToString::to_string,
                );
                RefreshFailure::Other(format!("the token endpoint of {provider} {reason}"))
            })?;
        let status = response.status();
        let bytes = Zeroizing::new(
            egress::read_capped(response, MAX_TOKEN_RESPONSE_BYTES)
                .await
                .map_err(|error| match error {
                    ReadError::TooLarge(max) => RefreshFailure::Other(format!(
                        "the token response of {provider} is larger than {max} bytes"
                    )),
                    ReadError::Body(_) => RefreshFailure::Other(format!(
                        "reading the token response of {provider} failed"
                    )),
                })?,
        );
        let parsed: Option<TokenResponse> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return parsed.ok_or_else(|| {
                RefreshFailure::Other(format!("the token response of {provider} is not JSON"))
            });
        }
        if parsed
            .as_ref()
            .and_then(|p| p.error.as_deref())
            .is_some_and(|error| error == "invalid_grant")
        {
            return Err(RefreshFailure::InvalidGrant);
        }
        let code = parsed
            .as_ref()
            .and_then(|p| p.error.clone())
            .filter(|e| e.len() <= 64 && e.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_default();
        Err(RefreshFailure::Other(format!(
            "the token endpoint of {provider} answered {status} {code}"
        )))
    }
}

enum RefreshFailure {
    InvalidGrant,
    Other(String),
}

fn check_state(connection: &Connection) -> Result<(), CredentialError> {
    match connection.state {
        ConnectionState::Active => Ok(()),
        ConnectionState::NeedsReauthorization => Err(needs_reauthorization(connection)),
    }
}

fn needs_reauthorization(connection: &Connection) -> CredentialError {
    CredentialError::NeedsReauthorization {
        provider: connection.provider.clone(),
    }
}

fn auth_of(unsealed: &Unsealed) -> Result<UpstreamAuth, CredentialError> {
    match (&unsealed.connection.auth_kind, &unsealed.secrets) {
        (AuthKind::Bearer, Secrets::Bearer { token }) => Ok(UpstreamAuth::bearer(token)),
        (AuthKind::ApiKey { header }, Secrets::ApiKey { key }) => Ok(UpstreamAuth {
            header: HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                CredentialError::Unavailable(format!("{header:?} is not a valid header name"))
            })?,
            value: key.clone(),
        }),
        (AuthKind::OAuth2 { .. }, Secrets::OAuth2 { access_token, .. }) => {
            Ok(UpstreamAuth::bearer(access_token))
        }
        _ => Err(CredentialError::Unavailable(
            "the stored credentials do not match the connection's auth kind".to_owned(),
        )),
    }
}

fn unavailable(error: &ConnectionError, connection: &Connection) -> CredentialError {
    tracing::error!(
        organization_id = %connection.organization_id,
        provider = %connection.provider,
        error = %error,
        "loading connection credentials failed"
    );
    let reason = match error {
        ConnectionError::Vault(_) => "the stored credentials cannot be decrypted",
        _ => "the credential store is unavailable",
    };
    CredentialError::Unavailable(reason.to_owned())
}

/// Handlers await the broker, so its futures must be `Send`.
#[allow(dead_code)]
fn broker_futures_are_send(broker: &Broker, connection: &Connection, rejected: &UpstreamAuth) {
    fn is_send<T: Send>(_: T) {}
    is_send(broker.authorize(connection));
    is_send(broker.reauthorize(connection, rejected));
}
