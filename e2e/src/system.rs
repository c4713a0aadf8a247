//! The whole system for one test namespace, on the local control plane: what sidecar fleets
//! need to run for real.
//!
//! [`System::start`] brings up, for one namespace:
//!
//! * the scripted fake LLM and the callback API (in process, on a fresh database and the test
//!   Redis), both listening on [`HOST_IP`], the address pods reach host services on;
//! * a [`NodeShim`] whose image map runs the sidecar image as the real `opencode` binary and
//!   the bridge image as the workspace's `nubabel-bridge`;
//! * the operator binary, with its own ServiceAccount and the RBAC of `operator/rbac.yaml`,
//!   watching only that namespace, with the callback API's URL, the shared signing master key
//!   and those images.
//!
//! [`System::sidecar_manifest`] then gives an `OpencodeSidecar` whose pods land on the shim
//! and talk to the fake LLM, so a test applies it and drives real pods: OpenCode answers
//! prompts, the bridge turns its events into signed callbacks, the callback API commits them
//! and streams them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser as _;
use futures::StreamExt as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use nubabel_contract::identity::OrganizationId;
use nubabel_contract::stream_token::{self, StreamTokenKey};
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar};
use nubabel_opencode::OpencodeClient;
use nubabel_operator::controller::fleet;
use serde_json::{Value, json};
use sqlx::PgPool;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::control_plane::write_kubeconfig;
use crate::fake_llm::FakeLlm;
use crate::node_shim::{HOST_IP, ImageMap, NodeShim, ShimOptions};
use crate::opencode_server::{FAKE_MODEL, opencode_bin};
use crate::pki::random_token;
use crate::process::{ProcessSpec, SupervisedProcess};
use crate::testing::{TestEnv, TestNamespace, create, delete, kubectl};

/// The image the operator gives sidecar pods; the shim runs it as the `opencode` binary (and
/// its `mkdir` init container from the host).
pub const SIDECAR_IMAGE: &str = "e2e.local/opencode:1.18.33";
/// The bridge image; the shim runs it as `target/debug/nubabel-bridge`.
pub const BRIDGE_IMAGE: &str = "e2e.local/nubabel-bridge:dev";
/// The provider id the fake LLM is configured under.
pub const FAKE_PROVIDER: &str = "fake";
/// Names a prebuilt bridge binary instead of the workspace's debug build.
pub const BRIDGE_BIN_ENV: &str = "NUBABEL_BRIDGE_BIN";
/// Names a prebuilt operator binary instead of the workspace's debug build.
pub const OPERATOR_BIN_ENV: &str = "NUBABEL_OPERATOR_BIN";
/// The operator's ServiceAccount in the test namespace.
const OPERATOR_ACCOUNT: &str = "nubabel-operator";
/// Lines of the operator's log [`System::operator_log_tail`] returns by default.
const LOG_LINES: usize = 60;

/// The workspace's root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary of the workspace's debug build (`$CARGO_TARGET_DIR/debug` or `target/debug`), or
/// the one `override_env` names. Tests run after `cargo build --workspace`, so a missing one
/// is an error that says so.
pub fn workspace_binary(name: &str, override_env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(override_env).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let path = target.join("debug").join(name);
    ensure!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` before the e2e tests (or set {override_env})",
        path.display()
    );
    Ok(path)
}

/// The image map of sidecar pods: the sidecar image runs the real `opencode` binary, the
/// bridge image the workspace's `nubabel-bridge`.
pub fn sidecar_images() -> Result<ImageMap> {
    Ok(ImageMap::new()
        .with(
            "nubabel-bridge",
            workspace_binary("nubabel-bridge", BRIDGE_BIN_ENV)?,
        )
        .with("opencode", opencode_bin()?))
}

/// An `OpencodeSidecar` `namespace/name` for tenant `organization_id` with `replicas` pods
/// placed by `node_selector`, its provider pointed at `fake_llm`.
pub fn fake_llm_sidecar(
    namespace: &str,
    name: &str,
    organization_id: &str,
    replicas: i32,
    fake_llm: &FakeLlm,
    node_selector: &std::collections::BTreeMap<String, String>,
) -> Result<OpencodeSidecar> {
    let address = fake_llm.address();
    serde_json::from_value(json!({
        "apiVersion": "nubabel.io/v1alpha1",
        "kind": "OpencodeSidecar",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "organizationId": organization_id,
            "replicas": replicas,
            "model": FAKE_MODEL,
            "provider": {
                "id": FAKE_PROVIDER,
                "baseURL": format!("http://{address}/v1"),
            },
            // Nubabel's delegate_task names a category on every task.
            "categories": {"quick": {"model": FAKE_MODEL}},
            "nodeSelector": node_selector,
        }
    }))
    .context("building the OpencodeSidecar manifest")
}

/// The last `lines` lines of every container log under a node shim's run directory
/// (`<run_dir>/pods/<pod>/<container>.log`), for failure messages.
pub fn pod_log_tails(run_dir: &Path, lines: usize) -> String {
    let pods = run_dir.join("pods");
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(&pods) else {
        return out;
    };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    dirs.sort();
    for dir in dirs {
        let Ok(files) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut logs: Vec<PathBuf> = files
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        for log in logs {
            out.push_str(&format!(
                "--- {} ---\n{}\n",
                log.strip_prefix(&pods).unwrap_or(&log).display(),
                crate::process::log_tail(&log, lines)
            ));
        }
    }
    out
}

/// Everything a namespace's sidecar fleets need, running. Stop it with [`System::shutdown`];
/// dropping it stops the processes too (without waiting for the Node and RBAC cleanup).
pub struct System {
    env: TestEnv,
    namespace: String,
    fake_llm: FakeLlm,
    callback_addr: SocketAddr,
    callback_stop: Option<oneshot::Sender<()>>,
    callback_task: Option<JoinHandle<Result<()>>>,
    database_url: String,
    db: PgPool,
    master_key: String,
    stream_token_key: String,
    vault_keys: String,
    shim: Option<NodeShim>,
    operator: Option<SupervisedProcess>,
    operator_http: SocketAddr,
    binding: String,
    run_dir: TempDir,
}

impl System {
    /// Starts the fake LLM, the callback API, a node shim and the operator for `namespace`.
    pub async fn start(env: &TestEnv, namespace: &TestNamespace) -> Result<Self> {
        Self::start_with(env, namespace, &[]).await
    }

    /// Like [`System::start`], with extra flags for the callback API (e.g. the Slack bot's).
    pub async fn start_with(
        env: &TestEnv,
        namespace: &TestNamespace,
        callback_api_args: &[String],
    ) -> Result<Self> {
        let ns = namespace.name().to_owned();
        let images = sidecar_images()?;
        let operator_bin = workspace_binary("nubabel-operator", OPERATOR_BIN_ENV)?;
        crate::crds::install_crds(&env.client).await?;

        let run_dir = tempfile::Builder::new()
            .prefix(&format!("nubabel-system-{ns}-"))
            .disable_cleanup(crate::testing::keep_namespaces())
            .tempdir()
            .context("creating the system's run directory")?;
        let fake_llm = FakeLlm::start_on(IpAddr::V4(HOST_IP))?;

        // The callback API, in process.
        let master_key = format!("{}{}", random_token()?, random_token()?);
        let stream_token_key = format!("{}{}", random_token()?, random_token()?);
        let vault_keys = format!("k1={}", vault_key()?);
        let database_url = crate::fresh_database().await?;
        let redis_url = crate::test_redis_url().await?;
        let config = nubabel_callback_api::config::Config::try_parse_from(
            [
                "nubabel-callback-api".to_owned(),
                format!("--http-addr={HOST_IP}:0"),
                "--admin-http-addr=127.0.0.1:0".to_owned(),
                format!("--database-url={database_url}"),
                format!("--redis-url={redis_url}"),
                format!("--signing-master-key={master_key}"),
                format!("--stream-token-key={stream_token_key}"),
                "--sse-keep-alive-seconds=5".to_owned(),
                // MCP connections: a vault key, and upstream MCP servers written for the tests
                // listen on the host address, which the SSRF rules refuse unless allowed.
                format!("--vault-keys={vault_keys}"),
                format!("--egress-allow={HOST_IP}/32"),
            ]
            .into_iter()
            .chain(callback_api_args.iter().cloned()),
        )
        .context("configuring the callback API")?;
        let application = nubabel_callback_api::startup::Application::build(config)
            .await
            .context("building the callback API")?;
        let callback_addr = application.local_addr()?;
        let db = application.state().db.clone();
        let (callback_stop, stopped) = oneshot::channel::<()>();
        let callback_task = tokio::spawn(application.run_until(async {
            let _ = stopped.await;
        }));

        let shim = NodeShim::start_with(
            env.client.clone(),
            &format!("{ns}-node"),
            images,
            run_dir.path(),
            ShimOptions {
                claim_namespaces: Some(vec![ns.clone()]),
                ..ShimOptions::default()
            },
        )
        .await?;

        let mut system = Self {
            env: env.clone(),
            namespace: ns.clone(),
            fake_llm,
            callback_addr,
            callback_stop: Some(callback_stop),
            callback_task: Some(callback_task),
            database_url,
            db,
            master_key,
            stream_token_key,
            vault_keys,
            shim: Some(shim),
            operator: None,
            operator_http: SocketAddr::from(([127, 0, 0, 1], 0)),
            binding: format!("nubabel-operator-{ns}"),
            run_dir,
        };
        let kubeconfig = system.operator_identity().await?;
        system.start_operator(&operator_bin, &kubeconfig).await?;
        Ok(system)
    }

    /// Gives the operator its ServiceAccount, bound to exactly the RBAC of
    /// `operator/rbac.yaml`, and writes a kubeconfig with its token.
    async fn operator_identity(&self) -> Result<PathBuf> {
        let ns = &self.namespace;
        let rbac = workspace_root().join("operator/rbac.yaml");
        let rbac = rbac.to_string_lossy();
        let mut last_error = String::new();
        for _ in 0..3 {
            let applied = kubectl([
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=nubabel-e2e",
                "-n",
                ns,
                "-f",
                &rbac,
            ])
            .await?;
            if applied.status.success() {
                last_error.clear();
                break;
            }
            last_error = String::from_utf8_lossy(&applied.stderr).into_owned();
        }
        ensure!(
            last_error.is_empty(),
            "applying operator/rbac.yaml: {last_error}"
        );

        let accounts: Api<ServiceAccount> = Api::namespaced(self.env.client.clone(), ns);
        create(
            &accounts,
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(OPERATOR_ACCOUNT.into()),
                    ..ObjectMeta::default()
                },
                ..ServiceAccount::default()
            },
        )
        .await?;
        let subject = Subject {
            kind: "ServiceAccount".into(),
            name: OPERATOR_ACCOUNT.into(),
            namespace: Some(ns.clone()),
            api_group: None,
        };
        let role_ref = |kind: &str, name: &str| RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: kind.into(),
            name: name.into(),
        };
        create(
            &Api::<ClusterRoleBinding>::all(self.env.client.clone()),
            &ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(self.binding.clone()),
                    ..ObjectMeta::default()
                },
                role_ref: role_ref("ClusterRole", "nubabel-operator"),
                subjects: Some(vec![subject.clone()]),
            },
        )
        .await?;
        // Secrets only in the fleet's namespace, as operator/rbac.yaml says to bind them.
        create(
            &Api::<RoleBinding>::namespaced(self.env.client.clone(), ns),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some("nubabel-operator-secrets".into()),
                    ..ObjectMeta::default()
                },
                role_ref: role_ref("ClusterRole", "nubabel-operator-secrets"),
                subjects: Some(vec![subject.clone()]),
            },
        )
        .await?;
        create(
            &Api::<RoleBinding>::namespaced(self.env.client.clone(), ns),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some("nubabel-operator-leader-election".into()),
                    ..ObjectMeta::default()
                },
                role_ref: role_ref("Role", "nubabel-operator-leader-election"),
                subjects: Some(vec![subject]),
            },
        )
        .await?;
        let token = accounts
            .create_token_request(
                OPERATOR_ACCOUNT,
                &PostParams::default(),
                &TokenRequest {
                    metadata: ObjectMeta::default(),
                    spec: TokenRequestSpec {
                        audiences: vec![],
                        expiration_seconds: Some(3600),
                        bound_object_ref: None,
                    },
                    status: None,
                },
            )
            .await
            .context("requesting the operator's token")?
            .status
            .context("the token request has no status")?
            .token;

        let admin = kube::config::Kubeconfig::read_from(&self.env.kubeconfig)?;
        let cluster = admin
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .context("no cluster in the kubeconfig")?;
        let ca = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            cluster
                .certificate_authority_data
                .as_deref()
                .context("no CA data in the kubeconfig")?,
        )?;
        let kubeconfig = self.run_dir.path().join("operator.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            cluster
                .server
                .as_deref()
                .context("no server in the kubeconfig")?,
            &ca,
            OPERATOR_ACCOUNT,
            &token,
        )?;
        Ok(kubeconfig)
    }

    async fn start_operator(&mut self, binary: &Path, kubeconfig: &Path) -> Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        self.operator_http = SocketAddr::from(([127, 0, 0, 1], port));
        let ns = self.namespace.clone();
        let spec = ProcessSpec::new("nubabel-operator", binary)
            .args([
                "--http-addr",
                &self.operator_http.to_string(),
                "--watch-namespace",
                &ns,
                "--operator-namespace",
                &ns,
                "--leader-elect",
                "false",
                "--sidecar-image",
                SIDECAR_IMAGE,
                "--bridge-image",
                BRIDGE_IMAGE,
                "--callback-url",
                &self.callback_url(),
            ])
            .env("KUBECONFIG", kubeconfig)
            .env(
                crate::opencode_server::PLUGIN_DIR_ENV,
                crate::opencode_server::plugin_dir(),
            )
            .env("NUBABEL_SIGNING_MASTER_KEY", &self.master_key)
            .env("NUBABEL_DATABASE_URL", &self.database_url)
            .env("POD_NAME", format!("operator-{ns}"))
            .env("RUST_LOG", "info,nubabel_operator=debug")
            .stop_grace(Duration::from_secs(5));
        let log = self.run_dir.path().join("operator.log");
        let mut operator = SupervisedProcess::spawn(spec, log).await?;
        await_operator_ready(&mut operator, self.operator_http).await?;
        self.operator = Some(operator);
        Ok(())
    }

    /// Kills the operator with SIGKILL, as a crash or a lost node ends it: no graceful
    /// shutdown, nothing finished. [`System::restart_operator`] starts it again.
    pub async fn kill_operator(&mut self) -> Result<()> {
        let operator = self
            .operator
            .as_mut()
            .context("the operator is not running")?;
        let pid = operator.pid().context("the operator has exited already")?;
        crate::process::send_signal(pid, libc::SIGKILL)
            .with_context(|| format!("killing the operator (pid {pid})"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while operator.poll_exit()?.is_none() {
            ensure!(
                std::time::Instant::now() < deadline,
                "the operator survived SIGKILL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Starts the operator again with the same flags (appending to the same log) and waits
    /// until it is ready; after [`System::kill_operator`] it starts from nothing but what the
    /// API server and the database hold.
    pub async fn restart_operator(&mut self) -> Result<()> {
        let operator = self
            .operator
            .as_mut()
            .context("the operator was never started")?;
        operator.restart().await?;
        await_operator_ready(operator, self.operator_http).await
    }

    /// The test namespace the system serves.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The fake LLM the sidecars' provider points at.
    pub fn fake_llm(&self) -> &FakeLlm {
        &self.fake_llm
    }

    /// The callback API's base URL, `http://127.0.2.1:<port>`, as bridges reach it.
    pub fn callback_url(&self) -> String {
        format!("http://{}", self.callback_addr)
    }

    /// The callback API's database.
    pub fn db(&self) -> &PgPool {
        &self.db
    }

    /// The callback API's database URL.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The master key sidecar signing keys derive from (shared by the operator and the API).
    pub fn master_key(&self) -> &str {
        &self.master_key
    }

    /// A stream token for `organization_id` (limited to `session_id` when given), valid for
    /// ten minutes, as the callback API's SSE route expects.
    pub fn stream_token(&self, organization_id: &str, session_id: Option<&str>) -> Result<String> {
        let key = StreamTokenKey::new(self.stream_token_key.as_bytes())
            .map_err(|e| anyhow::anyhow!("stream token key: {e:?}"))?;
        let organization = OrganizationId::parse(organization_id)?;
        let now = jiff::Timestamp::now().as_second();
        Ok(stream_token::issue(
            &key,
            &organization,
            session_id,
            stream_token::Validity::starting_at(now, 600),
        ))
    }

    /// Registers an MCP connection for `organization_id`: tool calls of its sidecars to
    /// `<provider>_<tool>` go to `upstream_url` with `Authorization: Bearer <token>`.
    pub async fn register_mcp_connection(
        &self,
        organization_id: &str,
        provider: &str,
        upstream_url: &str,
        token: &str,
    ) -> Result<()> {
        use nubabel_store::connections::{self, AuthKind, Credentials, NewConnection, Secrets};
        let keyring = nubabel_store::vault::Keyring::parse(&self.vault_keys)
            .map_err(|e| anyhow::anyhow!("vault keys: {e}"))?;
        let upstream_url: reqwest::Url = upstream_url.parse().context("the upstream URL")?;
        connections::create(
            &self.db,
            &keyring,
            &NewConnection {
                organization_id: &OrganizationId::parse(organization_id)?,
                provider,
                upstream_url: &upstream_url,
                credentials: &Credentials {
                    auth_kind: AuthKind::Bearer,
                    secrets: Secrets::Bearer {
                        token: token.to_owned().into(),
                    },
                    token_expires_at: None,
                },
            },
        )
        .await
        .with_context(|| format!("registering the {provider} connection of {organization_id}"))?;
        Ok(())
    }

    /// The shim's node selector: sidecar pods with it run on the shim.
    pub fn node_selector(&self) -> std::collections::BTreeMap<String, String> {
        self.shim
            .as_ref()
            .map(NodeShim::node_selector)
            .unwrap_or_default()
    }

    /// The shim's run directory (pod volumes and container logs live under `pods/`).
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// The operator's health and metrics address.
    pub fn operator_http_addr(&self) -> SocketAddr {
        self.operator_http
    }

    /// The last lines of the operator's log, for failure messages.
    pub fn operator_log_tail(&self) -> String {
        self.operator
            .as_ref()
            .map_or_else(String::new, |p| p.log_tail(LOG_LINES))
    }

    /// The last lines of every container log of the namespace's pods, for failure messages.
    pub fn pod_log_tails(&self, lines: usize) -> String {
        pod_log_tails(self.run_dir.path(), lines)
    }

    /// Waits until sidecar `name` in this namespace has `replicas` ready pods.
    pub async fn await_fleet_ready(&self, name: &str, replicas: i32) -> Result<()> {
        crate::testing::await_condition(
            &Api::<OpencodeSidecar>::namespaced(self.env.client.clone(), &self.namespace),
            name,
            "the sidecar fleet to be ready",
            move |s: Option<&OpencodeSidecar>| {
                s.and_then(|s| s.status.as_ref())
                    .is_some_and(|s| s.ready_replicas == replicas)
            },
            Duration::from_secs(120),
        )
        .await
        .with_context(|| self.diagnostics())?;
        Ok(())
    }

    /// Everything worth reading when a test fails: the operator's log and the pods' logs.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- operator ---\n{}\n{}",
            self.operator_log_tail(),
            self.pod_log_tails(20)
        )
    }

    /// Binds this system's namespace to `organization_id`, as a cluster admin does before a
    /// tenant's fleets may run there.
    pub async fn bind_organization(&self, organization_id: &str) -> Result<()> {
        crate::testing::bind_organization(&self.env.client, &self.namespace, organization_id).await
    }

    /// An `OpencodeSidecar` named `name` for tenant `organization_id` with `replicas` pods on
    /// the shim, its provider pointed at the fake LLM.
    pub fn sidecar_manifest(
        &self,
        name: &str,
        organization_id: &str,
        replicas: i32,
    ) -> Result<OpencodeSidecar> {
        fake_llm_sidecar(
            &self.namespace,
            name,
            organization_id,
            replicas,
            &self.fake_llm,
            &self.node_selector(),
        )
    }

    /// The OpenCode server password of sidecar `name` (from its Secret, as the operator
    /// reads it).
    pub async fn opencode_password(&self, name: &str) -> Result<String> {
        Ok(fleet::opencode_password(&self.env.client, &self.namespace, name).await?)
    }

    /// An OpenCode client for pod `pod` of sidecar `sidecar`: the pod's IP and the sidecar's
    /// password, as the operator reaches it.
    pub async fn opencode_on(&self, sidecar: &str, pod: &str) -> Result<OpencodeClient> {
        let pods: Api<Pod> = Api::namespaced(self.env.client.clone(), &self.namespace);
        let pod = pods
            .get(pod)
            .await
            .with_context(|| format!("reading pod {pod}"))?;
        Ok(fleet::opencode(&self.env.client, &self.namespace, sidecar, &pod).await?)
    }

    /// An OpenCode client for the pod task `task` was sent to, addressing its conversation's
    /// workspace (OpenCode reports a session's status in its own directory only).
    pub async fn opencode_of_task(&self, task: &DelegatedTask) -> Result<OpencodeClient> {
        let status = task.status.clone().unwrap_or_default();
        let sidecar = status.sidecar.context("the task has no sidecar yet")?;
        let pod = status.sidecar_pod.context("the task has no pod yet")?;
        let opencode = self.opencode_on(&sidecar, &pod).await?;
        Ok(match status.workspace {
            Some(workspace) => opencode.in_directory(workspace.directory),
            None => opencode,
        })
    }

    /// Opens the callback API's SSE stream of `session` (a Nubabel or an OpenCode session id)
    /// with stream token `token`, whatever the answer.
    pub async fn open_session_stream(
        &self,
        session: &str,
        token: &str,
    ) -> Result<reqwest::Response> {
        let url = format!(
            "{}/api/sidecar/sessions/{session}/stream",
            self.callback_url()
        );
        reqwest::Client::new()
            .get(&url)
            .bearer_auth(token)
            .header("accept", "text/event-stream")
            .send()
            .await
            .with_context(|| format!("GET {url}"))
    }

    /// Reads the callback API's SSE stream of `session` from its first event until `until`
    /// holds for an event; returns every event read, in order.
    pub async fn read_session_stream(
        &self,
        session: &str,
        token: &str,
        until: impl Fn(&StreamEvent) -> bool,
    ) -> Result<Vec<StreamEvent>> {
        let response = self.open_session_stream(session, token).await?;
        ensure!(
            response.status().is_success(),
            "the stream of {session} answered {}",
            response.status()
        );
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        let mut events = Vec::new();
        while let Some(chunk) = body.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                let Some(event) = StreamEvent::parse(&frame)? else {
                    continue; // the retry hint or a keep-alive comment
                };
                let done = until(&event);
                events.push(event);
                if done {
                    return Ok(events);
                }
            }
        }
        bail!("the stream of {session} ended before the awaited event; got {events:?}")
    }

    /// Stops the operator, the shim (and with it every pod's processes), the callback API
    /// and the fake LLM, and removes the operator's ClusterRoleBinding.
    pub async fn shutdown(mut self) -> Result<()> {
        let mut errors = Vec::new();
        if let Some(mut operator) = self.operator.take()
            && let Err(e) = operator.stop().await
        {
            errors.push(format!("stopping the operator: {e:#}"));
        }
        if let Some(shim) = self.shim.take()
            && let Err(e) = shim.shutdown().await
        {
            errors.push(format!("stopping the node shim: {e:#}"));
        }
        if let Some(stop) = self.callback_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.callback_task.take() {
            // Open SSE streams hold a graceful shutdown; do not wait for them long.
            match tokio::time::timeout(Duration::from_secs(5), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => errors.push(format!("the callback API failed: {e:#}")),
                Ok(Err(e)) => errors.push(format!("the callback API task: {e}")),
                Err(_) => {}
            }
        }
        if let Err(e) = delete(
            &Api::<ClusterRoleBinding>::all(self.env.client.clone()),
            &self.binding,
        )
        .await
        {
            errors.push(format!("{e:#}"));
        }
        if !errors.is_empty() {
            bail!("shutting the system down: {}", errors.join("; "));
        }
        Ok(())
    }
}

/// A random vault key: 32 bytes, base64.
fn vault_key() -> Result<String> {
    let hex = format!("{}{}", random_token()?, random_token()?);
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()?;
    Ok(base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        bytes,
    ))
}

/// One event of the callback API's SSE stream of a session.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// The event's sequence number in its session (the SSE `id`).
    pub id: u64,
    /// `progress` or `state` (the SSE `event`).
    pub event: String,
    /// The JSON of the `data:` line: `{seq, eventId, kind, type, receivedAt, data}`.
    pub data: Value,
}

impl StreamEvent {
    /// Parses one SSE frame; `None` for a frame without data (a retry hint, a comment).
    pub fn parse(frame: &str) -> Result<Option<Self>> {
        let mut event = Self {
            id: 0,
            event: String::new(),
            data: Value::Null,
        };
        let mut has_data = false;
        for line in frame.lines() {
            if let Some(id) = line.strip_prefix("id:") {
                event.id = id.trim().parse().context("the SSE id is not a number")?;
            } else if let Some(name) = line.strip_prefix("event:") {
                name.trim().clone_into(&mut event.event);
            } else if let Some(data) = line.strip_prefix("data:") {
                event.data =
                    serde_json::from_str(data.trim()).context("the SSE data is not JSON")?;
                has_data = true;
            }
        }
        Ok(has_data.then_some(event))
    }

    /// The event's type (`busy`, `tool_execute_start`, `session_idle`, ...).
    pub fn type_(&self) -> &str {
        self.data["type"].as_str().unwrap_or_default()
    }
}

/// Waits until the operator answers `/readyz`: it found the CRDs and the API server's
/// capabilities. An operator that dies at start fails here, with its log, instead of as pods
/// that never appear.
async fn await_operator_ready(
    operator: &mut SupervisedProcess,
    http_addr: SocketAddr,
) -> Result<()> {
    let readyz = format!("http://{http_addr}/readyz");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    operator
        .wait_until_ready(
            "the operator's /readyz",
            Duration::from_secs(60),
            async || {
                let status = http.get(&readyz).send().await?.status();
                ensure!(status.is_success(), "/readyz answered {status}");
                Ok(())
            },
        )
        .await
}

impl Drop for System {
    fn drop(&mut self) {
        // The operator and the shim's pods stop with their handles; the callback API with the
        // runtime it was spawned on.
        if let Some(mut operator) = self.operator.take() {
            operator.stop_blocking();
        }
        drop(self.shim.take());
        if let Some(stop) = self.callback_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.callback_task.take() {
            task.abort();
        }
    }
}
