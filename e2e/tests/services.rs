//! The private Postgres and Redis servers behave like real servers: they stop, come back on the
//! same port, and Postgres keeps its data across a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::Result;
use nubabel_e2e::services::{redis_ping, run_sql};
use nubabel_e2e::{PrivatePostgres, PrivateRedis, fresh_database, test_redis_url, within};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn private_postgres_refuses_connections_while_stopped_and_keeps_its_data_across_a_restart()
-> Result<()> {
    within(TEST_TIMEOUT, "the Postgres stop/restart test", async {
        let mut postgres = PrivatePostgres::start().await?;
        let url = postgres.create_database("kept_across_restart").await?;
        run_sql(
            &url,
            "CREATE TABLE notes (body text); INSERT INTO notes VALUES ('before')",
        )
        .await?;

        postgres.stop().await?;
        let refused = run_sql(&url, "SELECT 1").await;
        assert!(
            refused.is_err(),
            "a stopped Postgres still answered: {refused:?}"
        );

        let port_before = postgres.port();
        postgres.restart().await?;
        assert_eq!(postgres.port(), port_before);
        assert_eq!(run_sql(&url, "SELECT body FROM notes").await?, "before");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn private_redis_refuses_connections_while_stopped_and_answers_again_after_a_restart()
-> Result<()> {
    within(TEST_TIMEOUT, "the Redis stop/restart test", async {
        let mut redis = PrivateRedis::start().await?;
        redis_ping(redis.port()).await?;
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));

        redis.stop().await?;
        assert!(redis_ping(redis.port()).await.is_err());

        redis.restart().await?;
        redis_ping(redis.port()).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn fresh_database_returns_a_new_empty_database_each_time() -> Result<()> {
    within(TEST_TIMEOUT, "the fresh database test", async {
        let first = fresh_database().await?;
        let second = fresh_database().await?;
        assert_ne!(first, second);
        run_sql(&first, "CREATE TABLE only_in_first (id int)").await?;
        let tables_in_second = run_sql(
            &second,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_first'",
        )
        .await?;
        assert_eq!(tables_in_second, "0");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn test_redis_url_names_a_server_that_answers() -> Result<()> {
    within(TEST_TIMEOUT, "the test Redis test", async {
        let url = test_redis_url().await?;
        let port: u16 = url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("a port at the end of the URL");
        redis_ping(port).await
    })
    .await
}
