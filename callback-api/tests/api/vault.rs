//! The credential vault on real Postgres: ciphertexts are bound to their tenant, row and
//! destination, are not plaintext, and survive a master key rotation and the change of the
//! associated data's version, after which they are re-encrypted.

use std::time::Duration;

use anyhow::Result;
use nubabel_callback_api::credentials::CredentialError;
use nubabel_store::{
    connections,
    vault::{AadVersion, ConnectionBinding, Keyring, connection_aad},
};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde_json::json;

use crate::helpers::{VAULT_KEYS, build_app_with, unique};

/// A second key (32 bytes of 0x02).
const NEW_KEY: &str = "k2=AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

async fn register_bearer(
    app: &crate::helpers::TestApp,
    org: &str,
    provider: &str,
    token: &str,
) -> Result<()> {
    let (status, body) = app
        .admin(
            Method::POST,
            &format!("/api/admin/organizations/{org}/connections"),
            Some(&json!({
                "provider": provider,
                "upstreamUrl": "http://127.0.0.1:9/mcp",
                "auth": {"type": "bearer", "token": token},
            })),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    Ok(())
}

fn loopback(config: &mut nubabel_callback_api::config::Config) {
    config.egress_allow = vec!["127.0.0.0/8".to_owned()];
}

#[tokio::test]
async fn a_ciphertext_copied_to_another_tenants_row_fails_to_decrypt() -> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let (app, state) = build_app_with(&database_url, &redis_url, loopback).await?;
    let (org_a, org_b) = (unique("org-a"), unique("org-b"));
    register_bearer(&app, &org_a, "linear", "token-of-a").await?;
    register_bearer(&app, &org_b, "linear", "token-of-b").await?;

    // B's row gets A's sealed secrets, byte for byte.
    let copied = sqlx::query(
        "update mcp_connections b
         set key_id = a.key_id, nonce = a.nonce, ciphertext = a.ciphertext
         from mcp_connections a
         where a.organization_id = $1 and b.organization_id = $2 and a.provider = b.provider",
    )
    .bind(&org_a)
    .bind(&org_b)
    .execute(&app.db)
    .await?;
    assert_eq!(copied.rows_affected(), 1);

    let b = connections::find(&app.db, &org_b, "linear").await?.unwrap();
    let error = state.credentials.authorize(&b).await.unwrap_err();
    assert_eq!(
        error,
        CredentialError::Unavailable("the stored credentials cannot be decrypted".into())
    );
    assert!(!error.to_string().contains("token-of-a"));
    let (_, shown) = app
        .admin(
            Method::GET,
            &format!("/api/admin/organizations/{org_b}/connections/linear"),
            None,
        )
        .await?;
    assert_eq!(shown["auth"]["secrets"], json!([]), "{shown}");

    // A's own row still opens.
    let a = connections::find(&app.db, &org_a, "linear").await?.unwrap();
    let auth = state.credentials.authorize(&a).await?;
    assert_eq!(auth.value.expose_secret(), "Bearer token-of-a");
    Ok(())
}

#[tokio::test]
async fn secrets_are_stored_encrypted_with_a_fresh_nonce_each() -> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let (app, _) = build_app_with(&database_url, &redis_url, loopback).await?;
    let org = unique("org");
    register_bearer(&app, &org, "one", "same-token-value").await?;
    register_bearer(&app, &org, "two", "same-token-value").await?;
    let rows: Vec<(String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "select key_id, nonce, ciphertext from mcp_connections
         where organization_id = $1 order by provider",
    )
    .bind(&org)
    .fetch_all(&app.db)
    .await?;
    assert_eq!(rows.len(), 2);
    for (key_id, nonce, ciphertext) in &rows {
        assert_eq!(key_id, "k1");
        assert_eq!(nonce.len(), 12);
        assert!(
            !ciphertext
                .windows(b"same-token-value".len())
                .any(|w| w == b"same-token-value")
        );
    }
    assert_ne!(rows[0].1, rows[1].1, "nonces differ");
    assert_ne!(rows[0].2, rows[1].2, "ciphertexts differ");
    Ok(())
}

async fn key_ids(db: &sqlx::PgPool, org: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "select key_id from mcp_connections where organization_id = $1 order by provider",
    )
    .bind(org)
    .fetch_all(db)
    .await?)
}

#[tokio::test]
async fn rotating_the_master_key_keeps_old_rows_readable_and_reencrypts_them() -> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let (old_app, _) = build_app_with(&database_url, &redis_url, loopback).await?;
    let org = unique("org");
    register_bearer(&old_app, &org, "one", "token-one").await?;
    assert_eq!(key_ids(&old_app.db, &org).await?, ["k1"]);

    // A replica with the new key in front re-encrypts at startup, in the background.
    let rotated_keys = format!("{NEW_KEY},{VAULT_KEYS}");
    let (mut rotated, rotated_state) = build_app_with(&database_url, &redis_url, |c| {
        loopback(c);
        c.vault_keys = Some(rotated_keys.clone().into());
    })
    .await?;
    let one = connections::find(&rotated.db, &org, "one").await?.unwrap();
    assert_eq!(
        rotated_state
            .credentials
            .authorize(&one)
            .await?
            .value
            .expose_secret(),
        "Bearer token-one"
    );
    let reencryption = rotated
        .reencryption
        .take()
        .expect("a vault re-encrypts at startup");
    tokio::time::timeout(Duration::from_secs(10), reencryption).await??;
    assert_eq!(key_ids(&rotated.db, &org).await?, ["k2"]);

    // A row written by a replica still on the old key is re-encrypted by the admin endpoint.
    register_bearer(&old_app, &org, "two", "token-two").await?;
    assert_eq!(key_ids(&rotated.db, &org).await?, ["k2", "k1"]);
    let (status, body) = rotated
        .admin(Method::POST, "/api/admin/vault/reencrypt", None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"reencrypted": 1, "keyId": "k2"}));
    assert_eq!(key_ids(&rotated.db, &org).await?, ["k2", "k2"]);

    // With every row under k2, the old key can go.
    let (_new_only, new_state) = build_app_with(&database_url, &redis_url, |c| {
        loopback(c);
        c.vault_keys = Some(NEW_KEY.into());
    })
    .await?;
    for (provider, token) in [("one", "token-one"), ("two", "token-two")] {
        let connection = connections::find(&rotated.db, &org, provider)
            .await?
            .unwrap();
        let auth = new_state.credentials.authorize(&connection).await?;
        assert_eq!(auth.value.expose_secret(), format!("Bearer {token}"));
    }
    Ok(())
}

#[tokio::test]
async fn malformed_vault_keys_or_egress_entries_stop_startup_with_a_clear_error() -> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let mut config = crate::helpers::test_config(&database_url, &redis_url);
    config.vault_keys = Some("k1=c2hvcnQ=".into());
    let error = nubabel_callback_api::startup::Application::build(config)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        error.to_string(),
        "NUBABEL_VAULT_KEYS: key \"k1\" must be 32 bytes, got 5"
    );
    let mut config = crate::helpers::test_config(&database_url, &redis_url);
    config.egress_allow = vec!["10.0.0.0/8".into(), "metadata".into()];
    let error = nubabel_callback_api::startup::Application::build(config)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        error.to_string(),
        "NUBABEL_EGRESS_ALLOW: \"metadata\" is neither a CIDR (10.0.0.0/8) nor host:port"
    );
    Ok(())
}

#[tokio::test]
async fn a_ciphertext_whose_destination_was_changed_behind_the_api_fails_to_decrypt() -> Result<()>
{
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let (app, state) = build_app_with(&database_url, &redis_url, loopback).await?;
    let org = unique("org");
    let (status, body) = app
        .admin(
            Method::POST,
            &format!("/api/admin/organizations/{org}/connections"),
            Some(&json!({
                "provider": "github",
                "upstreamUrl": "http://127.0.0.1:9/mcp",
                "auth": {"type": "apiKey", "header": "x-api-key", "key": "key-of-org"},
            })),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let endpoint = crate::oauth::TokenEndpoint::start(crate::oauth::TokenMode::Rotate).await?;
    let in_an_hour = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
    app.register_oauth(&org, "linear", &endpoint.url, &in_an_hour)
        .await?;

    // Each column that says where a secret goes, pointed elsewhere in the database, then back.
    let token_url = endpoint.url.clone();
    for (provider, set, elsewhere, original) in [
        (
            "github",
            "update mcp_connections set upstream_url = $3 where organization_id = $1 and provider = $2",
            "http://127.0.0.1:10/mcp",
            "http://127.0.0.1:9/mcp",
        ),
        (
            "github",
            "update mcp_connections set auth_header = $3 where organization_id = $1 and provider = $2",
            "x-forwarded-key",
            "x-api-key",
        ),
        (
            "linear",
            "update mcp_connections set oauth_token_url = $3 where organization_id = $1 and provider = $2",
            "http://127.0.0.1:10/token",
            token_url.as_str(),
        ),
    ] {
        let connection = connections::find(&app.db, &org, provider).await?.unwrap();
        for (value, opens) in [(elsewhere, false), (original, true)] {
            sqlx::query(set)
                .bind(&org)
                .bind(provider)
                .bind(value)
                .execute(&app.db)
                .await?;
            let result = state.credentials.authorize(&connection).await;
            assert_eq!(
                result.is_ok(),
                opens,
                "{provider}: {set} {value}: {result:?}"
            );
            if !opens {
                assert_eq!(
                    result.unwrap_err(),
                    CredentialError::Unavailable(
                        "the stored credentials cannot be decrypted".into()
                    )
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn rows_sealed_under_the_first_aad_version_still_open_and_are_resealed() -> Result<()> {
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let (app, state) = build_app_with(&database_url, &redis_url, loopback).await?;
    let org = unique("org");
    register_bearer(&app, &org, "linear", "current-token").await?;
    let connection = connections::find(&app.db, &org, "linear").await?.unwrap();

    // The row as a build before version 2 wrote it: bound to organization and id only.
    let keyring = Keyring::parse(VAULT_KEYS)?;
    let id = connection.id.to_string();
    let legacy = keyring.seal(
        &connection_aad(
            AadVersion::V1,
            &ConnectionBinding {
                organization_id: &org,
                connection_id: &id,
                destination: &[],
            },
        ),
        br#"{"token":"legacy-token"}"#,
    )?;
    sqlx::query(
        "update mcp_connections set nonce = $2, ciphertext = $3, aad_version = 1 where id = $1",
    )
    .bind(connection.id)
    .bind(&legacy.nonce)
    .bind(&legacy.ciphertext)
    .execute(&app.db)
    .await?;
    let auth = state.credentials.authorize(&connection).await?;
    assert_eq!(auth.value.expose_secret(), "Bearer legacy-token");

    // Re-encryption (as at startup, or the admin endpoint) moves it to the current version.
    let (status, body) = app
        .admin(Method::POST, "/api/admin/vault/reencrypt", None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"reencrypted": 1, "keyId": "k1"}));
    let version: i16 = sqlx::query_scalar("select aad_version from mcp_connections where id = $1")
        .bind(connection.id)
        .fetch_one(&app.db)
        .await?;
    assert_eq!(version, AadVersion::CURRENT.as_i16());
    let auth = state.credentials.authorize(&connection).await?;
    assert_eq!(auth.value.expose_secret(), "Bearer legacy-token");

    // Now bound to its destination too.
    sqlx::query(
        "update mcp_connections set upstream_url = 'http://127.0.0.1:10/mcp' where id = $1",
    )
    .bind(connection.id)
    .execute(&app.db)
    .await?;
    assert_eq!(
        state.credentials.authorize(&connection).await.unwrap_err(),
        CredentialError::Unavailable("the stored credentials cannot be decrypted".into())
    );
    Ok(())
}
