//! The local stack harness and the helpers of the end-to-end suite: a real Kubernetes control
//! plane, private Postgres and Redis servers, and the process supervision under them.

pub mod control_plane;
pub mod crds;
pub mod fake_llm;
pub mod fake_slack;
pub mod forward;
pub mod git_server;
pub mod local;
pub mod mcp_upstream;
pub mod node_shim;
pub mod opencode_server;
pub mod pki;
pub mod pod_credentials;
pub mod process;
pub mod service_urls;
pub mod services;
pub mod stack;
pub mod system;
pub mod testing;
pub mod tools;
pub mod webdriver;

use std::time::Duration;

pub use control_plane::{LocalControlPlane, client_from_kubeconfig, install_crypto_provider};
pub use services::{PrivatePostgres, PrivateRedis, fresh_database, test_redis_url};
pub use stack::LocalStack;
pub use testing::{
    DEFAULT_WAIT, TestEnv, TestNamespace, apply, await_condition, create, delete, kubectl,
};

/// Runs `future` with a hard deadline: every test wraps its body in this, so a hung watch or
/// server fails the test with a message instead of hanging the suite.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    future: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| anyhow::anyhow!("{what} did not finish within {limit:?}"))?
}
