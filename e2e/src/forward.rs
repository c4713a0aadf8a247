//! A TCP forwarder: makes a service that listens on `127.0.0.1` only (the stack's Postgres and
//! Redis) reachable from the node shim's pods, which reach host services on
//! [`crate::node_shim::HOST_IP`] (the shim rewrites `127.0.0.1` in pods to the pod's own IP).
//! It plays the part of the route a cluster has to a database outside it.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwards every connection to its listen address to a target, until dropped.
pub struct TcpForwarder {
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpForwarder {
    /// Listens on `listen` (port 0 for a free one) and forwards connections to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen} to forward to {target}"))?;
        let local = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    match TcpStream::connect(target).await {
                        Ok(mut outbound) => {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        Err(e) => tracing::warn!(%target, error = %e, "forwarding a connection"),
                    }
                });
            }
        });
        Ok(Self { local, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// `url` with its `host:port` (after any `user@`) replaced by the forwarder's address, for
    /// a URL that names `target`'s port on `127.0.0.1` or `localhost`.
    pub fn forwarded_url(&self, url: &str) -> Result<String> {
        let port = url
            .split_once("://")
            .map(|(_, rest)| rest)
            .and_then(|rest| rest.split(['/', '?']).next())
            .map(|authority| authority.rsplit('@').next().unwrap_or(authority))
            .context("not a URL")?;
        anyhow::ensure!(
            port.starts_with("127.0.0.1:") || port.starts_with("localhost:"),
            "{url} does not name a port on 127.0.0.1"
        );
        Ok(url.replacen(port, &self.local.to_string(), 1))
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_reach_the_target_and_urls_name_the_forwarder() {
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_addr = target.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = target.accept().await.unwrap();
            let mut buf = [0u8; 4];
            socket.read_exact(&mut buf).await.unwrap();
            socket.write_all(&buf).await.unwrap();
        });
        let forwarder = TcpForwarder::start("127.0.0.1:0".parse().unwrap(), target_addr)
            .await
            .unwrap();
        let mut client = TcpStream::connect(forwarder.local_addr()).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");

        let local = forwarder.local_addr();
        assert_eq!(
            forwarder
                .forwarded_url("postgres://postgres@127.0.0.1:5432/db")
                .unwrap(),
            format!("postgres://postgres@{local}/db")
        );
        assert_eq!(
            forwarder.forwarded_url("redis://127.0.0.1:6379").unwrap(),
            format!("redis://{local}")
        );
        assert!(forwarder.forwarded_url("redis://10.0.0.1:6379").is_err());
    }
}
