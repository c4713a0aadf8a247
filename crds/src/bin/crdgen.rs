//! Writes the CRD YAML of every resource into directories (default: `crds/` and the Helm
//! chart's `crds/`, which must stay identical), or with `--check` fails when the committed YAML
//! in any of them differs from what the Rust types generate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The chart's copy of the CRDs, relative to the workspace root: Helm installs `crds/` from
/// inside the chart, so the chart carries its own identical copy.
const CHART_CRDS_DIR: &str = "charts/nubabel-opencode-operator/crds";

/// Where the CRDs go when no directory is named: `crds/` and the chart's `crds/`.
fn default_dirs() -> Vec<PathBuf> {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = crate_dir.parent().unwrap_or(crate_dir);
    vec![crate_dir.to_path_buf(), workspace.join(CHART_CRDS_DIR)]
}

fn main() -> ExitCode {
    let mut check = false;
    let mut dirs = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!(
                    "usage: crdgen [--check] [DIR...]   (default DIRs: crds/ and {CHART_CRDS_DIR}/)"
                );
                return ExitCode::SUCCESS;
            }
            dir => dirs.push(PathBuf::from(dir)),
        }
    }
    if dirs.is_empty() {
        dirs = default_dirs();
    }

    let mut drifted = false;
    for (file, crd) in nubabel_crds::crds() {
        let yaml = match nubabel_crds::render_yaml(&crd) {
            Ok(yaml) => yaml,
            Err(e) => {
                eprintln!("crdgen: failed to render {file}: {e}");
                return ExitCode::FAILURE;
            }
        };
        for dir in &dirs {
            let path = dir.join(file);
            if check {
                let committed = std::fs::read_to_string(&path).unwrap_or_default();
                if committed != yaml {
                    eprintln!(
                        "crdgen: {} is out of date; run `cargo run -p nubabel-crds --bin crdgen`",
                        path.display()
                    );
                    drifted = true;
                }
            } else if let Err(e) =
                std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &yaml))
            {
                eprintln!("crdgen: failed to write {}: {e}", path.display());
                return ExitCode::FAILURE;
            } else {
                println!("wrote {}", path.display());
            }
        }
    }
    if drifted {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_default_directories_hold_exactly_what_the_types_generate() {
        let dirs = default_dirs();
        assert_eq!(dirs.len(), 2);
        assert!(dirs[1].ends_with(CHART_CRDS_DIR));
        for dir in &dirs {
            for (file, crd) in nubabel_crds::crds() {
                let path = dir.join(file);
                let committed = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                let generated = nubabel_crds::render_yaml(&crd).unwrap();
                assert!(
                    committed == generated,
                    "{} is out of date; run `cargo run -p nubabel-crds --bin crdgen`",
                    path.display()
                );
            }
        }
    }
}
