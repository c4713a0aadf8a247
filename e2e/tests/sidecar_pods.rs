//! Sidecar fleets running for real: the operator renders the StatefulSet, the real
//! controller-manager creates the pods, the node shim runs them (the `prepare-data` init
//! container, the real `opencode` binary and the bridge), and a prompt travels
//! opencode → bridge → signed callbacks → Postgres and Redis → the callback API's SSE stream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use nubabel_contract::identity::SidecarIdentity;
use nubabel_crds::v1alpha1::OpencodeSidecar;
use nubabel_e2e::fake_llm::TOOL_OUTPUT;
use nubabel_e2e::node_shim::await_pod_ready;
use nubabel_e2e::system::System;
use nubabel_e2e::{TestEnv, TestNamespace, await_condition, create, within};
use nubabel_opencode::{ClientConfig, OpencodeClient, PromptRequest};
use nubabel_store::sessions::{NewMapping, SessionMappings};
use serde_json::Value;

/// Hard limit of each test, fixture included.
const TEST_LIMIT: Duration = Duration::from_secs(300);
/// A fresh OpenCode pod answers in 5 to 8 s alone; tests running side by side on two cores
/// slow each other down.
const POD_READY: Duration = Duration::from_secs(150);

/// Runs `body` against a fresh system in a namespace of its own; on failure the error carries
/// the operator's and the pods' logs.
async fn with_system<F>(prefix: &str, body: F) -> Result<()>
where
    F: AsyncFnOnce(&System, &TestNamespace) -> Result<()>,
{
    let env = TestEnv::from_env().await?;
    let namespace = TestNamespace::create(&env.client, prefix).await?;
    let outcome = within(TEST_LIMIT, prefix, async {
        let system = System::start(&env, &namespace).await?;
        let outcome = body(&system, &namespace).await;
        let diagnostics = system.diagnostics();
        system.shutdown().await?;
        outcome.with_context(|| format!("system logs:\n{diagnostics}"))
    })
    .await;
    namespace.delete().await?;
    outcome
}

fn ready_condition(sidecar: &OpencodeSidecar) -> Option<&str> {
    sidecar
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str())
}

/// Waits until the sidecar reports `replicas` ready pods, each with an IP, and Ready=True.
async fn await_fleet_ready(
    api: &Api<OpencodeSidecar>,
    name: &str,
    replicas: i32,
) -> Result<OpencodeSidecar> {
    let wanted = usize::try_from(replicas)?;
    await_condition(
        api,
        name,
        "every pod ready with an IP, and Ready=True",
        move |s: Option<&OpencodeSidecar>| {
            s.is_some_and(|s| {
                let Some(status) = s.status.as_ref() else {
                    return false;
                };
                status.ready_replicas == replicas
                    && status.pods.len() == wanted
                    && status
                        .pods
                        .iter()
                        .all(|p| p.ready && p.ip.as_deref().is_some_and(|ip| !ip.is_empty()))
                    && ready_condition(s) == Some("True")
            })
        },
        POD_READY,
    )
    .await?
    .context("the sidecar disappeared")
}

fn pod_ip(pod: &Pod) -> Result<String> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("the pod has no IP")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_fleet_runs_real_opencode_and_bridge_pods_that_become_ready() -> Result<()> {
    with_system("ocs-pods", async |system, namespace| {
        let sidecars = namespace.api::<OpencodeSidecar>();
        system.bind_organization("org-pods").await?;
        create(&sidecars, &system.sidecar_manifest("fleet", "org-pods", 2)?).await?;

        let pods = namespace.api::<Pod>();
        let mut ips = Vec::new();
        for name in ["fleet-0", "fleet-1"] {
            let pod = await_pod_ready(&pods, name, POD_READY).await?;
            let status = pod.status.as_ref().context("no pod status")?;
            assert_eq!(status.phase.as_deref(), Some("Running"));
            // The init container ran to completion before the app containers started.
            let init = status
                .init_container_statuses
                .as_deref()
                .unwrap_or_default();
            assert_eq!(init.len(), 1, "{init:?}");
            assert_eq!(init[0].name, "prepare-data");
            let terminated = init[0].state.as_ref().and_then(|s| s.terminated.as_ref());
            assert_eq!(terminated.map(|t| t.exit_code), Some(0), "{init:?}");
            let containers = status.container_statuses.as_deref().unwrap_or_default();
            assert!(
                containers.iter().all(|c| c.ready),
                "every container ready: {containers:?}"
            );
            ips.push(pod_ip(&pod)?);
        }
        assert_ne!(ips[0], ips[1], "each pod has an address of its own");

        let sidecar = await_fleet_ready(&sidecars, "fleet", 2).await?;
        let status = sidecar.status.as_ref().context("no status")?;
        assert_eq!(status.replicas, 2);
        let mut reported: Vec<(String, String)> = status
            .pods
            .iter()
            .map(|p| (p.name.clone(), p.ip.clone().unwrap_or_default()))
            .collect();
        reported.sort();
        assert_eq!(
            reported,
            vec![
                ("fleet-0".to_owned(), ips[0].clone()),
                ("fleet-1".to_owned(), ips[1].clone())
            ]
        );

        // OpenCode itself answers on the pod's address, behind its password.
        let password = system.opencode_password("fleet").await?;
        for ip in &ips {
            let client = OpencodeClient::new(
                ClientConfig::new(format!("http://{ip}:4096")).with_password(password.clone()),
            )?;
            assert!(client.health().await?.healthy);
            let anonymous = OpencodeClient::new(ClientConfig::new(format!("http://{ip}:4096")))?;
            assert!(
                anonymous.health().await.is_err(),
                "OpenCode refuses requests without the password"
            );
        }
        Ok(())
    })
    .await
}

/// One frame of the callback API's SSE stream: `event:` and the JSON of its `data:` line.
#[derive(Debug)]
struct StreamEvent {
    id: u64,
    event: String,
    data: Value,
}

/// Reads the session's SSE stream until an event of `until` arrives, returning every event.
async fn read_stream_until(
    url: &str,
    token: &str,
    until: impl Fn(&StreamEvent) -> bool,
) -> Result<Vec<StreamEvent>> {
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .header("accept", "text/event-stream")
        .send()
        .await?;
    ensure!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(
        content_type.starts_with("text/event-stream"),
        "content-type {content_type}"
    );
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let mut event = StreamEvent {
                id: 0,
                event: String::new(),
                data: Value::Null,
            };
            let mut has_data = false;
            for line in frame.lines() {
                if let Some(id) = line.strip_prefix("id:") {
                    event.id = id.trim().parse()?;
                } else if let Some(name) = line.strip_prefix("event:") {
                    name.trim().clone_into(&mut event.event);
                } else if let Some(data) = line.strip_prefix("data:") {
                    event.data = serde_json::from_str(data.trim())?;
                    has_data = true;
                }
            }
            if !has_data {
                continue; // retry hint or keep-alive comment
            }
            let done = until(&event);
            events.push(event);
            if done {
                return Ok(events);
            }
        }
    }
    anyhow::bail!("the stream ended before the awaited event; got {events:?}")
}

fn event_type(event: &StreamEvent) -> &str {
    event.data["type"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_in_a_sidecar_pod_reaches_the_callback_api_and_its_sse_stream() -> Result<()> {
    with_system("ocs-prompt", async |system, namespace| {
        let organization = "org-prompt";
        let sidecars = namespace.api::<OpencodeSidecar>();
        system.bind_organization(organization).await?;
        create(
            &sidecars,
            &system.sidecar_manifest("fleet", organization, 1)?,
        )
        .await?;
        let pods = namespace.api::<Pod>();
        let pod = await_pod_ready(&pods, "fleet-0", POD_READY).await?;
        let ip = pod_ip(&pod)?;

        // What the operator does for a task: create the OpenCode session on a ready pod and
        // record the mapping before the prompt goes out.
        let password = system.opencode_password("fleet").await?;
        let opencode = OpencodeClient::new(
            ClientConfig::new(format!("http://{ip}:4096")).with_password(password),
        )?;
        let session = opencode.create_session(Some("e2e tool call")).await?;
        let sidecar = SidecarIdentity::new(organization, namespace.name(), "fleet")?;
        let nubabel_session = "nubabel-session-1";
        let mapping = SessionMappings::new(system.db().clone())
            .record(&NewMapping {
                sidecar: &sidecar,
                session_id: nubabel_session,
                opencode_session_id: &session.id,
                pod_name: &pod.name_any(),
                task: None,
            })
            .await?;

        // A reader follows the session from its first event, while the prompt runs.
        let url = format!(
            "{}/api/sidecar/sessions/{nubabel_session}/stream",
            system.callback_url()
        );
        let token = system.stream_token(organization, Some(nubabel_session))?;
        let reader = tokio::spawn(async move {
            read_stream_until(&url, &token, |e| event_type(e) == "session_idle").await
        });

        opencode
            .prompt_async(&session.id, &PromptRequest::text("run it: TOOLCALL"))
            .await?;
        let streamed = reader.await??;

        // The stream delivered the turn in order: busy, the tool starting and ending with its
        // output, then idle and the end of the turn, numbered 1, 2, 3, ...
        let seen: Vec<(String, String)> = streamed
            .iter()
            .map(|e| (e.event.clone(), event_type(e).to_owned()))
            .collect();
        let position = |event: &str, type_: &str| {
            seen.iter()
                .position(|(e, t)| e == event && t == type_)
                .with_context(|| format!("no {event} {type_} in {seen:?}"))
        };
        let busy = position("state", "busy")?;
        let start = position("progress", "tool_execute_start")?;
        let end = position("progress", "tool_execute_end")?;
        let idle = position("state", "idle")?;
        let turn_end = position("progress", "session_idle")?;
        assert!(
            busy < start && start < end && end < idle && idle < turn_end,
            "order: {seen:?}"
        );
        assert!(
            streamed[end].data.to_string().contains(TOOL_OUTPUT),
            "the tool's output travels with its end: {:?}",
            streamed[end].data
        );
        let ids: Vec<u64> = streamed.iter().map(|e| e.id).collect();
        let expected: Vec<u64> = (1..=u64::try_from(ids.len())?).collect();
        assert_eq!(ids, expected, "sequence numbers without gaps");

        // The callback API committed exactly those events to Postgres before streaming them.
        let committed: Vec<(i64, String, String)> = sqlx::query_as(
            "select seq, kind, event_type from session_events
             where session_pk = $1 order by seq",
        )
        .bind(mapping.session_pk)
        .fetch_all(system.db())
        .await?;
        let committed_prefix: Vec<(String, String)> = committed
            .iter()
            .take(seen.len())
            .map(|(_, kind, type_)| (kind.clone(), type_.clone()))
            .collect();
        assert_eq!(committed_prefix, seen);
        let state: (Option<String>, i64, i64) = sqlx::query_as(
            "select state, tools_started, tools_completed from sessions where id = $1",
        )
        .bind(mapping.session_pk)
        .fetch_one(system.db())
        .await?;
        assert_eq!(state, (Some("idle".to_owned()), 1, 1));

        // And OpenCode really ran the tool against the fake LLM.
        assert!(
            !system
                .fake_llm()
                .requests_containing(TOOL_OUTPUT)
                .is_empty(),
            "the tool result went back to the LLM"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_sidecar_pod_is_recreated_and_becomes_ready_again() -> Result<()> {
    with_system("ocs-restart", async |system, namespace| {
        let sidecars = namespace.api::<OpencodeSidecar>();
        system.bind_organization("org-restart").await?;
        create(
            &sidecars,
            &system.sidecar_manifest("fleet", "org-restart", 1)?,
        )
        .await?;
        let pods = namespace.api::<Pod>();
        let first = await_pod_ready(&pods, "fleet-0", POD_READY).await?;
        await_fleet_ready(&sidecars, "fleet", 1).await?;
        let first_uid = first.uid().context("no uid")?;
        let first_ip = pod_ip(&first)?;

        pods.delete("fleet-0", &kube::api::DeleteParams::default())
            .await?;
        // The StatefulSet controller recreates the pod under the same name; the shim runs it.
        let second = await_condition(
            &pods,
            "fleet-0",
            "the recreated pod to be Ready",
            |p: Option<&Pod>| {
                p.is_some_and(|p| {
                    p.uid().as_deref() != Some(first_uid.as_str())
                        && p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                })
            },
            POD_READY,
        )
        .await?
        .context("the pod disappeared")?;
        let second_ip = pod_ip(&second)?;
        let sidecar = await_condition(
            &sidecars,
            "fleet",
            "the fleet to report the new pod ready",
            move |s: Option<&OpencodeSidecar>| {
                s.and_then(|s| s.status.as_ref()).is_some_and(|st| {
                    st.ready_replicas == 1
                        && st.pods.len() == 1
                        && st.pods[0].ready
                        && st.pods[0].ip.as_deref() == Some(second_ip.as_str())
                })
            },
            POD_READY,
        )
        .await?
        .context("the sidecar disappeared")?;
        assert_eq!(ready_condition(&sidecar), Some("True"));
        assert_ne!(
            pod_ip(&second)?,
            first_ip,
            "the new pod got an address of its own"
        );

        // The old processes are gone: nothing answers on the old address.
        let old = OpencodeClient::new(ClientConfig::new(format!("http://{first_ip}:4096")))?;
        assert!(old.health().await.is_err());
        Ok(())
    })
    .await
}
