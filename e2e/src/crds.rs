//! Installs the project's CRDs from the committed YAML in `crds/` (what users apply), and
//! waits until the API server serves them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::testing::{DEFAULT_WAIT, await_condition};

/// Field manager of the e2e suite's CRD installs.
const FIELD_MANAGER: &str = "nubabel-e2e";

/// The directory with the committed CRD YAML.
pub fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

/// Parses every `*.yaml` in `crds/`.
pub fn committed_crds() -> Result<Vec<CustomResourceDefinition>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(crds_dir())
        .context("reading crds/")?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        })
        .collect()
}

/// Server-side applies every committed CRD (idempotent, so concurrent tests may all call it)
/// and waits until each is Established. Returns the CRD names.
pub async fn install_crds(client: &Client) -> Result<Vec<String>> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in committed_crds()? {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
        names.push(name);
    }
    for name in &names {
        await_condition(
            &api,
            name,
            "the CRD to be Established",
            kube::runtime::wait::conditions::is_crd_established(),
            DEFAULT_WAIT,
        )
        .await?;
    }
    Ok(names)
}
