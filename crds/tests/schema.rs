//! The generated CRDs carry what users and Kubernetes rely on, the committed YAML is exactly
//! what the types generate, and every example manifest parses into the types.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion, JSONSchemaProps,
    JSONSchemaPropsOrArray,
};
use nubabel_crds::v1alpha1::{DelegatedTask, OpencodeSidecar, TaskPhase};

fn crd(file: &str) -> CustomResourceDefinition {
    nubabel_crds::crds()
        .into_iter()
        .find(|(name, _)| *name == file)
        .map(|(_, crd)| crd)
        .unwrap()
}

fn only_version(crd: &CustomResourceDefinition) -> &CustomResourceDefinitionVersion {
    assert_eq!(crd.spec.versions.len(), 1);
    &crd.spec.versions[0]
}

fn root_schema(crd: &CustomResourceDefinition) -> &JSONSchemaProps {
    only_version(crd)
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .unwrap()
}

fn property<'a>(schema: &'a JSONSchemaProps, path: &[&str]) -> &'a JSONSchemaProps {
    path.iter().fold(schema, |s, key| {
        s.properties
            .as_ref()
            .and_then(|p| p.get(*key))
            .unwrap_or_else(|| panic!("no property {key} in path {path:?}"))
    })
}

fn printer_columns(crd: &CustomResourceDefinition) -> Vec<(String, String)> {
    only_version(crd)
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.json_path.clone()))
        .collect()
}

#[test]
fn sidecar_crd_has_status_and_scale_subresources() {
    let crd = crd("opencodesidecars.yaml");
    let subresources = only_version(&crd).subresources.as_ref().unwrap();
    assert!(subresources.status.is_some());
    let scale = subresources.scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
}

#[test]
fn task_crd_has_a_status_subresource_and_no_scale() {
    let crd = crd("delegatedtasks.yaml");
    let subresources = only_version(&crd).subresources.as_ref().unwrap();
    assert!(subresources.status.is_some());
    assert!(subresources.scale.is_none());
}

#[test]
fn both_crds_are_namespaced_with_short_names_and_the_nubabel_category() {
    for (file, short) in [
        ("opencodesidecars.yaml", "ocs"),
        ("delegatedtasks.yaml", "dtask"),
    ] {
        let crd = crd(file);
        assert_eq!(crd.spec.group, "nubabel.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec![short.to_owned()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["nubabel".to_owned()]));
        assert_eq!(only_version(&crd).name, "v1alpha1");
    }
}

#[test]
fn conditions_are_a_list_map_keyed_by_type() {
    for file in ["opencodesidecars.yaml", "delegatedtasks.yaml"] {
        let crd = crd(file);
        let conditions = property(root_schema(&crd), &["status", "conditions"]);
        assert_eq!(
            conditions.x_kubernetes_list_type.as_deref(),
            Some("map"),
            "{file}"
        );
        assert_eq!(
            conditions.x_kubernetes_list_map_keys,
            Some(vec!["type".to_owned()]),
            "{file}"
        );
    }
}

#[test]
fn task_printer_columns_show_phase_sidecar_session_tools_and_age() {
    let names: Vec<String> = printer_columns(&crd("delegatedtasks.yaml"))
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for wanted in ["Phase", "Sidecar", "Session", "Tools", "Age"] {
        assert!(
            names.contains(&wanted.to_owned()),
            "missing column {wanted} in {names:?}"
        );
    }
}

#[test]
fn sidecar_printer_columns_show_desired_and_ready_replicas() {
    let columns = printer_columns(&crd("opencodesidecars.yaml"));
    assert!(columns.contains(&("Desired".to_owned(), ".spec.replicas".to_owned())));
    assert!(columns.contains(&("Ready".to_owned(), ".status.readyReplicas".to_owned())));
}

#[test]
fn the_api_server_enforces_required_fields_and_bounds() {
    let task = crd("delegatedtasks.yaml");
    let spec = property(root_schema(&task), &["spec"]);
    let required = spec.required.clone().unwrap_or_default();
    assert!(required.contains(&"prompt".to_owned()));
    assert!(required.contains(&"organizationId".to_owned()));
    assert_eq!(property(spec, &["prompt"]).min_length, Some(1));

    let sidecar = crd("opencodesidecars.yaml");
    let replicas = property(root_schema(&sidecar), &["spec", "replicas"]);
    assert_eq!(replicas.minimum, Some(0.0));
}

#[test]
fn the_crds_use_nothing_that_kubernetes_1_20_cannot_serve() {
    // CEL rules (x-kubernetes-validations) and selectable fields came after 1.20.
    for (file, crd) in nubabel_crds::crds() {
        let yaml = nubabel_crds::render_yaml(&crd).unwrap();
        assert!(
            !yaml.contains("x-kubernetes-validations"),
            "{file} has CEL rules"
        );
        assert!(
            !yaml.contains("selectableFields"),
            "{file} has selectable fields"
        );
        assert!(
            yaml.contains("apiVersion: apiextensions.k8s.io/v1\n"),
            "{file}"
        );
    }
}

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    fn walk(path: &str, schema: &JSONSchemaProps, missing: &mut Vec<String>) {
        for (key, child) in schema.properties.iter().flatten() {
            let here = format!("{path}.{key}");
            if child.description.as_deref().unwrap_or("").is_empty() && key != "metadata" {
                missing.push(here.clone());
            }
            walk(&here, child, missing);
            if let Some(JSONSchemaPropsOrArray::Schema(item)) = &child.items {
                walk(&format!("{here}[]"), item, missing);
            }
        }
    }
    for (file, crd) in nubabel_crds::crds() {
        let mut missing = Vec::new();
        let spec = property(root_schema(&crd), &["spec"]);
        let status = property(root_schema(&crd), &["status"]);
        walk("spec", spec, &mut missing);
        walk("status", status, &mut missing);
        // Tolerations come from k8s-openapi and carry upstream docs; everything of ours must too.
        assert!(
            missing.is_empty(),
            "{file}: fields without a description: {missing:?}"
        );
    }
}

#[test]
fn committed_yaml_is_exactly_what_crdgen_generates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, crd) in nubabel_crds::crds() {
        let committed = std::fs::read_to_string(dir.join(file)).unwrap();
        let generated = nubabel_crds::render_yaml(&crd).unwrap();
        assert!(
            committed == generated,
            "crds/{file} drifted from the Rust types; run `cargo run -p nubabel-crds --bin crdgen`"
        );
    }
}

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_parses_into_its_type() {
    let mut sidecars = 0;
    let mut tasks = 0;
    for path in examples() {
        let text = std::fs::read_to_string(&path).unwrap();
        let value: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        match value["kind"].as_str() {
            Some("OpencodeSidecar") => {
                let ocs: OpencodeSidecar = serde_json::from_value(value).unwrap();
                assert!(!ocs.spec.organization_id.is_empty());
                sidecars += 1;
            }
            Some("DelegatedTask") => {
                let task: DelegatedTask = serde_json::from_value(value).unwrap();
                assert!(!task.spec.prompt.is_empty(), "{}", path.display());
                tasks += 1;
            }
            other => panic!("{}: unexpected kind {other:?}", path.display()),
        }
    }
    assert!(
        sidecars >= 1 && tasks >= 2,
        "sidecars {sidecars}, tasks {tasks}"
    );
}

#[test]
fn the_follow_up_example_continues_the_first_turns_session() {
    let load = |name: &str| -> DelegatedTask {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name);
        let value: serde_json::Value =
            serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        serde_json::from_value(value).unwrap()
    };
    let first = load("task-conversation-start.yaml");
    let second = load("task-conversation-follow-up.yaml");
    assert!(first.spec.session_id.is_some());
    assert_eq!(first.spec.session_id, second.spec.session_id);
}

#[test]
fn defaults_fill_in_what_a_minimal_task_leaves_out() {
    let task: DelegatedTask = serde_json::from_value(serde_json::json!({
        "apiVersion": "nubabel.io/v1alpha1",
        "kind": "DelegatedTask",
        "metadata": {"name": "t"},
        "spec": {"organizationId": "org", "prompt": "hi"}
    }))
    .unwrap();
    assert_eq!(
        task.spec.timeout_seconds,
        nubabel_crds::v1alpha1::DEFAULT_TIMEOUT_SECONDS
    );
    assert!(!task.spec.cancel);
    assert!(TaskPhase::TimedOut.is_finished());
    assert!(!TaskPhase::Queued.is_finished());
}
