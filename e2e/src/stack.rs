//! The whole local stack under one run directory: Postgres, Redis and the control plane, and the
//! environment a command needs to use them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::control_plane::LocalControlPlane;
use crate::services::{PrivatePostgres, PrivateRedis, TEST_DATABASE_URL_ENV, TEST_REDIS_URL_ENV};
use crate::tools::ToolPaths;

/// Environment variable naming the run directory (logs, data, kubeconfigs).
pub const LOCAL_DIR_ENV: &str = "NUBABEL_LOCAL_DIR";

/// Postgres, Redis and the control plane, started together. Dropping it stops the control
/// plane first, then Redis, then Postgres.
#[derive(Debug)]
pub struct LocalStack {
    control_plane: LocalControlPlane,
    redis: PrivateRedis,
    postgres: PrivatePostgres,
    run_dir: PathBuf,
    tools_bin: PathBuf,
    startup_timings: Vec<(String, Duration)>,
}

impl LocalStack {
    /// Starts the three parts concurrently in `run_dir`; if one fails, the others are stopped.
    pub async fn start(run_dir: &Path, tool_paths: &ToolPaths) -> Result<Self> {
        let (postgres, redis, control_plane) = tokio::try_join!(
            async {
                let started = Instant::now();
                let postgres = PrivatePostgres::start_in(run_dir).await?;
                Ok::<_, anyhow::Error>((postgres, ("postgres".to_owned(), started.elapsed())))
            },
            async {
                let started = Instant::now();
                let redis = PrivateRedis::start_in(run_dir).await?;
                Ok((redis, ("redis".to_owned(), started.elapsed())))
            },
            async {
                let started = Instant::now();
                let control_plane = LocalControlPlane::start_with(run_dir, tool_paths).await?;
                Ok((
                    control_plane,
                    ("control plane".to_owned(), started.elapsed()),
                ))
            },
        )?;
        let mut startup_timings = vec![postgres.1, redis.1, control_plane.1];
        startup_timings.extend(
            control_plane
                .0
                .startup_timings()
                .iter()
                .map(|(step, took)| (format!("  control plane: {step}"), *took)),
        );
        Ok(Self {
            control_plane: control_plane.0,
            redis: redis.0,
            postgres: postgres.0,
            run_dir: run_dir.to_path_buf(),
            tools_bin: tool_paths.tools_bin.clone(),
            startup_timings,
        })
    }

    /// The control plane.
    pub fn control_plane(&self) -> &LocalControlPlane {
        &self.control_plane
    }

    /// The Postgres server.
    pub fn postgres(&mut self) -> &mut PrivatePostgres {
        &mut self.postgres
    }

    /// The Redis server.
    pub fn redis(&mut self) -> &mut PrivateRedis {
        &mut self.redis
    }

    /// How long each part took to become ready.
    pub fn startup_timings(&self) -> &[(String, Duration)] {
        &self.startup_timings
    }

    /// What a command run inside the stack gets: `KUBECONFIG`, `NUBABEL_TEST_DATABASE_URL`,
    /// `NUBABEL_TEST_REDIS_URL`, `NUBABEL_LOCAL_DIR`, and `PATH` with kubectl and helm first.
    pub fn env(&self) -> Vec<(String, OsString)> {
        let mut path = OsString::from(self.tools_bin.as_os_str());
        if let Some(existing) = std::env::var_os("PATH").filter(|path| !path.is_empty()) {
            path.push(":");
            path.push(existing);
        }
        vec![
            (
                "KUBECONFIG".to_owned(),
                self.control_plane.kubeconfig_path().into(),
            ),
            (TEST_DATABASE_URL_ENV.to_owned(), self.postgres.url().into()),
            (TEST_REDIS_URL_ENV.to_owned(), self.redis.url().into()),
            (LOCAL_DIR_ENV.to_owned(), self.run_dir.clone().into()),
            ("PATH".to_owned(), path),
        ]
    }

    /// Fails with the log tail of a control-plane component that has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.control_plane.ensure_running()
    }

    /// Stops everything: the control plane, then Redis, then Postgres.
    pub async fn shutdown(mut self) -> Result<()> {
        let control_plane = self.control_plane.shutdown();
        let redis = self.redis.stop();
        let (control_plane, redis) = tokio::join!(control_plane, redis);
        let postgres = self.postgres.stop().await;
        control_plane.and(redis).and(postgres)
    }
}
