//! The local control plane is a real Kubernetes v1.20.2: the API server answers, the
//! controller-manager reconciles (ServiceAccounts, Deployments, garbage collection), server-side
//! apply works, and kubectl accepts the written kubeconfig. Run inside `nubabel-local run`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Pod, PodSpec, PodTemplateSpec, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{ListParams, ObjectMeta};
use kube::runtime::wait::conditions;
use kube::{Api, Resource, ResourceExt};
use nubabel_e2e::{
    DEFAULT_WAIT, TestEnv, TestNamespace, apply, await_condition, create, delete, kubectl, within,
};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

#[tokio::test]
async fn the_api_server_is_ready_and_reports_version_1_20_2() -> Result<()> {
    within(TEST_TIMEOUT, "the version test", async {
        let env = TestEnv::from_env().await?;
        let version = env.client.apiserver_version().await?;
        assert_eq!(version.git_version, "v1.20.2");
        let readyz = env
            .client
            .request_text(http::Request::get("/readyz").body(Vec::new())?)
            .await?;
        assert_eq!(readyz, "ok");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_new_namespace_gets_a_default_service_account_from_the_controller_manager() -> Result<()>
{
    within(TEST_TIMEOUT, "the ServiceAccount test", async {
        let env = TestEnv::from_env().await?;
        // Created by hand rather than with TestNamespace, which itself waits for the account.
        let namespaces: Api<Namespace> = Api::all(env.client.clone());
        let name = format!("e2e-sa-{}", std::process::id());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        create(&namespaces, &namespace).await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &name);
        let account = await_condition(
            &accounts,
            "default",
            "the controller-manager to create the default ServiceAccount",
            |account: Option<&ServiceAccount>| account.is_some(),
            DEFAULT_WAIT,
        )
        .await?;
        assert_eq!(account.context("no account")?.name_any(), "default");
        delete(&namespaces, &name).await
    })
    .await
}

#[tokio::test]
async fn a_deployment_produces_pods_through_its_replica_set() -> Result<()> {
    within(TEST_TIMEOUT, "the Deployment test", async {
        let env = TestEnv::from_env().await?;
        let namespace = TestNamespace::create(&env.client, "e2e-deploy").await?;
        let app = labels(&[("app", "web")]);
        let deployment = Deployment {
            metadata: ObjectMeta {
                name: Some("web".to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                selector: LabelSelector {
                    match_labels: Some(app.clone()),
                    ..LabelSelector::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(app),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "web".to_owned(),
                            image: Some("registry.invalid/web:1".to_owned()),
                            ..Container::default()
                        }],
                        ..PodSpec::default()
                    }),
                },
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        };
        let deployments: Api<Deployment> = namespace.api();
        create(&deployments, &deployment).await?;
        await_condition(
            &deployments,
            "web",
            "status.replicas to reach 2",
            |deployment: Option<&Deployment>| {
                deployment
                    .and_then(|d| d.status.as_ref())
                    .and_then(|status| status.replicas)
                    == Some(2)
            },
            DEFAULT_WAIT,
        )
        .await?;

        let pods: Api<Pod> = namespace.api();
        let listed = pods.list(&ListParams::default().labels("app=web")).await?;
        assert_eq!(listed.items.len(), 2);
        for pod in &listed.items {
            let owner = &pod.owner_references()[0];
            assert_eq!(owner.kind, "ReplicaSet");
            // No kubelet runs here: the pods stay Pending.
            assert_eq!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Pending")
            );
        }
        namespace.delete().await
    })
    .await
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_dependents() -> Result<()> {
    within(TEST_TIMEOUT, "the garbage collection test", async {
        let env = TestEnv::from_env().await?;
        let namespace = TestNamespace::create(&env.client, "e2e-gc").await?;
        let config_maps: Api<ConfigMap> = namespace.api();
        let owner = create(
            &config_maps,
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("owner".to_owned()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            },
        )
        .await?;
        let dependent = create(
            &config_maps,
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("dependent".to_owned()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: ConfigMap::api_version(&()).into_owned(),
                        kind: ConfigMap::kind(&()).into_owned(),
                        name: owner.name_any(),
                        uid: owner.uid().context("owner has no uid")?,
                        ..OwnerReference::default()
                    }]),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            },
        )
        .await?;

        delete(&config_maps, "owner").await?;
        let dependent_uid = dependent.uid().context("dependent has no uid")?;
        await_condition(
            &config_maps,
            "dependent",
            "the garbage collector to delete the dependent of a deleted owner",
            conditions::is_deleted(&dependent_uid),
            DEFAULT_WAIT,
        )
        .await?;
        namespace.delete().await
    })
    .await
}

#[tokio::test]
async fn server_side_apply_records_the_field_manager() -> Result<()> {
    within(TEST_TIMEOUT, "the server-side apply test", async {
        let env = TestEnv::from_env().await?;
        let namespace = TestNamespace::create(&env.client, "e2e-apply").await?;
        let config_maps: Api<ConfigMap> = namespace.api();
        let desired = ConfigMap {
            metadata: ObjectMeta {
                name: Some("applied".to_owned()),
                ..ObjectMeta::default()
            },
            data: Some(labels(&[("greeting", "hello")])),
            ..ConfigMap::default()
        };
        let applied = apply(&config_maps, &desired, "nubabel-e2e-test").await?;
        assert_eq!(applied.data, desired.data);
        let managers: Vec<_> = applied
            .managed_fields()
            .iter()
            .map(|entry| (entry.manager.clone(), entry.operation.clone()))
            .collect();
        assert!(
            managers.contains(&(
                Some("nubabel-e2e-test".to_owned()),
                Some("Apply".to_owned())
            )),
            "managed fields: {managers:?}"
        );
        namespace.delete().await
    })
    .await
}

#[tokio::test]
async fn kubectl_lists_namespaces_with_the_written_kubeconfig() -> Result<()> {
    within(TEST_TIMEOUT, "the kubectl test", async {
        let env = TestEnv::from_env().await?;
        let namespace = TestNamespace::create(&env.client, "e2e-kubectl").await?;
        let output = kubectl(["get", "namespaces", "-o", "name"]).await?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "kubectl failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.lines().any(|line| line == "namespace/default"),
            "{stdout}"
        );
        assert!(
            stdout
                .lines()
                .any(|line| line == format!("namespace/{}", namespace.name())),
            "{stdout}"
        );
        namespace.delete().await
    })
    .await
}

#[tokio::test]
async fn a_dropped_test_namespace_is_deleted() -> Result<()> {
    within(TEST_TIMEOUT, "the namespace cleanup test", async {
        let env = TestEnv::from_env().await?;
        let namespace = TestNamespace::create(&env.client, "e2e-drop").await?;
        let name = namespace.name().to_owned();
        drop(namespace);
        if std::env::var("NUBABEL_E2E_KEEP_NAMESPACES").is_ok_and(|keep| keep == "1") {
            return Ok(());
        }
        let namespaces: Api<Namespace> = Api::all(env.client.clone());
        let terminating = namespaces
            .get_opt(&name)
            .await?
            .is_none_or(|namespace| namespace.metadata.deletion_timestamp.is_some());
        assert!(terminating, "namespace {name} was not deleted on drop");
        Ok(())
    })
    .await
}
