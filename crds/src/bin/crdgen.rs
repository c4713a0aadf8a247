//! Writes the CRD YAML of every resource into a directory (default: `crds/`), or with
//! `--check` fails when the committed YAML differs from what the Rust types generate.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut check = false;
    let mut dirs = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!("usage: crdgen [--check] [DIR...]   (default DIR: crds/)");
                return ExitCode::SUCCESS;
            }
            dir => dirs.push(PathBuf::from(dir)),
        }
    }
    if dirs.is_empty() {
        dirs.push(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"))));
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
            } else if let Err(e) = std::fs::write(&path, &yaml) {
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
