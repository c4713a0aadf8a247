//! A container's environment: `env` and `envFrom` with every `valueFrom` resolved.

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::ResourceExt;
use kube::api::Api;

use super::Shared;

/// The container's environment in declaration order, with every `valueFrom` resolved.
pub(super) async fn resolve_env(
    shared: &Shared,
    pod: &Pod,
    container: &Container,
    ip: Ipv4Addr,
) -> Result<Vec<(String, String)>> {
    let namespace = pod.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(shared.client.clone(), &namespace);
    let maps: Api<ConfigMap> = Api::namespaced(shared.client.clone(), &namespace);
    let mut env = Vec::new();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(secret_ref) = &source.secret_ref
            && let Some(secret) = secrets.get_opt(&secret_ref.name).await?
        {
            for (k, v) in secret.data.unwrap_or_default() {
                env.push((
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v.0).into_owned(),
                ));
            }
        }
        if let Some(map_ref) = &source.config_map_ref
            && let Some(map) = maps.get_opt(&map_ref.name).await?
        {
            for (k, v) in map.data.unwrap_or_default() {
                env.push((format!("{prefix}{k}"), v));
            }
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(value) = env_value(var, pod, ip, &secrets, &maps).await? {
            env.push((var.name.clone(), value));
        }
    }
    Ok(env)
}

async fn env_value(
    var: &EnvVar,
    pod: &Pod,
    ip: Ipv4Addr,
    secrets: &Api<Secret>,
    maps: &Api<ConfigMap>,
) -> Result<Option<String>> {
    let Some(from) = &var.value_from else {
        return Ok(Some(var.value.clone().unwrap_or_default()));
    };
    if let Some(key) = &from.secret_key_ref {
        let secret = secrets.get_opt(&key.name).await?;
        let value = secret.and_then(|s| s.data).and_then(|d| {
            d.get(&key.key)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        });
        return match value {
            Some(v) => Ok(Some(v)),
            None if key.optional == Some(true) => Ok(None),
            None => bail!(
                "secret key {}/{} of env {} is missing",
                key.name,
                key.key,
                var.name
            ),
        };
    }
    if let Some(key) = &from.config_map_key_ref {
        let value = maps
            .get_opt(&key.name)
            .await?
            .and_then(|m| m.data)
            .and_then(|d| d.get(&key.key).cloned());
        return match value {
            Some(v) => Ok(Some(v)),
            None if key.optional == Some(true) => Ok(None),
            None => bail!(
                "config map key {}/{} of env {} is missing",
                key.name,
                key.key,
                var.name
            ),
        };
    }
    if let Some(field) = &from.field_ref {
        let meta = &pod.metadata;
        let value = match field.field_path.as_str() {
            "metadata.name" => meta.name.clone(),
            "metadata.namespace" => meta.namespace.clone(),
            "metadata.uid" => meta.uid.clone(),
            "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            "spec.serviceAccountName" => pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone()),
            "status.podIP" => Some(ip.to_string()),
            "status.hostIP" => {
                let [a, b, c, _] = ip.octets();
                Some(format!("{a}.{b}.{c}.1"))
            }
            path => {
                let label = path
                    .strip_prefix("metadata.labels['")
                    .and_then(|rest| rest.strip_suffix("']"));
                label.and_then(|l| meta.labels.as_ref().and_then(|m| m.get(l).cloned()))
            }
        };
        return Ok(Some(value.unwrap_or_default()));
    }
    // resourceFieldRef: the shim enforces no limits, so report none.
    Ok(Some(String::new()))
}
