//! Which local program runs a container: the image map and the command resolution.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Which local program runs each container image.
#[derive(Clone, Debug, Default)]
pub struct ImageMap {
    programs: Vec<(String, PathBuf)>,
}

impl ImageMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs images whose repository name (the last path segment, without tag or digest)
    /// equals or contains `name` with `program`. Earlier entries win.
    pub fn with(mut self, name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        self.programs.push((name.into(), program.into()));
        self
    }

    /// The program for `image`, if any.
    pub fn resolve(&self, image: &str) -> Option<&Path> {
        self.resolve_entry(image).map(|(_, program)| program)
    }

    /// The key and program of the entry that runs `image`, if any.
    pub fn resolve_entry(&self, image: &str) -> Option<(&str, &Path)> {
        let repository = image.split('@').next().unwrap_or(image);
        let last = repository.rsplit('/').next().unwrap_or(repository);
        let name = last.split(':').next().unwrap_or(last);
        self.programs
            .iter()
            .find(|(key, _)| name == key)
            .or_else(|| {
                self.programs
                    .iter()
                    .find(|(key, _)| name.contains(key.as_str()))
            })
            .map(|(key, program)| (key.as_str(), program.as_path()))
    }
}

/// How the shim runs a container: the program, and the arguments that come before the
/// container's `args`.
///
/// Without `command`, the image's mapped program runs (the image's entrypoint). With one, the
/// mapped program runs when `command[0]`'s file name is the program's file name or the image
/// map's key (`opencode` for an image mapped to `.../bin/opencode`); any other `command[0]`
/// is a tool the image carries (`mkdir`, `sh`), run from the host: an absolute path that
/// exists on the host as is, anything else by its file name on the host's `PATH`.
pub fn resolve_command(
    images: &ImageMap,
    image: &str,
    command: &[String],
    find_on_path: impl Fn(&str) -> Option<PathBuf>,
) -> Result<(PathBuf, Vec<String>)> {
    let mapped = images.resolve_entry(image);
    let Some((first, rest)) = command.split_first() else {
        let (_, program) = mapped.with_context(|| {
            format!("no local program for image {image:?} and the container has no command")
        })?;
        return Ok((program.to_owned(), Vec::new()));
    };
    let rest = rest.to_vec();
    let base = Path::new(first)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some((key, program)) = mapped {
        let program_name = program.file_name().map(|n| n.to_string_lossy());
        if base == key || program_name.as_deref() == Some(base.as_str()) {
            return Ok((program.to_owned(), rest));
        }
    }
    if first.starts_with('/') && Path::new(first).is_file() {
        return Ok((PathBuf::from(first), rest));
    }
    let program = find_on_path(&base).with_context(|| {
        format!(
            "command {first:?} of image {image:?} is neither the image's mapped program nor \
             found on the host's PATH"
        )
    })?;
    Ok((program, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_resolve_by_repository_name_ignoring_registry_and_tag() {
        let map = ImageMap::new()
            .with("nubabel-bridge", "/bin/bridge")
            .with("opencode", "/bin/opencode");
        assert_eq!(
            map.resolve("ghcr.io/nubabel/nubabel-bridge:0.1.0"),
            Some(Path::new("/bin/bridge"))
        );
        assert_eq!(
            map.resolve("ghcr.io/nubabel/opencode-sidecar:1.18.33"),
            Some(Path::new("/bin/opencode"))
        );
        assert_eq!(map.resolve("busybox"), None);
    }

    #[test]
    fn commands_run_the_mapped_program_or_a_host_tool() {
        let map = ImageMap::new()
            .with("opencode", "/opt/oc/bin/opencode")
            .with("nubabel-bridge", "/work/target/debug/nubabel-bridge");
        let on_path = |name: &str| Some(PathBuf::from(format!("/usr/bin/{name}")));
        let strings = |parts: &[&str]| parts.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
        let image = "ghcr.io/nubabel/opencode:1.18.33";

        // command[0] names the mapped program by its file name, or by the map's key.
        let (program, leading) =
            resolve_command(&map, image, &strings(&["opencode", "x"]), on_path).unwrap();
        assert_eq!(program, Path::new("/opt/oc/bin/opencode"));
        assert_eq!(leading, strings(&["x"]));
        let (program, _) =
            resolve_command(&map, image, &strings(&["/usr/local/bin/opencode"]), on_path).unwrap();
        assert_eq!(program, Path::new("/opt/oc/bin/opencode"));
        let bridge = "e2e.local/nubabel-bridge:dev";
        let (program, _) =
            resolve_command(&map, bridge, &strings(&["nubabel-bridge"]), on_path).unwrap();
        assert_eq!(program, Path::new("/work/target/debug/nubabel-bridge"));

        // Any other command is a tool of the image, taken from the host's PATH.
        let (program, leading) =
            resolve_command(&map, image, &strings(&["mkdir", "-p", "/data/a"]), on_path).unwrap();
        assert_eq!(program, Path::new("/usr/bin/mkdir"));
        assert_eq!(leading, strings(&["-p", "/data/a"]));
        let (program, _) = resolve_command(
            &map,
            "busybox:1.36",
            &strings(&["sh", "-c", "true"]),
            on_path,
        )
        .unwrap();
        assert_eq!(program, Path::new("/usr/bin/sh"));
        let nowhere = |_: &str| None;
        assert!(resolve_command(&map, image, &strings(&["no-such-tool"]), nowhere).is_err());

        // Without a command the image's program runs, and an unmapped image has none.
        let (program, leading) = resolve_command(&map, bridge, &[], on_path).unwrap();
        assert_eq!(program, Path::new("/work/target/debug/nubabel-bridge"));
        assert!(leading.is_empty());
        assert!(resolve_command(&map, "busybox:1.36", &[], on_path).is_err());
    }
}
