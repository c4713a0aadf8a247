//! A real Kubernetes v1.20.2 control plane on loopback ports: Debian's etcd, and kube-apiserver,
//! kube-controller-manager and kube-scheduler built from Debian's source package. No kubelet
//! runs, so pods stay Pending unless a node shim plays the node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pki::{self, ControlPlanePki};
use crate::process::{self, ProcessSpec, SupervisedProcess};
use crate::tools::{self, ToolPaths};

/// The service network; its first address (10.0.0.1) is the `kubernetes` Service, and the API
/// server's certificate names it.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";
/// Admission plugins of a conventional cluster (the upstream recommendation for 1.20), so
/// objects are defaulted and validated as they would be elsewhere.
pub const ADMISSION_PLUGINS: &str = "NamespaceLifecycle,LimitRanger,ServiceAccount,\
DefaultStorageClass,DefaultTolerationSeconds,MutatingAdmissionWebhook,\
ValidatingAdmissionWebhook,ResourceQuota,Priority,NodeRestriction";

const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(60);
const API_SERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
const CONTROLLERS_READY_TIMEOUT: Duration = Duration::from_secs(90);

/// etcd, kube-apiserver, kube-controller-manager and kube-scheduler, each a supervised process,
/// and an admin kubeconfig for them.
///
/// Dropping it stops the processes in the reverse order of their start (the fields are declared
/// in that order); [`LocalControlPlane::shutdown`] does the same without blocking.
#[derive(Debug)]
pub struct LocalControlPlane {
    scheduler: SupervisedProcess,
    controller_manager: SupervisedProcess,
    api_server: SupervisedProcess,
    etcd: SupervisedProcess,
    dir: PathBuf,
    kubeconfig_path: PathBuf,
    ca_cert_path: PathBuf,
    api_server_port: u16,
    startup_timings: Vec<(String, Duration)>,
}

impl LocalControlPlane {
    /// Starts the control plane under `run_dir/control-plane`, with the binaries from
    /// [`ToolPaths::from_env`], and waits until it is ready: `/readyz` answers `ok`, the
    /// controller-manager has given the `default` namespace its ServiceAccount (with a token),
    /// and the scheduler answers `/healthz`.
    pub async fn start(run_dir: &Path) -> Result<Self> {
        Self::start_with(run_dir, &ToolPaths::from_env()).await
    }

    /// [`LocalControlPlane::start`] with explicit binary locations.
    pub async fn start_with(run_dir: &Path, tool_paths: &ToolPaths) -> Result<Self> {
        crate::install_crypto_provider();
        let kube_apiserver = tool_paths.kube_apiserver()?;
        let kube_controller_manager = tool_paths.kube_controller_manager()?;
        let kube_scheduler = tool_paths.kube_scheduler()?;
        let etcd_binary = tools::etcd()?;

        let dir = run_dir.join("control-plane");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut timings = Vec::new();
        let started = Instant::now();
        let pki = ControlPlanePki::generate(&dir.join("pki")).await?;
        timings.push(("certificates".to_owned(), started.elapsed()));

        let etcd_client_port = process::free_loopback_port()?;
        let etcd_peer_port = process::free_loopback_port()?;
        let api_server_port = process::free_loopback_port()?;
        let scheduler_port = process::free_loopback_port()?;

        let started = Instant::now();
        let etcd_client_url = format!("http://127.0.0.1:{etcd_client_port}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let etcd_spec = ProcessSpec::new("etcd", etcd_binary)
            .arg("--name=nubabel-local")
            .arg(format!("--data-dir={}", dir.join("etcd-data").display()))
            .arg(format!("--listen-client-urls={etcd_client_url}"))
            .arg(format!("--advertise-client-urls={etcd_client_url}"))
            .arg(format!("--listen-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-cluster=nubabel-local={etcd_peer_url}"))
            .arg("--logger=zap");
        let mut etcd = SupervisedProcess::spawn(etcd_spec, dir.join("etcd.log")).await?;
        etcd.wait_until_ready("etcd /health", ETCD_READY_TIMEOUT, async || {
            let (status, body) = http_get_plain(etcd_client_port, "/health").await?;
            if status == 200 && body.contains("\"health\":\"true\"") {
                Ok(())
            } else {
                bail!("GET /health answered {status}: {body}")
            }
        })
        .await?;
        timings.push(("etcd".to_owned(), started.elapsed()));

        let admin_token = pki::random_token()?;
        let controller_manager_token = pki::random_token()?;
        let scheduler_token = pki::random_token()?;
        let tokens_csv = dir.join("tokens.csv");
        // token,user,uid,"groups": the two components get the users the bootstrap RBAC policy
        // binds their roles to.
        std::fs::write(
            &tokens_csv,
            format!(
                "{admin_token},admin,admin,\"system:masters\"\n\
                 {controller_manager_token},system:kube-controller-manager,kube-controller-manager,\"\"\n\
                 {scheduler_token},system:kube-scheduler,kube-scheduler,\"\"\n"
            ),
        )?;
        let server = format!("https://127.0.0.1:{api_server_port}");
        let ca_pem = std::fs::read(&pki.ca_cert)?;
        let kubeconfig_path = dir.join("admin.kubeconfig");
        write_kubeconfig(&kubeconfig_path, &server, &ca_pem, "admin", &admin_token)?;
        let controller_manager_kubeconfig = dir.join("controller-manager.kubeconfig");
        write_kubeconfig(
            &controller_manager_kubeconfig,
            &server,
            &ca_pem,
            "system:kube-controller-manager",
            &controller_manager_token,
        )?;
        let scheduler_kubeconfig = dir.join("scheduler.kubeconfig");
        write_kubeconfig(
            &scheduler_kubeconfig,
            &server,
            &ca_pem,
            "system:kube-scheduler",
            &scheduler_token,
        )?;

        let started = Instant::now();
        let api_server_spec = ProcessSpec::new("kube-apiserver", kube_apiserver)
            .arg(format!("--etcd-servers={etcd_client_url}"))
            .arg(format!("--secure-port={api_server_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            // 1.20 still has the unauthenticated port; it must not open 8080 on the machine.
            .arg("--insecure-port=0")
            .arg(flag_path("--cert-dir", &dir.join("apiserver-certs")))
            .arg(flag_path("--tls-cert-file", &pki.api_server_cert))
            .arg(flag_path("--tls-private-key-file", &pki.api_server_key))
            .arg(flag_path("--client-ca-file", &pki.ca_cert))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(flag_path(
                "--service-account-key-file",
                &pki.service_account_public_key,
            ))
            .arg(flag_path(
                "--service-account-signing-key-file",
                &pki.service_account_key,
            ))
            .arg(flag_path("--token-auth-file", &tokens_csv))
            .arg("--authorization-mode=Node,RBAC")
            .arg(format!(
                "--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"
            ))
            .arg("--allow-privileged=true")
            .arg(format!("--enable-admission-plugins={ADMISSION_PLUGINS}"))
            .arg(flag_path(
                "--requestheader-client-ca-file",
                &pki.front_proxy_ca_cert,
            ))
            .arg("--requestheader-allowed-names=front-proxy-client")
            .arg("--requestheader-username-headers=X-Remote-User")
            .arg("--requestheader-group-headers=X-Remote-Group")
            .arg("--requestheader-extra-headers-prefix=X-Remote-Extra-")
            // The `kubernetes` Service cannot point at a loopback address; without this the
            // server retries writing its endpoints forever.
            .arg("--endpoint-reconciler-type=none")
            .arg("--profiling=false");
        let mut api_server =
            SupervisedProcess::spawn(api_server_spec, dir.join("kube-apiserver.log")).await?;
        let admin_client = client_from_kubeconfig(&kubeconfig_path).await?;
        api_server
            .wait_until_ready(
                "kube-apiserver /readyz",
                API_SERVER_READY_TIMEOUT,
                async || {
                    let body = get_text(&admin_client, "/readyz").await?;
                    if body.trim() == "ok" {
                        Ok(())
                    } else {
                        bail!("/readyz answered {body}")
                    }
                },
            )
            .await?;
        timings.push(("kube-apiserver".to_owned(), started.elapsed()));

        let started = Instant::now();
        let controller_manager_spec =
            ProcessSpec::new("kube-controller-manager", kube_controller_manager)
                .arg(flag_path("--kubeconfig", &controller_manager_kubeconfig))
                .arg("--controllers=*")
                .arg("--leader-elect=false")
                // No serving at all: readiness is judged by what the controllers do.
                .arg("--secure-port=0")
                .arg("--port=0")
                .arg(flag_path("--root-ca-file", &pki.ca_cert))
                .arg(flag_path(
                    "--service-account-private-key-file",
                    &pki.service_account_key,
                ))
                .arg("--use-service-account-credentials=true")
                .arg(flag_path("--cluster-signing-cert-file", &pki.ca_cert))
                .arg(flag_path("--cluster-signing-key-file", &pki.ca_key))
                // Tests create and delete objects in bursts; the default 20 QPS slows GC.
                .arg("--kube-api-qps=100")
                .arg("--kube-api-burst=200");
        let mut controller_manager = SupervisedProcess::spawn(
            controller_manager_spec,
            dir.join("kube-controller-manager.log"),
        )
        .await?;
        let scheduler_spec = ProcessSpec::new("kube-scheduler", kube_scheduler)
            .arg(flag_path("--kubeconfig", &scheduler_kubeconfig))
            .arg(flag_path(
                "--authentication-kubeconfig",
                &scheduler_kubeconfig,
            ))
            .arg(flag_path(
                "--authorization-kubeconfig",
                &scheduler_kubeconfig,
            ))
            .arg("--leader-elect=false")
            .arg("--port=0")
            // A secure port only so that /healthz can tell when it runs.
            .arg(format!("--secure-port={scheduler_port}"))
            .arg("--bind-address=127.0.0.1");
        let mut scheduler =
            SupervisedProcess::spawn(scheduler_spec, dir.join("kube-scheduler.log")).await?;

        let service_accounts: Api<ServiceAccount> = Api::namespaced(admin_client, "default");
        controller_manager
            .wait_until_ready(
                "the default ServiceAccount (with its token) in namespace default",
                CONTROLLERS_READY_TIMEOUT,
                async || {
                    let account = service_accounts
                        .get_opt("default")
                        .await?
                        .context("no ServiceAccount default yet")?;
                    if account.secrets.unwrap_or_default().is_empty() {
                        bail!("ServiceAccount default has no token secret yet");
                    }
                    Ok(())
                },
            )
            .await?;
        timings.push(("kube-controller-manager".to_owned(), started.elapsed()));
        let scheduler_client = insecure_client(scheduler_port)?;
        scheduler
            .wait_until_ready(
                "kube-scheduler /healthz",
                CONTROLLERS_READY_TIMEOUT,
                async || {
                    let body = get_text(&scheduler_client, "/healthz").await?;
                    if body.trim() == "ok" {
                        Ok(())
                    } else {
                        bail!("/healthz answered {body}")
                    }
                },
            )
            .await?;
        timings.push(("kube-scheduler".to_owned(), started.elapsed()));
        tracing::info!(%server, kubeconfig = %kubeconfig_path.display(), "control plane is ready");

        Ok(Self {
            scheduler,
            controller_manager,
            api_server,
            etcd,
            dir,
            kubeconfig_path,
            ca_cert_path: pki.ca_cert,
            api_server_port,
            startup_timings: timings,
        })
    }

    /// The admin kubeconfig (token in `system:masters`, the CA inline); kube-rs and kubectl
    /// both accept it.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// A client with the admin kubeconfig. Built anew on every call: a kube `Client` runs a
    /// task on the runtime that created it and fails once that runtime is gone.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig_path).await
    }

    /// `https://127.0.0.1:PORT`.
    pub fn api_server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_server_port)
    }

    /// The CA certificate that signed the API server's certificate.
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert_path
    }

    /// Where the control plane keeps its data, certificates, kubeconfigs and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long each step of [`LocalControlPlane::start`] took.
    pub fn startup_timings(&self) -> &[(String, Duration)] {
        &self.startup_timings
    }

    /// Fails with the log tail of the first component that has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.etcd.ensure_running()?;
        self.api_server.ensure_running()?;
        self.controller_manager.ensure_running()?;
        self.scheduler.ensure_running()
    }

    /// Stops the components in the reverse order of their start.
    pub async fn shutdown(mut self) -> Result<()> {
        self.scheduler.stop().await?;
        self.controller_manager.stop().await?;
        self.api_server.stop().await?;
        self.etcd.stop().await
    }
}

/// Installs rustls's ring provider as the process default unless one is installed already:
/// kube-rs builds its TLS config from the process default, and when a build compiles in both
/// ring and aws-lc-rs (reqwest's `rustls` feature brings the latter) rustls refuses to guess.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An Err only means another thread installed one first.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A kube client from a kubeconfig file (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    Client::try_from(config).context("building a kube client")
}

/// Writes a kubeconfig with one cluster (the CA inline), one user with a bearer token, and one
/// context, in the YAML layout kubectl writes.
pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &[u8],
    user: &str,
    token: &str,
) -> Result<()> {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let kubeconfig = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: nubabel-local\n\
         \x20 cluster:\n\
         \x20   server: {server}\n\
         \x20   certificate-authority-data: {ca_data}\n\
         users:\n\
         - name: \"{user}\"\n\
         \x20 user:\n\
         \x20   token: {token}\n\
         contexts:\n\
         - name: nubabel-local\n\
         \x20 context:\n\
         \x20   cluster: nubabel-local\n\
         \x20   user: \"{user}\"\n\
         \x20   namespace: default\n\
         current-context: nubabel-local\n"
    );
    std::fs::write(path, kubeconfig).with_context(|| format!("writing {}", path.display()))
}

/// GET `path` through `client` and return the body; non-2xx answers are errors.
async fn get_text(client: &Client, path: &str) -> Result<String> {
    let request = http::Request::get(path).body(Vec::new())?;
    Ok(client.request_text(request).await?)
}

/// A client for a component's self-signed secure port (only /healthz is asked, anonymously).
fn insecure_client(port: u16) -> Result<Client> {
    let url: http::Uri = format!("https://127.0.0.1:{port}").parse()?;
    let mut config = Config::new(url);
    config.accept_invalid_certs = true;
    Client::try_from(config).context("building a client for a component's health port")
}

/// A minimal HTTP/1.0 GET on loopback (etcd's plain-HTTP /health): status code and body.
async fn http_get_plain(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    // HTTP/1.0: the server closes the connection after the body.
    stream.take(64 * 1024).read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn flag_path(flag: &str, path: &Path) -> String {
    format!("{flag}={}", path.display())
}
