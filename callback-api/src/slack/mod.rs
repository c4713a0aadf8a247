//! The Slack bot: a mention or a DM becomes a `DelegatedTask` whose progress and answer appear
//! in the Slack thread.
//!
//! * `/slack/events` (routes/slack.rs) verifies the request's signature, answers Slack's URL
//!   check, drops retried events (event ids in Postgres, so replicas agree), acknowledges at
//!   once and creates the task in the background: `sessionId` comes from the thread, so every
//!   reply in the thread continues the same conversation.
//! * The [`notifier`] of every replica watches the DelegatedTasks of the mapped namespaces that
//!   have `spec.notify.slack` (from Slack or from kubectl alike): it posts the acknowledgement,
//!   edits it with progress at most once per interval, and posts the final answer. Each of the
//!   three is claimed in Postgres, so several replicas post each exactly once.

pub mod client;
pub mod notifier;
pub mod signature;
pub mod text;

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, bail};
use nubabel_contract::identity::{OrganizationId, validate_namespace};
use secrecy::{ExposeSecret, SecretString};

pub use client::{SlackClient, SlackError};

/// The tenant a Slack workspace's messages work for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamTarget {
    /// The organization tasks are created for.
    pub organization_id: String,
    /// The namespace they are created in.
    pub namespace: String,
}

/// The Slack bot's settings, as configured; all of the token, the secret and the teams, or none.
#[derive(Debug, Clone)]
pub struct SlackSettings {
    /// Bot token (`xoxb-...`).
    pub bot_token: Option<SecretString>,
    /// Signing secret of `/slack/events` requests.
    pub signing_secret: Option<SecretString>,
    /// Base URL of the Slack Web API.
    pub api_url: String,
    /// Workspaces served, as `<team id>=<organization id>/<namespace>`.
    pub teams: Vec<String>,
    /// Least time between two progress edits of one message.
    pub progress_interval: Duration,
    /// How often stale final claims are looked for.
    pub final_sweep_interval: Duration,
}

/// The Slack bot's configuration and client.
pub struct SlackBot {
    /// Web API client with the bot token.
    pub client: SlackClient,
    signing_secret: SecretString,
    /// Workspaces served, by team id.
    pub teams: BTreeMap<String, TeamTarget>,
    /// Least time between two progress edits of one message.
    pub progress_interval: Duration,
    /// How often stale final claims are looked for.
    pub final_sweep_interval: Duration,
}

impl std::fmt::Debug for SlackBot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackBot")
            .field("teams", &self.teams)
            .finish_non_exhaustive()
    }
}

/// Parses `<team id>=<organization id>/<namespace>`.
pub fn parse_team(value: &str) -> anyhow::Result<(String, TeamTarget)> {
    let (team, target) = value.split_once('=').with_context(|| {
        format!("slack team `{value}` is not <team id>=<organization>/<namespace>")
    })?;
    let (organization, namespace) = target.rsplit_once('/').with_context(|| {
        format!("slack team `{value}` is not <team id>=<organization>/<namespace>")
    })?;
    let team = team.trim();
    if team.is_empty() || !team.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("slack team `{value}`: the team id must be letters and digits, e.g. T0123ABCD");
    }
    OrganizationId::parse(organization.trim()).with_context(|| format!("slack team `{value}`"))?;
    validate_namespace(namespace.trim()).with_context(|| format!("slack team `{value}`"))?;
    Ok((
        team.to_owned(),
        TeamTarget {
            organization_id: organization.trim().to_owned(),
            namespace: namespace.trim().to_owned(),
        },
    ))
}

impl SlackBot {
    /// The bot `settings` describe: `None` when no Slack setting is given, an error when only
    /// some are.
    pub fn from_settings(settings: &SlackSettings) -> anyhow::Result<Option<Self>> {
        let teams = settings
            .teams
            .iter()
            .filter(|t| !t.trim().is_empty())
            .map(|t| parse_team(t))
            .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
        match (&settings.bot_token, &settings.signing_secret) {
            (None, None) if teams.is_empty() => Ok(None),
            (Some(token), Some(secret)) if !teams.is_empty() => {
                if secret.expose_secret().is_empty() || token.expose_secret().is_empty() {
                    bail!("the Slack bot token and signing secret must not be empty");
                }
                let client = SlackClient::new(&settings.api_url, token.clone())
                    .context("building the Slack client")?;
                Ok(Some(Self {
                    client,
                    signing_secret: secret.clone(),
                    teams,
                    progress_interval: settings.progress_interval,
                    final_sweep_interval: settings.final_sweep_interval,
                }))
            }
            _ => bail!(
                "the Slack bot needs all of --slack-bot-token, --slack-signing-secret and --slack-teams (or none of them)"
            ),
        }
    }

    /// Verifies a request's signature headers against its raw body.
    pub fn verify(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), signature::SignatureError> {
        signature::verify(
            self.signing_secret.expose_secret().as_bytes(),
            timestamp,
            signature,
            body,
            now,
        )
    }

    /// The teams whose messages work for `organization_id` in `namespace`: the only
    /// workspaces whose channels that tenant's tasks may report to.
    pub fn teams_serving(&self, organization_id: &str, namespace: &str) -> Vec<String> {
        self.teams
            .iter()
            .filter(|(_, target)| {
                target.organization_id == organization_id && target.namespace == namespace
            })
            .map(|(team, _)| team.clone())
            .collect()
    }

    /// The namespaces of the mapped workspaces, each once.
    pub fn namespaces(&self) -> Vec<String> {
        let mut namespaces: Vec<String> =
            self.teams.values().map(|t| t.namespace.clone()).collect();
        namespaces.sort();
        namespaces.dedup();
        namespaces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn team_mappings_name_a_team_an_organization_and_a_namespace() {
        let (team, target) = parse_team("T0123=acme/tenants").unwrap();
        assert_eq!(team, "T0123");
        assert_eq!(target.organization_id, "acme");
        assert_eq!(target.namespace, "tenants");
        assert!(parse_team("T0123=acme").is_err());
        assert!(parse_team("T0123=acme/Not_A_Namespace").is_err());
        assert!(parse_team("=acme/tenants").is_err());
    }

    #[test]
    fn a_tenant_is_served_only_by_the_teams_mapped_to_its_organization_and_namespace() {
        let settings = SlackSettings {
            bot_token: Some("xoxb-1".into()),
            signing_secret: Some("secret".into()),
            api_url: "http://127.0.0.1:1/api".into(),
            teams: vec![
                "T1=acme/tenants".into(),
                "T2=acme/tenants".into(),
                "T3=globex/tenants".into(),
                "T4=acme/elsewhere".into(),
            ],
            progress_interval: Duration::from_secs(1),
            final_sweep_interval: Duration::from_secs(1),
        };
        let bot = SlackBot::from_settings(&settings).unwrap().unwrap();
        assert_eq!(bot.teams_serving("acme", "tenants"), ["T1", "T2"]);
        assert_eq!(bot.teams_serving("globex", "tenants"), ["T3"]);
        assert!(bot.teams_serving("globex", "elsewhere").is_empty());
    }
}
