//! `nubabel-callback-api token create|list|revoke`: the tenant API tokens of `/api/delegate`.
//!
//! A token is bound to one organization and to the namespace where that tenant's tasks are
//! created (stated when issuing, rather than discovered from the tenant's OpencodeSidecar, so
//! a request never depends on which sidecars exist right now, and a tenant can be moved by
//! issuing a new token). The token is printed once; Postgres keeps its SHA-256.

use anyhow::Context;
use clap::{Parser, Subcommand};
use nubabel_contract::identity::OrganizationId;
use nubabel_store::{
    api_tokens,
    db::{self, PoolSettings},
};
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

/// `nubabel-callback-api token`: manage tenant API tokens.
#[derive(Debug, Parser)]
#[command(
    name = "nubabel-callback-api token",
    about = "Manage the tenant API tokens of /api/delegate"
)]
pub struct TokenCli {
    /// Postgres URL (`postgres://user:password@host/db`).
    #[arg(long, env = "NUBABEL_DATABASE_URL", hide_env_values = true)]
    pub database_url: SecretString,

    /// What to do.
    #[command(subcommand)]
    pub command: TokenCommand,
}

/// The token subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a token; it is printed once and cannot be shown again.
    Create {
        /// The organization (tenant) the token acts for.
        #[arg(long)]
        organization: String,
        /// The namespace where the tenant's DelegatedTasks are created.
        #[arg(long)]
        namespace: String,
        /// A name to recognise the token by.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List tokens (without their secrets).
    List,
    /// Revoke a token by id; requests with it are refused from then on.
    Revoke {
        /// The token's id, as `create` and `list` print it.
        id: Uuid,
    },
}

/// Runs a token subcommand; returns what to print.
pub async fn run(cli: TokenCli) -> anyhow::Result<String> {
    let options: PgConnectOptions = cli
        .database_url
        .expose_secret()
        .parse()
        .context("parsing the database URL")?;
    let pool = db::connect_lazy(
        options,
        &PoolSettings {
            max_connections: 1,
            ..PoolSettings::default()
        },
    );
    db::migrate(&pool)
        .await
        .context("applying database migrations")?;
    run_with(&pool, cli.command).await
}

/// Runs a token subcommand against `pool`.
pub async fn run_with(pool: &sqlx::PgPool, command: TokenCommand) -> anyhow::Result<String> {
    match command {
        TokenCommand::Create {
            organization,
            namespace,
            name,
        } => {
            let organization = OrganizationId::parse(&organization)
                .map_err(|e| anyhow::anyhow!("--organization: {}", e.reason))?;
            nubabel_contract::identity::validate_namespace(&namespace)
                .map_err(|e| anyhow::anyhow!("--namespace: {}", e.reason))?;
            let issued = api_tokens::issue(pool, &organization, &namespace, &name).await?;
            Ok(format!(
                "id: {}\norganization: {organization}\nnamespace: {namespace}\ntoken: {}\n",
                issued.id, issued.token
            ))
        }
        TokenCommand::List => {
            let mut out = String::from("ID\tORGANIZATION\tNAMESPACE\tNAME\tREVOKED\n");
            for token in api_tokens::list(pool).await? {
                out.push_str(&format!(
                    "{}\t{}\t{}\t{}\t{}\n",
                    token.id, token.organization_id, token.namespace, token.name, token.revoked
                ));
            }
            Ok(out)
        }
        TokenCommand::Revoke { id } => {
            if api_tokens::revoke(pool, id).await? {
                Ok(format!("revoked {id}\n"))
            } else {
                anyhow::bail!("no active token with id {id}")
            }
        }
    }
}
