//! Benchmark of the callback API (not a test): signed progress callbacks at increasing rates,
//! then SSE fan-out to 1,000 subscribers.
//!
//! Run with `cargo bench -p nubabel-callback-api --bench callbacks` (docs/callback-api-benchmark.md).
//! The API runs as its own process (the release binary) against a fresh database on the test
//! Postgres and the test Redis (NUBABEL_TEST_DATABASE_URL / NUBABEL_TEST_REDIS_URL, or private
//! servers). Load is open-loop: each request is due at a fixed time and its latency counts from
//! then, so a stall shows up in the tail instead of slowing the generator down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use futures::StreamExt;
use hdrhistogram::Histogram;
use nubabel_contract::{
    identity::SidecarIdentity,
    signing::{self, MasterKey, RequestTarget, derive_sidecar_key},
    stream_token::{self, StreamTokenKey},
};
use nubabel_store::sessions::{NewMapping, SessionMapping, SessionMappings};
use serde_json::json;
use tokio::{process::Command, sync::Mutex};

const MASTER_KEY: &str = "bench-master-key-0123456789abcdefghij";
const STREAM_KEY: &str = "bench-stream-key-0123456789abcdefghij";
const SESSIONS: usize = 100;
const SUBSCRIBERS_PER_SESSION: usize = 10;
const RUN: Duration = Duration::from_secs(10);
const WARM_UP: Duration = Duration::from_secs(2);

fn unix_micros() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

struct Target {
    pool: sqlx::PgPool,
    address: String,
    client: reqwest::Client,
    sidecar: SidecarIdentity,
    sessions: Vec<SessionMapping>,
    counter: AtomicU64,
}

impl Target {
    async fn post(&self, session: &SessionMapping) -> Result<reqwest::StatusCode> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::to_vec(&json!({"progress": {
            "type": "tool_execute_start", "tool": "bash", "sentAtMicros": unix_micros(), "n": n
        }}))?;
        let id = format!("bench-{n}-{}", uuid::Uuid::new_v4().simple());
        let ts = i64::try_from(unix_micros() / 1_000_000)?;
        let key = derive_sidecar_key(&MasterKey::new(MASTER_KEY.as_bytes())?, &self.sidecar);
        let path = format!(
            "/api/sidecar/sessions/{}/progress",
            session.opencode_session_id
        );
        let signature = signing::sign_request(&key, &id, ts, RequestTarget::post(&path), &body);
        let response = self
            .client
            .post(format!("{}{path}", self.address))
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .header(
                "x-nubabel-organization",
                self.sidecar.organization_id().as_str(),
            )
            .header(
                "x-nubabel-sidecar",
                format!("{}/{}", self.sidecar.namespace(), self.sidecar.name()),
            )
            .body(body)
            .send()
            .await?;
        Ok(response.status())
    }
}

struct RateResult {
    rate: u64,
    sent: u64,
    ok: u64,
    /// Failed requests by status (0: no answer).
    errors: std::collections::BTreeMap<u16, u64>,
    throughput: f64,
    latency: Histogram<u64>,
}

/// Sends `rate` callbacks per second for `RUN`, open loop, round-robin over the sessions.
async fn run_rate(target: &Arc<Target>, rate: u64) -> RateResult {
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(
        std::collections::BTreeMap::<u16, u64>::new(),
    ));
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let total = rate * RUN.as_secs();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(usize::try_from(total).unwrap());
    for i in 0..total {
        let due = start + interval * u32::try_from(i).unwrap();
        tokio::time::sleep_until(due.into()).await;
        let (target, latency, ok, errors) =
            (target.clone(), latency.clone(), ok.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let session = &target.sessions[usize::try_from(i).unwrap() % target.sessions.len()];
            match target.post(session).await {
                Ok(status) if status.is_success() => {
                    let micros = u64::try_from(due.elapsed().as_micros()).unwrap();
                    latency.lock().await.record(micros).unwrap();
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                failed => {
                    let status = failed.map_or(0, |status| status.as_u16());
                    *errors.lock().unwrap().entry(status).or_default() += 1;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let latency = Arc::try_unwrap(latency).unwrap().into_inner();
    RateResult {
        rate,
        sent: total,
        ok: ok.load(Ordering::Relaxed),
        errors: errors.lock().unwrap().clone(),
        throughput: ok.load(Ordering::Relaxed) as f64 / elapsed,
        latency,
    }
}

/// Opens `SUBSCRIBERS_PER_SESSION` streams per session; each records, per event, the time
/// from the callback being sent (`sentAtMicros`) and from the API accepting it (`receivedAt`).
async fn subscribe_all(
    target: &Arc<Target>,
    sent_to_receive: Arc<Mutex<Histogram<u64>>>,
    accepted_to_receive: Arc<Mutex<Histogram<u64>>>,
    recording: Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let key = StreamTokenKey::new(STREAM_KEY.as_bytes())?;
    let token = stream_token::issue(
        &key,
        target.sidecar.organization_id(),
        None,
        stream_token::Validity::starting_at(i64::try_from(unix_micros() / 1_000_000)?, 3000),
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let mut handles = Vec::new();
    for session in &target.sessions {
        for _ in 0..SUBSCRIBERS_PER_SESSION {
            let response = client
                .get(format!(
                    "{}/api/sidecar/sessions/{}/stream",
                    target.address, session.session_id
                ))
                .bearer_auth(&token)
                // Only live events: resume after the session's current last event.
                .header(
                    "last-event-id",
                    last_seq(&target.pool, session.session_pk)
                        .await?
                        .to_string(),
                )
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "stream refused: {}",
                response.status()
            );
            let (sent_h, acc_h, recording) = (
                sent_to_receive.clone(),
                accepted_to_receive.clone(),
                recording.clone(),
            );
            handles.push(tokio::spawn(async move {
                let mut body = response.bytes_stream();
                let mut buffer = String::new();
                while let Some(Ok(chunk)) = body.next().await {
                    let now = unix_micros();
                    buffer.push_str(&String::from_utf8_lossy(&chunk));
                    while let Some(end) = buffer.find("\n\n") {
                        let block: String = buffer.drain(..end + 2).collect();
                        let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: "))
                        else {
                            continue;
                        };
                        if !recording.load(Ordering::Relaxed) {
                            continue;
                        }
                        let Ok(value) = serde_json::from_str::<serde_json::Value>(data) else {
                            continue;
                        };
                        if let Some(sent) = value["data"]["sentAtMicros"].as_u64() {
                            sent_h
                                .lock()
                                .await
                                .record(now.saturating_sub(sent))
                                .unwrap();
                        }
                        if let Some(accepted) = value["receivedAt"]
                            .as_str()
                            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                        {
                            let accepted = u64::try_from(accepted.as_microsecond()).unwrap_or(0);
                            acc_h
                                .lock()
                                .await
                                .record(now.saturating_sub(accepted))
                                .unwrap();
                        }
                    }
                }
            }));
        }
    }
    Ok(handles)
}

async fn last_seq(pool: &sqlx::PgPool, session_pk: uuid::Uuid) -> Result<i64> {
    Ok(
        sqlx::query_scalar("select last_seq from sessions where id = $1")
            .bind(session_pk)
            .fetch_one(pool)
            .await?,
    )
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    drop(listener);
    let mut server = Command::new(env!("CARGO_BIN_EXE_nubabel-callback-api"))
        .env(
            "NUBABEL_CALLBACK_API_HTTP_ADDR",
            format!("127.0.0.1:{port}"),
        )
        .env("NUBABEL_DATABASE_URL", &database_url)
        .env("NUBABEL_DATABASE_MAX_CONNECTIONS", "16")
        .env("NUBABEL_REDIS_URL", &redis_url)
        .env("NUBABEL_SIGNING_MASTER_KEY", MASTER_KEY)
        .env("NUBABEL_STREAM_TOKEN_KEY", STREAM_KEY)
        .env("NUBABEL_STATUS_MIRROR", "false")
        .env("NUBABEL_DELEGATE_API", "false")
        // 1,000 subscribers of one tenant is the point of the fan-out run.
        .env("NUBABEL_SSE_TENANT_STREAMS", "2000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the API")?;
    let address = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    for _ in 0..100 {
        if client
            .get(format!("{address}/healthz"))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pool = sqlx::PgPool::connect(&database_url).await?;
    let sidecar = SidecarIdentity::new("bench-org", "bench", "fleet")?;
    let mappings = SessionMappings::new(pool.clone());
    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        let task = nubabel_store::sessions::TaskRef::new("bench", &format!("task-{i}"))?;
        sessions.push(
            mappings
                .record(&NewMapping {
                    sidecar: &sidecar,
                    session_id: &format!("session-{i}"),
                    opencode_session_id: &format!("ses_bench{i}"),
                    pod_name: "fleet-0",
                    task: Some(&task),
                })
                .await?,
        );
    }
    let target = Arc::new(Target {
        pool: pool.clone(),
        address,
        client,
        sidecar,
        sessions,
        counter: AtomicU64::new(0),
    });

    println!("warming up for {WARM_UP:?}");
    let warm = Instant::now();
    while warm.elapsed() < WARM_UP {
        let _ = run_rate_for(&target, 200, Duration::from_millis(500)).await;
    }

    println!(
        "\n## Signed progress callbacks, open loop, {}s per rate\n",
        RUN.as_secs()
    );
    println!(
        "| target rate/s | sent | ok | errors (count × status) | throughput/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | events per commit |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for rate in rates("BENCH_ACK_RATES", &[250, 500, 1000, 2000]) {
        let before = commits(&target).await?;
        let r = run_rate(&target, rate).await;
        let after = commits(&target).await?;
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.rate,
            r.sent,
            r.ok,
            if r.errors.is_empty() {
                "0".to_owned()
            } else {
                r.errors
                    .iter()
                    .map(|(status, n)| format!("{n} × {status}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            r.throughput,
            ms(&r.latency, 0.5),
            ms(&r.latency, 0.9),
            ms(&r.latency, 0.99),
            ms(&r.latency, 0.999),
            r.latency.max() as f64 / 1000.0,
            (after.0 - before.0) / (after.1 - before.1).max(1.0),
        );
    }

    let subscribers = SESSIONS * SUBSCRIBERS_PER_SESSION;
    println!(
        "\n## SSE fan-out: {subscribers} subscribers ({SUBSCRIBERS_PER_SESSION} on each of {SESSIONS} sessions)\n"
    );
    let sent_to_receive = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let accepted_to_receive = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let recording = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles = subscribe_all(
        &target,
        sent_to_receive.clone(),
        accepted_to_receive.clone(),
        recording.clone(),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "| callbacks/s | deliveries/s | ack p99 ms | accepted→SSE p50 ms | p99 ms | p99.9 ms | sent→SSE p50 ms | p99 ms | deliveries |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for rate in rates("BENCH_SSE_RATES", &[100, 500, 1000]) {
        sent_to_receive.lock().await.reset();
        accepted_to_receive.lock().await.reset();
        recording.store(true, Ordering::Relaxed);
        let r = run_rate(&target, rate).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        recording.store(false, Ordering::Relaxed);
        let sent = sent_to_receive.lock().await.clone();
        let accepted = accepted_to_receive.lock().await.clone();
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            rate,
            rate * u64::try_from(SUBSCRIBERS_PER_SESSION)?,
            ms(&r.latency, 0.99),
            ms(&accepted, 0.5),
            ms(&accepted, 0.99),
            ms(&accepted, 0.999),
            ms(&sent, 0.5),
            ms(&sent, 0.99),
            accepted.len(),
        );
    }
    for handle in handles {
        handle.abort();
    }
    server.kill().await?;
    Ok(())
}

/// Events committed and group commits so far, from the API's metrics.
async fn commits(target: &Target) -> Result<(f64, f64)> {
    let text = target
        .client
        .get(format!("{}/metrics", target.address))
        .send()
        .await?
        .text()
        .await?;
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("nubabel_callback_api_append_batch_size_sum"),
        value("nubabel_callback_api_append_batch_size_count"),
    ))
}

/// Rates from a comma-separated environment variable, or the defaults.
fn rates(variable: &str, defaults: &[u64]) -> Vec<u64> {
    std::env::var(variable)
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_else(|| defaults.to_vec())
}

async fn run_rate_for(target: &Arc<Target>, rate: u64, duration: Duration) -> u64 {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < duration {
        let session =
            target.sessions[usize::try_from(sent).unwrap() % target.sessions.len()].clone();
        let _ = target.post(&session).await;
        sent += 1;
        tokio::time::sleep(interval).await;
    }
    sent
}
