//! The Helm chart: it lints and renders with the default, all-features and local values, its
//! schema rejects wrong types, it picks the API versions each Kubernetes version serves, its
//! RBAC is the operator's documented least privilege, its defaults agree with the binaries' own,
//! and a real Kubernetes 1.20 API server accepts every manifest it renders for that cluster.
//! The Dockerfiles are checked against the chart and the operator's pod spec constants.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use nubabel_e2e::crds::install_crds;
use nubabel_e2e::testing::server_minor_version;
use nubabel_e2e::tools::ToolPaths;
use nubabel_e2e::{DEFAULT_WAIT, TestEnv, TestNamespace, await_condition, kubectl, within};
use nubabel_operator::controller::fleet;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(180);
const RELEASE: &str = "nubabel";
const NAMESPACE: &str = "nubabel-system";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart_dir() -> PathBuf {
    workspace().join("charts/nubabel-opencode-operator")
}

fn read(relative: &str) -> String {
    let path = workspace().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The values files the tests render with, as `helm -f` arguments.
fn values_args(name: &str) -> Vec<String> {
    match name {
        "default" => vec![],
        "all-features" => vec!["-f".into(), "ci/all-features-values.yaml".into()],
        "local" => vec!["-f".into(), "values-local.yaml".into()],
        other => panic!("unknown values set {other}"),
    }
}

const VALUE_SETS: [&str; 3] = ["default", "all-features", "local"];

/// Runs helm in the chart directory; returns stdout, or an error with stderr.
async fn helm<S: AsRef<str>>(args: &[S]) -> Result<String> {
    let program = ToolPaths::from_env()
        .helm()
        .unwrap_or_else(|_| PathBuf::from("helm"));
    let mut command = tokio::process::Command::new(&program);
    command
        .args(args.iter().map(AsRef::as_ref))
        .current_dir(chart_dir())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .map_err(|_| anyhow!("helm did not finish within 60 s"))?
        .with_context(|| format!("running {}", program.display()))?;
    ensure!(
        output.status.success(),
        "helm {} failed: {}",
        args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// `helm template` of the release into `namespace` with `extra` arguments.
async fn template(namespace: &str, extra: &[String]) -> Result<String> {
    let mut args: Vec<String> = ["template", RELEASE, ".", "--namespace", namespace]
        .map(String::from)
        .to_vec();
    args.extend_from_slice(extra);
    helm(&args).await
}

/// The non-empty documents of a multi-document YAML stream.
fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("parsing rendered YAML: {e}\n{yaml}"))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kind_named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn env_of(deployment: &Value) -> BTreeMap<String, Value> {
    container(deployment)["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

fn env_value(deployment: &Value, name: &str) -> String {
    env_of(deployment)
        .get(name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("env {name} has no literal value"))
        .to_owned()
}

/// Every `env = "NAME"` a clap config reads.
fn env_names_read_by(config_rs: &str) -> BTreeSet<String> {
    read(config_rs)
        .split("env = \"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect()
}

fn label_list(labels: &Value) -> BTreeMap<String, String> {
    labels
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

fn parse_label_list(text: &str) -> BTreeMap<String, String> {
    text.split(',')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn values(file: &str) -> Value {
    serde_saphyr::from_str(&read(&format!("charts/nubabel-opencode-operator/{file}"))).unwrap()
}

#[tokio::test]
async fn the_chart_lints_strictly_with_default_all_features_and_local_values() -> Result<()> {
    for set in VALUE_SETS {
        let mut args = vec!["lint".to_owned(), ".".to_owned(), "--strict".to_owned()];
        args.extend(values_args(set));
        let out = helm(&args).await.with_context(|| format!("values {set}"))?;
        assert!(out.contains("0 chart(s) failed"), "{set}: {out}");
    }
    Ok(())
}

#[tokio::test]
async fn every_value_set_renders_both_deployments_and_the_callback_api_service() -> Result<()> {
    for set in VALUE_SETS {
        let docs = documents(&template(NAMESPACE, &values_args(set)).await?);
        kind_named(&docs, "Deployment", "nubabel-operator");
        kind_named(&docs, "Deployment", "nubabel-callback-api");
        kind_named(&docs, "Service", "nubabel-callback-api");
        kind_named(&docs, "ServiceAccount", "nubabel-operator");
    }
    Ok(())
}

#[tokio::test]
async fn optional_objects_appear_only_when_their_feature_is_on() -> Result<()> {
    let optional = [
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    ];
    let default = documents(&template(NAMESPACE, &values_args("default")).await?);
    let all = documents(&template(NAMESPACE, &values_args("all-features")).await?);
    for kind in optional {
        assert!(
            of_kind(&default, kind).is_empty(),
            "{kind} rendered by default"
        );
        assert!(
            !of_kind(&all, kind).is_empty(),
            "{kind} missing with all features"
        );
    }
    assert_eq!(of_kind(&all, "ServiceMonitor").len(), 2);
    assert_eq!(of_kind(&all, "NetworkPolicy").len(), 2);
    // With an HPA the Deployment leaves replicas to it.
    let api = kind_named(&all, "Deployment", "nubabel-callback-api");
    assert!(api["spec"].get("replicas").is_none());
    Ok(())
}

#[tokio::test]
async fn the_admin_api_and_callbacks_are_reachable_only_by_their_own_peers() -> Result<()> {
    // By default the admin API listens on loopback: no other pod reaches it.
    let default = documents(&template(NAMESPACE, &values_args("default")).await?);
    let api = kind_named(&default, "Deployment", "nubabel-callback-api");
    assert_eq!(env_value(api, "NUBABEL_ADMIN_HTTP_ADDR"), "127.0.0.1:8081");
    assert_eq!(
        env_value(api, "NUBABEL_CALLBACK_API_HTTP_ADDR"),
        "0.0.0.0:8080"
    );

    // Opened to the cluster, the admin port admits only admin.clients, and sidecar pods are
    // admitted only from tenant namespaces, never from every namespace.
    let all = documents(&template(NAMESPACE, &values_args("all-features")).await?);
    let api = kind_named(&all, "Deployment", "nubabel-callback-api");
    assert_eq!(env_value(api, "NUBABEL_ADMIN_HTTP_ADDR"), "0.0.0.0:8081");
    let policy = kind_named(&all, "NetworkPolicy", "nubabel-callback-api");
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let api_rule = rules
        .iter()
        .find(|rule| rule["ports"][0]["port"] == "http")
        .expect("a rule for the API port");
    let sidecars = &api_rule["from"][0];
    assert_eq!(
        sidecars["namespaceSelector"],
        json!({"matchLabels": {"nubabel.io/tenant": "true"}})
    );
    assert_eq!(
        sidecars["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "opencode-sidecar"
    );
    let admin_rules: Vec<&Value> = rules
        .iter()
        .filter(|rule| rule["ports"][0]["port"] == "admin")
        .collect();
    assert_eq!(admin_rules.len(), 1);
    assert_eq!(
        admin_rules[0]["from"],
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "platform-admin"}}}])
    );
    Ok(())
}

#[tokio::test]
async fn both_deployments_run_restricted_with_probes_and_limits() -> Result<()> {
    for set in VALUE_SETS {
        let docs = documents(&template(NAMESPACE, &values_args(set)).await?);
        for name in ["nubabel-operator", "nubabel-callback-api"] {
            let deployment = kind_named(&docs, "Deployment", name);
            let pod = &deployment["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{set} {name}");
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"],
                "RuntimeDefault"
            );
            let c = container(deployment);
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{set} {name}");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
            assert_eq!(sc["readOnlyRootFilesystem"], true);
            assert_eq!(sc["runAsNonRoot"], true);
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
            assert_eq!(
                c["readinessProbe"]["httpGet"]["path"], "/readyz",
                "{set} {name}"
            );
            assert_eq!(
                c["livenessProbe"]["httpGet"]["path"], "/healthz",
                "{set} {name}"
            );
            for resource in ["cpu", "memory"] {
                assert!(
                    c["resources"]["limits"][resource].is_string(),
                    "{set} {name}"
                );
                assert!(
                    c["resources"]["requests"][resource].is_string(),
                    "{set} {name}"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_chart_sets_only_environment_variables_the_binaries_read() -> Result<()> {
    let operator_reads = env_names_read_by("operator/src/config.rs");
    let api_reads = env_names_read_by("callback-api/src/config.rs");
    let generic = ["RUST_LOG", "RUST_BACKTRACE"];
    for set in VALUE_SETS {
        let docs = documents(&template(NAMESPACE, &values_args(set)).await?);
        for (name, reads, required) in [
            (
                "nubabel-operator",
                &operator_reads,
                &["NUBABEL_SIGNING_MASTER_KEY", "NUBABEL_DATABASE_URL"][..],
            ),
            (
                "nubabel-callback-api",
                &api_reads,
                &[
                    "NUBABEL_DATABASE_URL",
                    "NUBABEL_REDIS_URL",
                    "NUBABEL_SIGNING_MASTER_KEY",
                    "NUBABEL_STREAM_TOKEN_KEY",
                ][..],
            ),
        ] {
            let env = env_of(kind_named(&docs, "Deployment", name));
            for key in env.keys() {
                assert!(
                    reads.contains(key) || generic.contains(&key.as_str()),
                    "{set}: {name} sets {key}, which its config does not read"
                );
            }
            for key in required {
                assert!(
                    env[*key]["valueFrom"]["secretKeyRef"]["name"].is_string(),
                    "{set}: {name} must read {key} from a Secret"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn secrets_come_from_the_charts_secret_or_the_named_existing_ones() -> Result<()> {
    let default = documents(&template(NAMESPACE, &values_args("default")).await?);
    let secret = kind_named(&default, "Secret", "nubabel-credentials");
    let keys: BTreeSet<&str> = secret["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "database-url",
            "redis-url",
            "signing-master-key",
            "stream-token-key"
        ])
    );
    let all = documents(&template(NAMESPACE, &values_args("all-features")).await?);
    let env = env_of(kind_named(&all, "Deployment", "nubabel-callback-api"));
    let reference = |name: &str| env[name]["valueFrom"]["secretKeyRef"].clone();
    assert_eq!(
        reference("NUBABEL_DATABASE_URL"),
        json!({"name": "nubabel-database", "key": "url"})
    );
    assert_eq!(
        reference("NUBABEL_REDIS_URL"),
        json!({"name": "nubabel-redis", "key": "redis-url"})
    );
    assert_eq!(
        reference("NUBABEL_SIGNING_MASTER_KEY")["name"],
        "nubabel-credentials"
    );
    // Both binaries read the same master key.
    let operator_env = env_of(kind_named(&all, "Deployment", "nubabel-operator"));
    assert_eq!(
        operator_env["NUBABEL_SIGNING_MASTER_KEY"]["valueFrom"],
        env["NUBABEL_SIGNING_MASTER_KEY"]["valueFrom"]
    );
    // The Slack bot's credentials come from the Secret the values name.
    assert_eq!(
        reference("NUBABEL_SLACK_BOT_TOKEN"),
        json!({"name": "nubabel-slack", "key": "slack-bot-token"})
    );
    assert_eq!(
        reference("NUBABEL_SLACK_SIGNING_SECRET"),
        json!({"name": "nubabel-slack", "key": "slack-signing-secret"})
    );
    // Only what no existing Secret provides is kept in the chart's Secret.
    let kept = kind_named(&all, "Secret", "nubabel-credentials")["data"].clone();
    assert!(kept.get("database-url").is_none() && kept.get("redis-url").is_none());

    let short = template(
        NAMESPACE,
        &["--set".into(), "signing.masterKey=short".into()],
    )
    .await;
    assert!(format!("{:#}", short.unwrap_err()).contains("at least 32 characters"));
    Ok(())
}

#[tokio::test]
async fn the_operator_tells_sidecars_where_the_callback_api_is_and_which_pods_to_trust()
-> Result<()> {
    let docs = documents(&template(NAMESPACE, &values_args("default")).await?);
    let operator = kind_named(&docs, "Deployment", "nubabel-operator");
    let api = kind_named(&docs, "Deployment", "nubabel-callback-api");
    let service = kind_named(&docs, "Service", "nubabel-callback-api");

    let port = service["spec"]["ports"][0]["port"].as_i64().unwrap();
    assert_eq!(
        env_value(operator, "NUBABEL_CALLBACK_URL"),
        format!("http://nubabel-callback-api.{NAMESPACE}.svc:{port}")
    );
    // The Service reaches the API's named port.
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(container(api)["ports"][0]["name"], "http");

    // Sidecar NetworkPolicies name these labels: they must select the chart's pods.
    let api_pod_labels = label_list(&api["spec"]["template"]["metadata"]["labels"]);
    let told = parse_label_list(&env_value(operator, "NUBABEL_CALLBACK_API_POD_LABELS"));
    assert!(told.iter().all(|(k, v)| api_pod_labels.get(k) == Some(v)));
    assert_eq!(told, label_list(&service["spec"]["selector"]));
    let operator_pod_labels = label_list(&operator["spec"]["template"]["metadata"]["labels"]);
    let told = parse_label_list(&env_value(operator, "NUBABEL_OPERATOR_POD_LABELS"));
    assert!(!told.is_empty());
    assert!(
        told.iter()
            .all(|(k, v)| operator_pod_labels.get(k) == Some(v))
    );

    // Installed as `nubabel` in nubabel-system, the chart matches the operator's own defaults.
    let config = read("operator/src/config.rs");
    for (env, value) in [
        (
            "NUBABEL_CALLBACK_URL",
            env_value(operator, "NUBABEL_CALLBACK_URL"),
        ),
        (
            "NUBABEL_SIDECAR_IMAGE",
            env_value(operator, "NUBABEL_SIDECAR_IMAGE"),
        ),
        (
            "NUBABEL_BRIDGE_IMAGE",
            env_value(operator, "NUBABEL_BRIDGE_IMAGE"),
        ),
        (
            "NUBABEL_PLUGIN_DIR",
            env_value(operator, "NUBABEL_PLUGIN_DIR"),
        ),
    ] {
        assert!(
            config.contains(&format!("default_value = \"{value}\"")),
            "{env}={value} is not the operator's default"
        );
    }

    let elsewhere = documents(
        &template(
            "tenants-ops",
            &["--set".into(), "callbackApi.service.port=9090".into()],
        )
        .await?,
    );
    assert_eq!(
        env_value(
            kind_named(&elsewhere, "Deployment", "nubabel-operator"),
            "NUBABEL_CALLBACK_URL"
        ),
        "http://nubabel-callback-api.tenants-ops.svc:9090"
    );
    Ok(())
}

#[tokio::test]
async fn leader_election_is_on_by_default_and_required_for_two_replicas() -> Result<()> {
    let docs = documents(&template(NAMESPACE, &values_args("all-features")).await?);
    let operator = kind_named(&docs, "Deployment", "nubabel-operator");
    assert_eq!(operator["spec"]["replicas"], 2);
    assert_eq!(env_value(operator, "NUBABEL_LEADER_ELECT"), "true");
    let lease = env_value(operator, "NUBABEL_LEASE_NAME");
    let role = kind_named(&docs, "Role", "nubabel-operator-leader-election");
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|rule| rule["resourceNames"] == json!([lease]))
    );

    let refused = template(
        NAMESPACE,
        &[
            "--set".into(),
            "operator.replicas=2".into(),
            "--set".into(),
            "operator.leaderElection.enabled=false".into(),
        ],
    )
    .await;
    assert!(format!("{:#}", refused.unwrap_err()).contains("leaderElection"));
    Ok(())
}

#[tokio::test]
async fn the_values_schema_rejects_wrong_types_and_unknown_keys() -> Result<()> {
    for (set, complaint) in [
        ("operator.replicas=two", "/operator/replicas"),
        ("networkPolicy.enabled=yes", "/networkPolicy/enabled"),
        ("callbackApi.service.port=0", "/callbackApi/service/port"),
        ("logFormat=yaml", "/logFormat"),
        ("operator.replica=2", "replica"),
    ] {
        let result = template(NAMESPACE, &["--set-string".into(), set.into()]).await;
        let error = format!("{:#}", result.expect_err(set));
        assert!(error.contains(complaint), "{set}: {error}");
    }
    Ok(())
}

/// apiVersion of the one object of `kind`.
fn api_version_of(docs: &[Value], kind: &str) -> String {
    let objects = of_kind(docs, kind);
    assert_eq!(objects.len(), 1, "{kind}");
    objects[0]["apiVersion"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn api_versions_follow_what_each_kubernetes_version_serves() -> Result<()> {
    for (kube_version, pdb, hpa) in [
        ("1.20.2", "policy/v1beta1", "autoscaling/v2beta2"),
        ("1.21.0", "policy/v1", "autoscaling/v2beta2"),
        ("1.23.0", "policy/v1", "autoscaling/v2"),
        ("1.35.0", "policy/v1", "autoscaling/v2"),
    ] {
        let mut args = values_args("all-features");
        args.extend(["--kube-version".into(), kube_version.into()]);
        let docs = documents(&template(NAMESPACE, &args).await?);
        assert_eq!(
            api_version_of(&docs, "PodDisruptionBudget"),
            pdb,
            "{kube_version}"
        );
        assert_eq!(
            api_version_of(&docs, "HorizontalPodAutoscaler"),
            hpa,
            "{kube_version}"
        );
    }
    Ok(())
}

/// (apiGroup, resource, verb) triples a set of RBAC rules grants.
fn grants(rules: &Value) -> BTreeSet<(String, String, String)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for rule in rules.as_array().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

/// The rules of the roles bound to `subject` (a ServiceAccount name), and whether each grant
/// reaches the whole cluster.
fn rules_bound_to(docs: &[Value], subject: &str) -> Vec<(Value, bool)> {
    let mut out = Vec::new();
    for binding in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        if !binding["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == subject)
        {
            continue;
        }
        let role = kind_named(
            docs,
            binding["roleRef"]["kind"].as_str().unwrap(),
            binding["roleRef"]["name"].as_str().unwrap(),
        );
        out.push((
            role["rules"].clone(),
            binding["kind"] == "ClusterRoleBinding",
        ));
    }
    out
}

#[tokio::test]
async fn the_operators_rbac_is_exactly_what_operator_rbac_yaml_documents() -> Result<()> {
    let documented: BTreeSet<_> = documents(&read("operator/rbac.yaml"))
        .iter()
        .flat_map(|role| grants(&role["rules"]))
        .collect();
    for set in VALUE_SETS {
        let docs = documents(&template(NAMESPACE, &values_args(set)).await?);
        let granted: BTreeSet<_> = rules_bound_to(&docs, "nubabel-operator")
            .iter()
            .flat_map(|(rules, _)| grants(rules))
            .collect();
        assert_eq!(granted, documented, "{set}");
    }
    Ok(())
}

#[tokio::test]
async fn rbac_has_no_wildcards_no_cluster_wide_secret_access_and_a_reason_per_rule() -> Result<()> {
    for set in VALUE_SETS {
        let text = template(NAMESPACE, &values_args(set)).await?;
        let docs = documents(&text);
        for role in docs
            .iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        {
            for (group, resource, verb) in grants(&role["rules"]) {
                assert!(
                    ![&group, &resource, &verb].iter().any(|s| s.contains('*')),
                    "{set}: wildcard in {}",
                    role["metadata"]["name"]
                );
            }
        }
        for subject in ["nubabel-operator", "nubabel-callback-api"] {
            for (rules, cluster_wide) in rules_bound_to(&docs, subject) {
                let secrets = grants(&rules).iter().any(|(_, r, _)| r == "secrets");
                assert!(
                    !(secrets && cluster_wide),
                    "{set}: {subject} may read Secrets cluster-wide"
                );
            }
        }
        // The callback API writes task status, creates and watches tasks (/api/delegate, the
        // Slack bot) and reads sidecars' models; with the Slack bot on it also publishes events
        // (a refused channel); nothing else.
        let api: BTreeSet<_> = rules_bound_to(&docs, "nubabel-callback-api")
            .iter()
            .flat_map(|(rules, _)| grants(rules))
            .collect();
        let grant = |group: &str, resource: &str, verb: &str| {
            (group.to_owned(), resource.to_owned(), verb.to_owned())
        };
        let mut expected = BTreeSet::from([
            grant("nubabel.io", "delegatedtasks/status", "patch"),
            grant("nubabel.io", "delegatedtasks", "create"),
            grant("nubabel.io", "delegatedtasks", "get"),
            grant("nubabel.io", "delegatedtasks", "list"),
            grant("nubabel.io", "delegatedtasks", "watch"),
            grant("nubabel.io", "opencodesidecars", "get"),
        ]);
        if set == "all-features" {
            expected.insert(grant("events.k8s.io", "events", "create"));
            expected.insert(grant("events.k8s.io", "events", "patch"));
        }
        assert_eq!(api, expected, "{set}");
        // Every rule says why, in the comment right above it.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                assert!(
                    lines[i - 1].trim_start().starts_with('#'),
                    "{set}: rule without a comment: {line} (after {:?})",
                    lines[i - 1]
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn secret_access_is_granted_per_tenant_namespace_or_cluster_wide_on_request() -> Result<()> {
    let docs = documents(
        &template(
            NAMESPACE,
            &[
                "--set".into(),
                "rbac.secretNamespaces={team-a,team-b}".into(),
            ],
        )
        .await?,
    );
    let bound: BTreeSet<String> = docs
        .iter()
        .filter(|d| {
            d["kind"] == "RoleBinding" && d["roleRef"]["name"] == "nubabel-operator-secrets"
        })
        .map(|d| d["metadata"]["namespace"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        bound,
        BTreeSet::from([NAMESPACE.into(), "team-a".into(), "team-b".into()])
    );

    let docs = documents(
        &template(
            NAMESPACE,
            &["--set".into(), "rbac.clusterWideSecrets=true".into()],
        )
        .await?,
    );
    kind_named(&docs, "ClusterRoleBinding", "nubabel-operator-secrets");

    // One watched namespace: the operator's and the status mirror's rules are bound there only.
    let docs = documents(
        &template(
            NAMESPACE,
            &["--set".into(), "operator.watchNamespace=team-a".into()],
        )
        .await?,
    );
    for name in [
        "nubabel-operator",
        "nubabel-callback-api-status-mirror",
        "nubabel-callback-api-tasks",
    ] {
        assert_eq!(
            kind_named(&docs, "RoleBinding", name)["metadata"]["namespace"],
            "team-a"
        );
    }
    assert_eq!(
        env_value(
            kind_named(&docs, "Deployment", "nubabel-operator"),
            "NUBABEL_WATCH_NAMESPACE"
        ),
        "team-a"
    );
    Ok(())
}

/// The instructions of a Dockerfile's final stage, continuation lines joined.
fn final_stage(dockerfile: &str) -> Vec<(String, String)> {
    let text = read(&format!("docker/{dockerfile}")).replace("\\\n", " ");
    let instructions: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (instruction, rest) = l.split_once(' ').unwrap_or((l, ""));
            (instruction.to_uppercase(), rest.trim().to_owned())
        })
        .collect();
    let last_from = instructions.iter().rposition(|(i, _)| i == "FROM").unwrap();
    instructions[last_from..].to_vec()
}

fn instruction(stage: &[(String, String)], name: &str) -> String {
    stage
        .iter()
        .rev()
        .find(|(i, _)| i == name)
        .map(|(_, args)| args.clone())
        .unwrap_or_else(|| panic!("no {name} in the final stage"))
}

/// The `("ENV", "/path")` pairs of `STATE_DIRS` in the pod spec builder.
fn pod_spec_state_dirs() -> Vec<(String, String)> {
    let source = read("operator/src/controller/sidecar/build.rs");
    let start = source.find("pub const STATE_DIRS").unwrap();
    let block = &source[start..start + source[start..].find("];").unwrap()];
    block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("(\""))
        .map(|l| {
            let parts: Vec<&str> = l.split('"').collect();
            (parts[0].to_owned(), parts[2].to_owned())
        })
        .collect()
}

#[test]
fn the_rust_images_run_as_the_charts_user_on_the_charts_ports() {
    let values = values("values.yaml");
    let user = values["podSecurityContext"]["runAsUser"].as_i64().unwrap();
    let group = values["podSecurityContext"]["runAsGroup"].as_i64().unwrap();
    for (file, binary, port) in [
        (
            "operator.Dockerfile",
            "nubabel-operator",
            &values["operator"]["httpPort"],
        ),
        (
            "callback-api.Dockerfile",
            "nubabel-callback-api",
            &values["callbackApi"]["httpPort"],
        ),
    ] {
        let stage = final_stage(file);
        assert_eq!(
            instruction(&stage, "USER"),
            format!("{user}:{group}"),
            "{file}"
        );
        assert_eq!(instruction(&stage, "EXPOSE"), port.to_string(), "{file}");
        assert_eq!(
            instruction(&stage, "ENTRYPOINT"),
            format!("[\"/usr/local/bin/{binary}\"]"),
            "{file}"
        );
        assert!(read(&format!("docker/{file}")).contains(&format!("--bin {binary}")));
    }
}

#[test]
fn the_bridge_image_runs_as_the_pod_user_on_the_bridge_port_without_a_command() {
    let uid = fleet::RUN_AS_USER.to_string();
    let stage = final_stage("bridge.Dockerfile");
    assert_eq!(instruction(&stage, "USER"), format!("{uid}:{uid}"));
    assert_eq!(
        instruction(&stage, "EXPOSE"),
        fleet::BRIDGE_PORT.to_string()
    );
    // The pod spec gives the bridge container no command: the entrypoint must be the bridge.
    assert_eq!(
        instruction(&stage, "ENTRYPOINT"),
        "[\"/usr/local/bin/nubabel-bridge\"]"
    );
    assert!(read("docker/bridge.Dockerfile").contains("--bin nubabel-bridge"));
}

#[test]
fn the_sidecar_image_matches_the_operators_pod_spec_and_the_charts_sidecar_values() {
    let dockerfile = read("docker/opencode-sidecar.Dockerfile");
    let stage = final_stage("opencode-sidecar.Dockerfile");
    let uid = fleet::RUN_AS_USER.to_string();
    let data = fleet::DATA_MOUNT.to_string();

    assert_eq!(instruction(&stage, "USER"), format!("{uid}:{uid}"));
    assert!(dockerfile.contains(&format!("useradd --uid {uid} --gid {uid}")));
    // The data volume's mount point exists in the image and belongs to that user.
    assert!(dockerfile.contains(&format!("install -d -o {uid} -g {uid} -m 0770 {data}\n")));
    assert_eq!(
        instruction(&stage, "EXPOSE"),
        fleet::OPENCODE_PORT.to_string()
    );
    // The opencode container's command is `opencode`: it must be on PATH.
    assert!(dockerfile.contains("COPY --from=npm /out/opencode /usr/local/bin/opencode"));
    assert_eq!(instruction(&stage, "ENTRYPOINT"), "[\"opencode\"]");
    // HOME and XDG_* agree with what the operator sets.
    let env = instruction(&stage, "ENV");
    for (name, path) in pod_spec_state_dirs() {
        assert!(path.starts_with(&data), "{name}");
        assert!(env.contains(&format!("{name}={path} ")), "{name}={path}");
    }
    for tool in ["git", "bash", "ripgrep", "ca-certificates"] {
        assert!(
            dockerfile
                .lines()
                .any(|l| l.contains("apt-get install") && l.contains(&format!(" {tool}"))),
            "{tool} is not installed"
        );
    }

    // Plugins are installed where the chart and the operator look for them, without scripts.
    let values = values("values.yaml");
    let plugin_dir = values["sidecar"]["pluginDir"].as_str().unwrap();
    assert!(read("operator/src/config.rs").contains(&format!("default_value = \"{plugin_dir}\"")));
    assert!(dockerfile.contains(&format!(
        "npm install --no-audit --no-fund --ignore-scripts --prefix {plugin_dir}"
    )));
    assert!(dockerfile.contains(&format!("COPY --from=npm {plugin_dir} {plugin_dir}\n")));

    // The local stack runs the same plugin and language server releases as the image, and
    // the image puts the language server on PATH, where OpenCode looks for it.
    let install_deps = read("scripts/install-deps.sh");
    for (arg, variable) in [
        ("OH_MY_OPENCODE_VERSION", "OH_MY_OPENCODE_VERSION"),
        ("PYRIGHT_VERSION", "PYRIGHT_VERSION"),
    ] {
        let pinned = dockerfile
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ARG {arg}=")))
            .unwrap_or_else(|| panic!("the image pins no {arg}"));
        assert!(
            install_deps.contains(&format!("\n{variable}={pinned}\n")),
            "scripts/install-deps.sh installs another {variable} than the image's {pinned}"
        );
    }
    assert!(dockerfile.contains("/usr/local/bin/pyright-langserver"));
    assert!(
        dockerfile
            .lines()
            .any(|l| l.contains("apt-get install") && l.contains(" nodejs")),
        "the language server needs node"
    );

    // The image's OpenCode version is the chart's sidecar tag.
    let tag = values["sidecar"]["image"]["tag"].as_str().unwrap();
    assert!(dockerfile.contains(&format!("ARG OPENCODE_VERSION={tag}\n")));
}

/// A stand-in for the Prometheus Operator's ServiceMonitor CRD (any spec accepted), so the
/// ServiceMonitors render against the live cluster and reach the API server.
fn service_monitor_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {
                "plural": "servicemonitors",
                "singular": "servicemonitor",
                "kind": "ServiceMonitor",
                "listKind": "ServiceMonitorList"
            },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": true
                }}
            }]
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn the_api_server_accepts_every_manifest_rendered_for_it() -> Result<()> {
    let env = TestEnv::from_env().await?;
    within(LIMIT, "dry-running the chart on the API server", async {
        install_crds(&env.client).await?;
        let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
        let stand_in = service_monitor_crd();
        crds.patch(
            "servicemonitors.monitoring.coreos.com",
            &PatchParams::apply("nubabel-e2e").force(),
            &Patch::Apply(&stand_in),
        )
        .await?;
        await_condition(
            &crds,
            "servicemonitors.monitoring.coreos.com",
            "the ServiceMonitor stand-in CRD to be Established",
            kube::runtime::wait::conditions::is_crd_established(),
            DEFAULT_WAIT,
        )
        .await?;
        let namespace = TestNamespace::create(&env.client, "chart").await?;
        let ns = namespace.name().to_owned();
        let minor = server_minor_version(&env.client).await?;

        let renders = [
            ("default", values_args("default")),
            ("all-features", values_args("all-features")),
            ("local", values_args("local")),
            (
                "one watched namespace",
                vec![
                    "--set".into(),
                    format!("operator.watchNamespace={ns}"),
                    "--set".into(),
                    format!("rbac.secretNamespaces={{{ns}}}"),
                ],
            ),
        ];
        // The chart's CRDs (Helm applies crds/ as it is, before the templates).
        let output = kubectl([
            "apply",
            "--dry-run=server",
            "-f",
            chart_dir().join("crds").to_str().unwrap(),
        ])
        .await?;
        ensure!(
            output.status.success(),
            "the API server refused the chart's CRDs: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout)
                .matches("(server dry run)")
                .count(),
            2
        );

        let dir = tempfile::tempdir()?;
        for (set, values) in renders {
            // Rendered against the live cluster: its capabilities pick the API versions.
            let mut args = values;
            args.push("--dry-run=server".into());
            let text = template(&ns, &args).await.context(set.to_owned())?;
            let docs = documents(&text);
            if set == "all-features" {
                let expected = if minor < 21 {
                    "policy/v1beta1"
                } else {
                    "policy/v1"
                };
                assert_eq!(api_version_of(&docs, "PodDisruptionBudget"), expected);
                let expected = if minor < 23 {
                    "autoscaling/v2beta2"
                } else {
                    "autoscaling/v2"
                };
                assert_eq!(api_version_of(&docs, "HorizontalPodAutoscaler"), expected);
            }
            let file = dir.path().join(format!("{}.yaml", set.replace(' ', "-")));
            std::fs::write(&file, &text)?;
            let output = kubectl([
                "apply",
                "--dry-run=server",
                "--namespace",
                &ns,
                "-f",
                file.to_str().unwrap(),
            ])
            .await?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            ensure!(
                output.status.success(),
                "{set}: the API server refused a manifest: {}\n{stdout}",
                String::from_utf8_lossy(&output.stderr)
            );
            let accepted = stdout.matches("(server dry run)").count();
            assert_eq!(accepted, docs.len(), "{set}: {stdout}");
        }
        namespace.delete().await
    })
    .await
}
