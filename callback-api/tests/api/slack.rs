//! `/slack/events` and the Slack notifier against the real API server, Postgres and a fake
//! Slack Web API. The task's status is written by the test (no operator runs here), so every
//! step of the thread is deterministic; e2e/tests/slack.rs runs the same flow on real OpenCode.

use std::time::Duration;

use anyhow::Result;
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use nubabel_crds::v1alpha1::DelegatedTask;
use nubabel_e2e::{
    TestEnv, TestNamespace,
    fake_slack::{FakeSlack, message_event, signed_headers},
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, now, spawn_app, spawn_app_configured, test_config, unique};

const BOT_TOKEN: &str = "xoxb-test-bot-token";
const SECRET: &str = "test-signing-secret";
const TEAM: &str = "T0TEST";
const WAIT: Duration = Duration::from_secs(20);

struct SlackSetup {
    namespace: TestNamespace,
    slack: FakeSlack,
    org: String,
}

async fn setup(prefix: &str) -> Result<SlackSetup> {
    let env = TestEnv::from_env().await?;
    nubabel_e2e::crds::install_crds(&env.client).await?;
    let namespace = TestNamespace::create(&env.client, prefix).await?;
    let slack = FakeSlack::start("127.0.0.1".parse()?, BOT_TOKEN).await?;
    Ok(SlackSetup {
        namespace,
        slack,
        org: unique("org"),
    })
}

fn configure(setup: &SlackSetup) -> impl FnOnce(&mut nubabel_callback_api::config::Config) {
    let api_url = setup.slack.api_url();
    let team = format!("{TEAM}={}/{}", setup.org, setup.namespace.name());
    move |config| {
        config.slack_bot_token = Some(BOT_TOKEN.into());
        config.slack_signing_secret = Some(SECRET.into());
        config.slack_api_url = api_url;
        config.slack_teams = vec![team];
        config.slack_progress_interval_ms = 1000;
    }
}

async fn post_event(
    app: &TestApp,
    body: &Value,
    timestamp: i64,
    retry: Option<u32>,
) -> Result<(StatusCode, String)> {
    let raw = serde_json::to_vec(body)?;
    let mut request = app.client.post(format!("{}/slack/events", app.address));
    for (name, value) in signed_headers(SECRET, timestamp, &raw) {
        request = request.header(name, value);
    }
    if let Some(retry) = retry {
        request = request
            .header("x-slack-retry-num", retry.to_string())
            .header("x-slack-retry-reason", "http_timeout");
    }
    let response = request.body(raw).send().await?;
    Ok((response.status(), response.text().await?))
}

/// Posts a mention (event `event_id`, message `ts`) to `app` and returns its task once the
/// acknowledgement is in the thread.
async fn mention_acknowledged(
    setup: &SlackSetup,
    app: &TestApp,
    event_id: &str,
    ts: &str,
) -> Result<DelegatedTask> {
    let event = message_event(event_id, TEAM, "C0CHAN", ts, None, "<@U0BOT> work");
    assert_eq!(
        post_event(app, &event, now(), None).await?.0,
        StatusCode::OK
    );
    let task = tasks_of(&setup.namespace.api(), 1).await?.remove(0);
    setup
        .slack
        .wait_for("the acknowledgement", WAIT, |calls| {
            calls.iter().any(|c| c.method == "chat.postMessage" && c.ok)
        })
        .await?;
    Ok(task)
}

async fn tasks_of(api: &Api<DelegatedTask>, wanted: usize) -> Result<Vec<DelegatedTask>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut items = api.list(&ListParams::default()).await?.items;
        if items.len() >= wanted || tokio::time::Instant::now() >= deadline {
            items.sort_by_key(|t| t.metadata.creation_timestamp.clone().map(|t| t.0));
            return Ok(items);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn without_slack_settings_the_route_says_so() -> Result<()> {
    let app = spawn_app().await?;
    let response = app
        .client
        .post(format!("{}/slack/events", app.address))
        .body("{}")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["code"], "not_configured");
    Ok(())
}

#[tokio::test]
async fn signatures_are_checked_before_anything_and_the_challenge_is_answered() -> Result<()> {
    let setup = setup("slack-sig").await?;
    let app = spawn_app_configured(configure(&setup)).await?;
    let challenge = json!({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"});
    let (status, body) = post_event(&app, &challenge, now(), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&body)?["challenge"],
        challenge["challenge"]
    );

    let raw = serde_json::to_vec(&challenge)?;
    let send = |headers: Vec<(&'static str, String)>, body: Vec<u8>| {
        let mut request = app.client.post(format!("{}/slack/events", app.address));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.body(body).send()
    };
    // Signed with another secret, stale, from the future (up to the ends of i64), tampered, or
    // unsigned: 401.
    let other = nubabel_e2e::fake_slack::signed_headers("another-secret", now(), &raw);
    let stale = signed_headers(SECRET, now() - 301, &raw);
    let future = signed_headers(SECRET, now() + 301, &raw);
    let tampered_body =
        serde_json::to_vec(&json!({"type": "url_verification", "challenge": "evil"}))?;
    let fresh = signed_headers(SECRET, now(), &raw);
    let earliest = signed_headers(SECRET, i64::MIN, &raw);
    let latest = signed_headers(SECRET, i64::MAX, &raw);
    let unsigned = vec![("content-type", "application/json".to_owned())];
    for (what, headers, body) in [
        ("another secret", other, raw.clone()),
        ("stale", stale, raw.clone()),
        ("future", future, raw.clone()),
        ("the earliest i64 timestamp", earliest, raw.clone()),
        ("the latest i64 timestamp", latest, raw.clone()),
        ("tampered", fresh, tampered_body),
        ("unsigned", unsigned, raw.clone()),
    ] {
        let response = send(headers, body).await?;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        let text = response.text().await?;
        assert!(
            !text.contains("evil") && !text.contains("3eZbrw"),
            "{what}: {text}"
        );
    }
    setup.namespace.delete().await
}

#[tokio::test]
async fn a_retried_mention_creates_one_task_even_on_another_replica() -> Result<()> {
    let setup = setup("slack-retry").await?;
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let mut config = test_config(&database_url, &redis_url);
    configure(&setup)(&mut config);
    let first = spawn_app_configured(|c| *c = config.clone()).await?;
    let mut second_config = config.clone();
    second_config.http_addr = "127.0.0.1:0".parse()?;
    let second = spawn_app_configured(|c| *c = second_config).await?;

    let event = message_event(
        "Ev0001",
        TEAM,
        "C0CHAN",
        "1700000000.000100",
        None,
        "<@U0BOT> TOOLCALL please",
    );
    assert_eq!(
        post_event(&first, &event, now(), None).await?.0,
        StatusCode::OK
    );
    assert_eq!(
        post_event(&first, &event, now(), Some(1)).await?.0,
        StatusCode::OK
    );
    assert_eq!(
        post_event(&second, &event, now(), Some(2)).await?.0,
        StatusCode::OK
    );
    // A bot's own message and an unmapped workspace create nothing.
    let mut from_bot = message_event(
        "Ev0002",
        TEAM,
        "C0CHAN",
        "1700000001.000100",
        None,
        "<@U0BOT> hi",
    );
    from_bot["event"]["bot_id"] = json!("B0BOT");
    assert_eq!(
        post_event(&first, &from_bot, now(), None).await?.0,
        StatusCode::OK
    );
    let elsewhere = message_event(
        "Ev0003",
        "T0OTHER",
        "C0CHAN",
        "1700000002.000100",
        None,
        "<@U0BOT> hi",
    );
    assert_eq!(
        post_event(&first, &elsewhere, now(), None).await?.0,
        StatusCode::OK
    );

    let api = setup.namespace.api::<DelegatedTask>();
    let tasks = tasks_of(&api, 1).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(api.list(&ListParams::default()).await?.items.len(), 1);
    let task = &tasks[0];
    assert_eq!(task.spec.organization_id, setup.org);
    assert_eq!(task.spec.prompt, "TOOLCALL please");
    assert_eq!(
        task.spec.session_id.as_deref(),
        Some("slack:T0TEST:C0CHAN:1700000000.000100")
    );
    let target = task.spec.notify.clone().unwrap().slack.unwrap();
    assert_eq!(
        (target.channel.as_str(), target.thread_ts.as_deref()),
        ("C0CHAN", Some("1700000000.000100"))
    );
    assert_eq!(task.labels()["nubabel.io/created-by"], "slack");

    // Both replicas watch the task; exactly one acknowledgement appears, in the thread.
    let calls = setup
        .slack
        .wait_for("the acknowledgement", WAIT, |calls| {
            calls.iter().any(|c| c.method == "chat.postMessage")
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let posts = setup.slack.calls_to("chat.postMessage");
    assert_eq!(posts.len(), 1, "{calls:#?}");
    assert!(posts[0].authorized);
    assert_eq!(posts[0].body["thread_ts"], "1700000000.000100");
    assert!(posts[0].text().contains(&task.name_any()));

    // A reply in the thread continues the thread's session.
    let reply = message_event(
        "Ev0004",
        TEAM,
        "C0CHAN",
        "1700000005.000100",
        Some("1700000000.000100"),
        "<@U0BOT> and then?",
    );
    assert_eq!(
        post_event(&second, &reply, now(), None).await?.0,
        StatusCode::OK
    );
    let tasks = tasks_of(&api, 2).await?;
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[1].spec.session_id, tasks[0].spec.session_id);
    drop((first, second));
    setup.namespace.delete().await
}

#[tokio::test]
async fn the_thread_shows_progress_at_a_bounded_rate_and_exactly_one_answer() -> Result<()> {
    let setup = setup("slack-flow").await?;
    let database_url = nubabel_e2e::fresh_database().await?;
    let redis_url = nubabel_e2e::test_redis_url().await?;
    let mut config = test_config(&database_url, &redis_url);
    configure(&setup)(&mut config);
    // Two replicas on one database, both watching the namespace.
    let first = spawn_app_configured(|c| *c = config.clone()).await?;
    let _second = spawn_app_configured(|c| *c = config.clone()).await?;
    // Slack rate-limits the first acknowledgement: it is posted after Retry-After.
    setup.slack.rate_limit_next("chat.postMessage", 1);

    let event = message_event(
        "Ev1001",
        TEAM,
        "C0CHAN",
        "1700000100.000100",
        None,
        "<@U0BOT> work hard",
    );
    assert_eq!(
        post_event(&first, &event, now(), None).await?.0,
        StatusCode::OK
    );
    let api = setup.namespace.api::<DelegatedTask>();
    let task = tasks_of(&api, 1).await?.remove(0);
    let name = task.name_any();
    setup
        .slack
        .wait_for("the acknowledgement after the 429", WAIT, |calls| {
            calls
                .iter()
                .any(|c| c.method == "chat.postMessage" && c.status == 200)
        })
        .await?;
    let ack_ts = {
        let posts = setup.slack.calls_to("chat.postMessage");
        assert_eq!(posts.iter().filter(|c| c.status == 429).count(), 1);
        assert_eq!(posts.iter().filter(|c| c.status == 200).count(), 1);
        // The fake numbers messages from 1700000001.
        "1700000001.000100".to_owned()
    };

    // The agent runs tools; the status changes faster than the edit interval.
    let status = |value: Value| {
        let api = api.clone();
        let name = name.clone();
        async move {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": value})),
            )
            .await
        }
    };
    for started in 1..=6 {
        status(json!({"phase": "Running", "progress": {"events": started * 2, "toolsStarted": started, "toolsCompleted": started - 1, "lastTool": "bash"}})).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    status(json!({"progress": {"events": 13, "toolsStarted": 6, "toolsCompleted": 6, "lastTool": "bash"}})).await?;
    let edits = setup
        .slack
        .wait_for("the newest progress in an edit", WAIT, |calls| {
            calls
                .iter()
                .any(|c| c.method == "chat.update" && c.text().contains("6 started, 6 finished"))
        })
        .await?;
    let edits: Vec<_> = edits.iter().filter(|c| c.method == "chat.update").collect();
    assert!(
        edits
            .iter()
            .all(|c| c.body["ts"] == ack_ts.as_str() && c.authorized)
    );
    // About 1.2 s of changes at one edit per second: at most three edits, not seven.
    assert!(edits.len() <= 3, "{edits:#?}");

    status(json!({"phase": "Succeeded", "output": "The answer is 42."})).await?;
    setup
        .slack
        .wait_for("the answer", WAIT, |calls| {
            calls
                .iter()
                .any(|c| c.method == "chat.postMessage" && c.text() == "The answer is 42.")
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answers: Vec<_> = setup
        .slack
        .calls_to("chat.postMessage")
        .into_iter()
        .filter(|c| c.text() == "The answer is 42.")
        .collect();
    assert_eq!(answers.len(), 1, "{answers:#?}");
    assert_eq!(answers[0].body["thread_ts"], "1700000100.000100");
    setup
        .slack
        .wait_for("the acknowledgement to say done", WAIT, |calls| {
            calls
                .iter()
                .any(|c| c.method == "chat.update" && c.text().contains("Done"))
        })
        .await?;
    setup.namespace.delete().await
}

#[tokio::test]
async fn a_long_answer_takes_several_messages_and_a_failed_one_is_posted_again_alone() -> Result<()>
{
    let setup = setup("slack-parts").await?;
    let app = spawn_app_configured(configure(&setup)).await?;
    let task = mention_acknowledged(&setup, &app, "Ev3001", "1700000300.000100").await?;
    let api = setup.namespace.api::<DelegatedTask>();
    let name = task.name_any();

    // Three messages' worth of answer; Slack fails the second one once.
    let output = (1..=100)
        .map(|line| format!("line {line:03}: {}", "x".repeat(80)))
        .collect::<Vec<_>>()
        .join("\n");
    let parts = nubabel_callback_api::slack::text::split(
        &output,
        nubabel_callback_api::slack::text::MAX_MESSAGE_CHARS,
    );
    assert_eq!(parts.len(), 3);
    setup
        .slack
        .fail_call("chat.postMessage", 1, "internal_error");
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded", "output": output}})),
    )
    .await?;

    setup
        .slack
        .wait_for("every part of the answer", WAIT, |calls| {
            parts.iter().all(|part| {
                calls
                    .iter()
                    .any(|c| c.method == "chat.postMessage" && c.ok && c.text() == part)
            })
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let posts = setup.slack.calls_to("chat.postMessage");
    let answers: Vec<_> = posts
        .iter()
        .filter(|c| parts.contains(&c.text().to_owned()))
        .collect();
    // Part one once, part two refused then posted, part three once: nothing repeated.
    let sequence: Vec<_> = answers
        .iter()
        .map(|c| {
            let index = parts
                .iter()
                .position(|p| p == c.text())
                .unwrap_or(usize::MAX);
            (index + 1, c.ok)
        })
        .collect();
    assert_eq!(sequence, [(1, true), (2, false), (2, true), (3, true)]);
    assert!(
        answers
            .iter()
            .all(|c| c.body["thread_ts"] == "1700000300.000100")
    );
    setup
        .slack
        .wait_for("the acknowledgement to say done", WAIT, |calls| {
            calls
                .iter()
                .any(|c| c.method == "chat.update" && c.text().contains("Done"))
        })
        .await?;
    setup.namespace.delete().await
}

#[tokio::test]
async fn an_answer_claimed_by_a_replica_that_stopped_is_posted_by_another() -> Result<()> {
    let setup = setup("slack-stale").await?;
    let configure = configure(&setup);
    let app = spawn_app_configured(|config| {
        configure(config);
        config.slack_final_sweep_seconds = 1;
    })
    .await?;
    let task = mention_acknowledged(&setup, &app, "Ev4001", "1700000400.000100").await?;
    let api = setup.namespace.api::<DelegatedTask>();
    let uid: uuid::Uuid = task.uid().unwrap_or_default().parse()?;

    // Another replica claims the answer, then stops before posting it.
    sqlx::query("update slack_threads set final_claimed_at = now() where task_uid = $1")
        .bind(uid)
        .execute(&app.db)
        .await?;
    api.patch_status(
        &task.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded", "output": "The answer is 7."}})),
    )
    .await?;
    let answered = |calls: &[nubabel_e2e::fake_slack::SlackCall]| {
        calls
            .iter()
            .filter(|c| c.method == "chat.postMessage" && c.ok && c.text() == "The answer is 7.")
            .count()
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        answered(&setup.slack.calls()),
        0,
        "a fresh claim is respected"
    );

    // The claim grows stale; the task does not change again, yet the answer comes.
    sqlx::query(
        "update slack_threads set final_claimed_at = now() - interval '6 minutes'
         where task_uid = $1",
    )
    .bind(uid)
    .execute(&app.db)
    .await?;
    setup
        .slack
        .wait_for("the answer", WAIT, |calls| answered(calls) > 0)
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(answered(&setup.slack.calls()), 1);
    setup.namespace.delete().await
}

/// A task applied with kubectl in `namespace` for `org`, reporting to `channel`.
async fn apply_task(
    namespace: &TestNamespace,
    name: &str,
    org: &str,
    channel: &str,
) -> Result<DelegatedTask> {
    let task: DelegatedTask = serde_json::from_value(json!({
        "apiVersion": "nubabel.io/v1alpha1",
        "kind": "DelegatedTask",
        "metadata": {"name": name},
        "spec": {
            "organizationId": org,
            "prompt": "report here",
            "notify": {"slack": {"channel": channel}},
        },
    }))?;
    Ok(namespace
        .api::<DelegatedTask>()
        .create(&Default::default(), &task)
        .await?)
}

/// The reasons of the Warning events on task `name` in `namespace`.
async fn warnings_on(namespace: &TestNamespace, name: &str) -> Result<Vec<String>> {
    let events = namespace
        .api::<k8s_openapi::api::events::v1::Event>()
        .list(&ListParams::default())
        .await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .filter_map(|e| e.reason)
        .collect())
}

#[tokio::test]
async fn a_task_naming_a_channel_its_tenant_was_never_seen_in_posts_nothing_and_says_why()
-> Result<()> {
    // Two tenants, each with its own workspace and namespace, served by one bot.
    let ours = setup("slack-ours").await?;
    let env = TestEnv::from_env().await?;
    let theirs = TestNamespace::create(&env.client, "slack-theirs").await?;
    let their_org = unique("org");
    let teams = vec![
        format!("{TEAM}={}/{}", ours.org, ours.namespace.name()),
        format!("T0THEIRS={their_org}/{}", theirs.name()),
    ];
    let configure = configure(&ours);
    let app = spawn_app_configured(|config| {
        configure(config);
        config.slack_teams = teams;
    })
    .await?;

    // Each workspace mentions the bot in its own channel.
    let our_mention = message_event("Ev5001", TEAM, "C0OURS", "1700000500.000100", None, "hi");
    let their_mention = message_event(
        "Ev5002",
        "T0THEIRS",
        "C0THEIRS",
        "1700000501.000100",
        None,
        "hi",
    );
    for mention in [&our_mention, &their_mention] {
        assert_eq!(
            post_event(&app, mention, now(), None).await?.0,
            StatusCode::OK
        );
    }
    acknowledgements_posted(&ours.slack, 2).await?;

    // A task of ours names their channel, and another one a channel nobody mentioned the bot
    // in: neither gets a message; each gets a Warning event, and the refusals are counted.
    apply_task(&ours.namespace, "into-theirs", &ours.org, "C0THEIRS").await?;
    apply_task(&ours.namespace, "into-nowhere", &ours.org, "C0NOWHERE").await?;
    // A task in our namespace claiming their organization is not served by our workspace.
    apply_task(&ours.namespace, "as-them", &their_org, "C0OURS").await?;
    // A task of ours applied with kubectl to our channel is acknowledged as usual.
    apply_task(&ours.namespace, "into-ours", &ours.org, "C0OURS").await?;
    ours.slack
        .wait_for("the acknowledgement in our channel", WAIT, |calls| {
            calls.iter().any(|c| {
                c.method == "chat.postMessage"
                    && c.body["channel"] == "C0OURS"
                    && c.text().contains("into-ours")
            })
        })
        .await?;
    // One watch serves the namespace in order, so the others were handled before this one.
    let posts = ours.slack.calls_to("chat.postMessage");
    for name in ["into-theirs", "into-nowhere", "as-them"] {
        assert!(
            posts.iter().all(|c| !c.text().contains(name)),
            "{name}: {posts:#?}"
        );
    }
    assert!(
        posts
            .iter()
            .filter(|c| c.body["channel"] == "C0THEIRS")
            .all(|c| c.body["thread_ts"] == "1700000501.000100"),
        "only their own thread's acknowledgement reaches their channel: {posts:#?}"
    );
    app.wait_for_metric(
        "nubabel_callback_api_slack_channels_refused_total",
        3.0,
        WAIT,
    )
    .await?;
    for name in ["into-theirs", "into-nowhere", "as-them"] {
        let deadline = tokio::time::Instant::now() + WAIT;
        while warnings_on(&ours.namespace, name).await?.is_empty()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            warnings_on(&ours.namespace, name).await?,
            ["SlackChannelNotSeen"],
            "{name}"
        );
    }
    drop(app);
    theirs.delete().await?;
    ours.namespace.delete().await
}

/// Waits for `count` acknowledgements posted successfully.
async fn acknowledgements_posted(slack: &FakeSlack, count: usize) -> Result<()> {
    slack
        .wait_for("the acknowledgements", WAIT, |calls| {
            calls
                .iter()
                .filter(|c| c.method == "chat.postMessage" && c.ok)
                .count()
                >= count
        })
        .await
        .map(|_| ())
}
