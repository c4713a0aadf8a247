//! The CRDs on a real Kubernetes 1.20 API server: they install, accept every example, reject
//! invalid manifests naming the field, print their columns and scale through `kubectl scale`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Resource, ResourceExt};
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar};
use nubabel_e2e::crds::install_crds;
use nubabel_e2e::{TestEnv, TestNamespace, kubectl, within};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

fn examples_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A cluster with the CRDs installed and a fresh namespace.
async fn setup(prefix: &str) -> Result<(TestEnv, TestNamespace)> {
    let env = TestEnv::from_env().await?;
    install_crds(&env.client).await?;
    let namespace = TestNamespace::create(&env.client, prefix).await?;
    Ok((env, namespace))
}

fn dynamic_api<K: Resource<DynamicType = ()>>(
    env: &TestEnv,
    namespace: &str,
) -> Api<DynamicObject> {
    Api::namespaced_with(env.client.clone(), namespace, &ApiResource::erase::<K>(&()))
}

/// Creates an object from raw JSON (so it may be invalid) and returns the API server's
/// rejection message.
async fn rejection_of<K: Resource<DynamicType = ()>>(
    env: &TestEnv,
    namespace: &str,
    manifest: serde_json::Value,
) -> Result<String> {
    let object: DynamicObject = serde_json::from_value(manifest)?;
    match dynamic_api::<K>(env, namespace)
        .create(&PostParams::default(), &object)
        .await
    {
        Ok(created) => anyhow::bail!("the API server accepted {}", created.name_any()),
        Err(kube::Error::Api(status)) => {
            ensure!(status.code == 422, "expected 422 Invalid, got {status:?}");
            Ok(status.message)
        }
        Err(other) => Err(other.into()),
    }
}

fn stdout_of(output: &std::process::Output) -> Result<String> {
    ensure!(
        output.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout.clone())?)
}

#[tokio::test]
async fn both_crds_install_and_become_established() -> Result<()> {
    let env = TestEnv::from_env().await?;
    within(LIMIT, "installing the CRDs", async {
        let names = install_crds(&env.client).await?;
        assert_eq!(
            names,
            ["delegatedtasks.nubabel.io", "opencodesidecars.nubabel.io"]
        );
        let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
        for name in names {
            let crd = crds.get(&name).await?;
            let accepted = crd
                .status
                .and_then(|s| s.accepted_names)
                .and_then(|names| names.short_names);
            assert!(
                accepted.is_some_and(|short| !short.is_empty()),
                "{name} has no short name"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn every_example_manifest_is_accepted_by_the_api_server() -> Result<()> {
    let (_env, namespace) = setup("crd-examples").await?;
    within(LIMIT, "applying the examples", async {
        let output = kubectl([
            "apply".as_ref(),
            "-n".as_ref(),
            namespace.name().as_ref(),
            "-f".as_ref(),
            examples_dir().as_os_str(),
        ])
        .await?;
        let applied = stdout_of(&output)?;
        let example_count = std::fs::read_dir(examples_dir())?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "yaml"))
            })
            .count();
        assert_eq!(
            applied.lines().count(),
            example_count,
            "kubectl said: {applied}"
        );

        let sidecar = namespace.api::<OpencodeSidecar>().get("acme").await?;
        assert_eq!(sidecar.spec.organization_id, "org-acme");
        assert_eq!(sidecar.spec.replicas, 2);
        let follow_up = namespace
            .api::<DelegatedTask>()
            .get("fix-flaky-test-2")
            .await?;
        assert_eq!(
            follow_up.spec.session_id.as_deref(),
            Some("nubabel-session-7f3a")
        );
        assert_eq!(follow_up.spec.context, None);
        let first = namespace
            .api::<DelegatedTask>()
            .get("fix-flaky-test-1")
            .await?;
        assert_eq!(
            first.spec.context,
            Some(json!({"source": "kubectl", "ticket": "PAY-1234"}))
        );
        let on_git = namespace
            .api::<DelegatedTask>()
            .get("fix-billing-test")
            .await?;
        let repository = &on_git.spec.workspace.unwrap().repositories[0];
        assert_eq!(repository.git_ref.as_deref(), Some("main"));
        assert_eq!(
            repository
                .credentials_secret_ref
                .as_ref()
                .map(|s| s.name.as_str()),
            Some("billing-git")
        );
        Ok(())
    })
    .await?;
    namespace.delete().await
}

#[tokio::test]
async fn the_api_server_fills_in_the_schema_defaults() -> Result<()> {
    let (env, namespace) = setup("crd-defaults").await?;
    within(LIMIT, "creating minimal objects", async {
        let tasks = dynamic_api::<DelegatedTask>(&env, namespace.name());
        let minimal: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "nubabel.io/v1alpha1",
            "kind": "DelegatedTask",
            "metadata": {"name": "minimal"},
            "spec": {"organizationId": "org-a", "prompt": "hello"}
        }))?;
        let created = tasks.create(&PostParams::default(), &minimal).await?;
        assert_eq!(created.data["spec"]["timeoutSeconds"], json!(600));
        assert_eq!(created.data["spec"]["cancel"], json!(false));

        let sidecars = dynamic_api::<OpencodeSidecar>(&env, namespace.name());
        let minimal: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "nubabel.io/v1alpha1",
            "kind": "OpencodeSidecar",
            "metadata": {"name": "minimal"},
            "spec": {"organizationId": "org-a", "model": "fake/fake-model"}
        }))?;
        let created = sidecars.create(&PostParams::default(), &minimal).await?;
        assert_eq!(created.data["spec"]["replicas"], json!(1));
        Ok(())
    })
    .await?;
    namespace.delete().await
}

#[tokio::test]
async fn a_task_without_a_prompt_is_rejected_naming_the_field() -> Result<()> {
    let (env, namespace) = setup("crd-invalid-task").await?;
    within(LIMIT, "creating invalid tasks", async {
        let missing = rejection_of::<DelegatedTask>(
            &env,
            namespace.name(),
            json!({
                "apiVersion": "nubabel.io/v1alpha1",
                "kind": "DelegatedTask",
                "metadata": {"name": "no-prompt"},
                "spec": {"organizationId": "org-a"}
            }),
        )
        .await?;
        assert!(missing.contains("spec.prompt"), "message: {missing}");
        assert!(missing.contains("Required value"), "message: {missing}");

        let empty = rejection_of::<DelegatedTask>(
            &env,
            namespace.name(),
            json!({
                "apiVersion": "nubabel.io/v1alpha1",
                "kind": "DelegatedTask",
                "metadata": {"name": "empty-prompt"},
                "spec": {"organizationId": "org-a", "prompt": ""}
            }),
        )
        .await?;
        assert!(empty.contains("spec.prompt"), "message: {empty}");

        let timeout = rejection_of::<DelegatedTask>(
            &env,
            namespace.name(),
            json!({
                "apiVersion": "nubabel.io/v1alpha1",
                "kind": "DelegatedTask",
                "metadata": {"name": "zero-timeout"},
                "spec": {"organizationId": "org-a", "prompt": "hi", "timeoutSeconds": 0}
            }),
        )
        .await?;
        assert!(
            timeout.contains("spec.timeoutSeconds"),
            "message: {timeout}"
        );
        Ok(())
    })
    .await?;
    namespace.delete().await
}

#[tokio::test]
async fn a_sidecar_with_negative_replicas_is_rejected_naming_the_field() -> Result<()> {
    let (env, namespace) = setup("crd-invalid-ocs").await?;
    within(LIMIT, "creating an invalid sidecar", async {
        let message = rejection_of::<OpencodeSidecar>(
            &env,
            namespace.name(),
            json!({
                "apiVersion": "nubabel.io/v1alpha1",
                "kind": "OpencodeSidecar",
                "metadata": {"name": "negative"},
                "spec": {"organizationId": "org-a", "model": "fake/fake-model", "replicas": -1}
            }),
        )
        .await?;
        assert!(message.contains("spec.replicas"), "message: {message}");
        assert!(
            message.contains("greater than or equal to 0"),
            "message: {message}"
        );

        // kubectl users see the same message.
        let manifest = namespace_dir_file(
            "negative.yaml",
            "apiVersion: nubabel.io/v1alpha1\nkind: OpencodeSidecar\nmetadata:\n  name: negative\n\
             spec:\n  organizationId: org-a\n  model: fake/fake-model\n  replicas: -3\n",
        )?;
        let output = kubectl([
            "apply".as_ref(),
            "-n".as_ref(),
            namespace.name().as_ref(),
            "-f".as_ref(),
            manifest.path().as_os_str(),
        ])
        .await?;
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("spec.replicas"), "kubectl said: {stderr}");
        Ok(())
    })
    .await?;
    namespace.delete().await
}

fn namespace_dir_file(name: &str, content: &str) -> Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new().suffix(name).tempfile()?;
    std::io::Write::write_all(&mut file, content.as_bytes())?;
    Ok(file)
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() -> Result<()> {
    let (_env, namespace) = setup("crd-columns").await?;
    within(LIMIT, "printing columns", async {
        let ns = namespace.name();
        stdout_of(
            &kubectl([
                "apply".as_ref(),
                "-n".as_ref(),
                ns.as_ref(),
                "-f".as_ref(),
                examples_dir().as_os_str(),
            ])
            .await?,
        )?;
        // Status is written through the status subresource, as the operator will.
        let tasks = namespace.api::<DelegatedTask>();
        tasks
            .patch_status(
                "fix-flaky-test-1",
                &PatchParams::apply("nubabel-e2e"),
                &Patch::Apply(json!({
                    "apiVersion": "nubabel.io/v1alpha1",
                    "kind": "DelegatedTask",
                    "status": {
                        "phase": "Running",
                        "sidecar": "acme",
                        "progress": {"events": 9, "toolsStarted": 4, "toolsCompleted": 3}
                    }
                })),
            )
            .await
            .context("patching the task status")?;

        let listing = stdout_of(&kubectl(["get", "ocs,dtask", "-n", ns]).await?)?;
        for header in [
            "ORGANIZATION",
            "DESIRED",
            "READY",
            "STATUS",
            "PHASE",
            "SIDECAR",
            "SESSION",
            "TOOLS",
            "AGE",
        ] {
            assert!(
                listing.contains(header),
                "no {header} column in:\n{listing}"
            );
        }
        let row = listing
            .lines()
            .find(|line| line.contains("fix-flaky-test-1"))
            .context("no row for fix-flaky-test-1")?;
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            &cells[1..5],
            ["Running", "acme", "nubabel-session-7f3a", "3"],
            "row: {row}"
        );

        let wide = stdout_of(&kubectl(["get", "dtask", "-n", ns, "-o", "wide"]).await?)?;
        assert!(wide.contains("OPENCODE-SESSION"), "wide listing:\n{wide}");

        // The category lists both kinds.
        let by_category = stdout_of(&kubectl(["get", "nubabel", "-n", ns, "-o", "name"]).await?)?;
        assert!(
            by_category.contains("opencodesidecar.nubabel.io/acme"),
            "{by_category}"
        );
        assert!(
            by_category.contains("delegatedtask.nubabel.io/summarize-readme"),
            "{by_category}"
        );
        Ok(())
    })
    .await?;
    namespace.delete().await
}

#[tokio::test]
async fn kubectl_scale_changes_spec_replicas_through_the_scale_subresource() -> Result<()> {
    let (_env, namespace) = setup("crd-scale").await?;
    within(LIMIT, "scaling a sidecar", async {
        let ns = namespace.name();
        let sidecar = examples_dir().join("opencodesidecar.yaml");
        stdout_of(
            &kubectl(["apply".as_ref(), "-n".as_ref(), ns.as_ref(), "-f".as_ref(), sidecar.as_os_str()])
                .await?,
        )?;
        let scaled = stdout_of(&kubectl(["scale", "ocs", "acme", "--replicas=3", "-n", ns]).await?)?;
        assert!(scaled.contains("scaled"), "kubectl said: {scaled}");

        let sidecars = namespace.api::<OpencodeSidecar>();
        assert_eq!(sidecars.get("acme").await?.spec.replicas, 3);
        let scale = sidecars.get_scale("acme").await?;
        assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));

        // The scale subresource reads status.replicas and status.selector, which autoscalers use.
        sidecars
            .patch_status(
                "acme",
                &PatchParams::apply("nubabel-e2e"),
                &Patch::Apply(json!({
                    "apiVersion": "nubabel.io/v1alpha1",
                    "kind": "OpencodeSidecar",
                    "status": {"replicas": 2, "readyReplicas": 1, "selector": "app.kubernetes.io/instance=acme"}
                })),
            )
            .await?;
        let status = sidecars.get_scale("acme").await?.status.context("no scale status")?;
        assert_eq!(status.replicas, 2);
        assert_eq!(status.selector.as_deref(), Some("app.kubernetes.io/instance=acme"));

        let refused = kubectl(["scale", "ocs", "acme", "--replicas=-1", "-n", ns]).await?;
        assert!(!refused.status.success());
        assert_eq!(sidecars.get("acme").await?.spec.replicas, 3);
        Ok(())
    })
    .await?;
    namespace.delete().await
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() -> Result<()> {
    let env = TestEnv::from_env().await?;
    install_crds(&env.client).await?;
    within(LIMIT, "explaining fields", async {
        // The API server adds each CRD's schema to its OpenAPI document a moment after the CRD
        // is established, one CRD at a time, and nothing can be watched for that: poll kubectl.
        for (field, wanted) in [
            ("dtask.spec.sessionId", "continue"),
            ("ocs.spec.replicas", "0 suspends the fleet"),
        ] {
            let mut interval = tokio::time::interval(Duration::from_millis(500));
            let text = loop {
                interval.tick().await;
                let output = kubectl(["explain", field]).await?;
                if output.status.success() {
                    break String::from_utf8(output.stdout)?;
                }
            };
            assert!(text.contains(wanted), "explain {field} said: {text}");
        }
        Ok(())
    })
    .await
}
