//! Certificates and keys of the local control plane, made with the `openssl` command: a CA, the
//! API server's serving certificate, a front-proxy CA, the service-account signing key pair, and
//! bearer tokens. All keys are ECDSA P-256, which takes milliseconds where RSA takes a second.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// The names the API server's certificate is valid for: loopback for the harness and kubectl,
/// and the in-cluster names (10.0.0.1 is the first address of the service range) for pods.
pub const API_SERVER_SUBJECT_ALT_NAMES: &str = "IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,\
DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
DNS:kubernetes.default.svc.cluster.local";

/// `openssl req` arguments for a new unencrypted P-256 key and a SHA-256 signature.
const NEW_EC_KEY: [&str; 6] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-sha256",
];

/// Files written by [`ControlPlanePki::generate`].
#[derive(Debug, Clone)]
pub struct ControlPlanePki {
    /// The CA certificate (PEM) that signed the API server's certificate.
    pub ca_cert: PathBuf,
    /// The CA key; the controller-manager signs CSRs with it.
    pub ca_key: PathBuf,
    /// The API server's serving certificate.
    pub api_server_cert: PathBuf,
    /// The API server's serving key.
    pub api_server_key: PathBuf,
    /// Private key signing service-account tokens.
    pub service_account_key: PathBuf,
    /// Its public half, verifying them.
    pub service_account_public_key: PathBuf,
    /// CA of the (absent) front proxy; components look its bundle up in the cluster and complain
    /// without end while it is missing.
    pub front_proxy_ca_cert: PathBuf,
}

impl ControlPlanePki {
    /// Generates everything into `dir` (a few tens of milliseconds).
    pub async fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = |name: &str| dir.join(name);
        let pki = Self {
            ca_cert: file("ca.crt"),
            ca_key: file("ca.key"),
            api_server_cert: file("apiserver.crt"),
            api_server_key: file("apiserver.key"),
            service_account_key: file("sa.key"),
            service_account_public_key: file("sa.pub"),
            front_proxy_ca_cert: file("front-proxy-ca.crt"),
        };
        let front_proxy_ca_key = file("front-proxy-ca.key");

        self_signed_ca("nubabel-local-ca", &pki.ca_key, &pki.ca_cert).await?;
        self_signed_ca(
            "nubabel-local-front-proxy-ca",
            &front_proxy_ca_key,
            &pki.front_proxy_ca_cert,
        )
        .await?;

        let csr = file("apiserver.csr");
        let mut request = vec!["req", "-new"];
        request.extend(NEW_EC_KEY);
        request.extend(["-subj", "/CN=kube-apiserver"]);
        request.extend(["-keyout", path_str(&pki.api_server_key)?]);
        request.extend(["-out", path_str(&csr)?]);
        openssl(&request).await?;
        // rustls (webpki) wants a v3 end-entity certificate with the names in subjectAltName.
        let extensions = file("apiserver.ext");
        std::fs::write(
            &extensions,
            format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\n\
                 subjectAltName={API_SERVER_SUBJECT_ALT_NAMES}\n"
            ),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "3650",
            "-CAcreateserial",
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&pki.ca_cert)?,
            "-CAkey",
            path_str(&pki.ca_key)?,
            "-extfile",
            path_str(&extensions)?,
            "-out",
            path_str(&pki.api_server_cert)?,
        ])
        .await?;

        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-out",
            path_str(&pki.service_account_key)?,
        ])
        .await?;
        openssl(&[
            "pkey",
            "-pubout",
            "-in",
            path_str(&pki.service_account_key)?,
            "-out",
            path_str(&pki.service_account_public_key)?,
        ])
        .await?;
        Ok(pki)
    }
}

/// A random bearer token: 32 hex digits from the kernel's random source.
pub fn random_token() -> Result<String> {
    let mut bytes = [0_u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

async fn self_signed_ca(common_name: &str, key: &Path, cert: &Path) -> Result<()> {
    let subject = format!("/CN={common_name}");
    let mut request = vec!["req", "-x509", "-days", "3650"];
    request.extend(NEW_EC_KEY);
    request.extend(["-subj", &subject]);
    request.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    request.extend([
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    ]);
    request.extend(["-keyout", path_str(key)?, "-out", path_str(cert)?]);
    openssl(&request).await
}

async fn openssl(args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("running openssl (Debian package openssl): run scripts/install-deps.sh")?;
    if !output.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}
