//! Finding installed Jupyter kernels and choosing one per language.
//!
//! Kernelspecs (`<data dir>/kernels/<name>/kernel.json`) are read from the same places Jupyter
//! looks: `$JUPYTER_PATH`, the user data dir, `<prefix>/share/jupyter` of every `bin` directory
//! on `PATH` (this is how a virtualenv's or `/usr/local`'s kernels are found), and the system
//! dirs. The first directory that has a kernel of a given name wins, as in Jupyter.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Languages E2B clients ask for, with the kernelspec names that serve them, best first.
/// Any other language is served by a kernelspec of that name or whose `language` matches.
const PREFERRED_KERNELS: &[(&str, &[&str])] = &[
    ("python", &["python3", "python"]),
    // `javascript` is ijavascript's name; `jslab` is tslab's JavaScript kernel.
    ("javascript", &["javascript", "jslab"]),
    ("typescript", &["tslab", "typescript"]),
    ("bash", &["bash"]),
    ("r", &["ir"]),
    ("java", &["java"]),
    ("deno", &["deno"]),
];

/// How a kernel wants to be interrupted (`interrupt_mode` in kernel.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptMode {
    /// SIGINT to the kernel's process group (the default).
    Signal,
    /// An `interrupt_request` on the control channel.
    Message,
}

/// A launchable kernel.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    /// Kernelspec directory name, e.g. `python3`.
    pub name: String,
    /// `language` declared in kernel.json, e.g. `python`.
    pub language: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub interrupt_mode: InterruptMode,
    /// The kernelspec directory, substituted for `{resource_dir}` in `argv`.
    pub resource_dir: PathBuf,
}

#[derive(Deserialize)]
struct KernelJson {
    argv: Vec<String>,
    #[serde(default)]
    language: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    interrupt_mode: Option<String>,
}

/// Lower-cases and trims a requested language and resolves E2B's aliases (`js`, `ts`);
/// no language means Python.
pub fn normalize_language(language: Option<&str>) -> String {
    let language = language
        .map(|l| l.trim().to_lowercase())
        .unwrap_or_default();
    match language.as_str() {
        "" => "python".to_owned(),
        "js" => "javascript".to_owned(),
        "ts" => "typescript".to_owned(),
        _ => language,
    }
}

/// The kernels installed on this machine, by kernelspec name.
#[derive(Debug, Default, Clone)]
pub struct KernelCatalog {
    specs: BTreeMap<String, KernelSpec>,
}

impl KernelCatalog {
    /// Scans the standard Jupyter data directories.
    pub fn discover() -> Self {
        Self::from_dirs(&data_dirs())
    }

    /// Scans the given Jupyter data directories (each holding a `kernels/` directory).
    pub fn from_dirs(dirs: &[PathBuf]) -> Self {
        let mut specs = BTreeMap::new();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir.join("kernels")) else {
                continue;
            };
            for entry in entries.flatten() {
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if specs.contains_key(&name) {
                    continue;
                }
                match read_spec(&name, &entry.path()) {
                    Ok(spec) => {
                        specs.insert(name, spec);
                    }
                    Err(err) => tracing::debug!(kernel = %name, %err, "skipping kernelspec"),
                }
            }
        }
        KernelCatalog { specs }
    }

    /// The kernel that runs `language` (already normalised), if one is installed.
    pub fn for_language(&self, language: &str) -> Option<&KernelSpec> {
        let preferred = PREFERRED_KERNELS
            .iter()
            .find(|(lang, _)| *lang == language)
            .map(|(_, names)| *names)
            .unwrap_or(&[]);
        preferred
            .iter()
            .find_map(|name| self.specs.get(*name))
            .or_else(|| self.specs.get(language))
            .or_else(|| {
                self.specs
                    .values()
                    .find(|spec| spec.language.eq_ignore_ascii_case(language))
            })
    }

    /// Languages that can be served, for error messages and the docs.
    pub fn languages(&self) -> Vec<String> {
        let mut languages: Vec<String> = PREFERRED_KERNELS
            .iter()
            .filter(|(lang, _)| self.for_language(lang).is_some())
            .map(|(lang, _)| (*lang).to_owned())
            .collect();
        for spec in self.specs.values() {
            let language = spec.language.to_lowercase();
            if !language.is_empty() && !languages.contains(&language) {
                languages.push(language);
            }
        }
        languages
    }
}

fn read_spec(name: &str, dir: &Path) -> Result<KernelSpec, String> {
    let raw = std::fs::read(dir.join("kernel.json")).map_err(|e| e.to_string())?;
    let json: KernelJson = serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
    if json.argv.is_empty() {
        return Err("empty argv".to_owned());
    }
    let interrupt_mode = match json.interrupt_mode.as_deref() {
        Some("message") => InterruptMode::Message,
        _ => InterruptMode::Signal,
    };
    Ok(KernelSpec {
        name: name.to_owned(),
        language: json.language,
        argv: json.argv,
        env: json.env,
        interrupt_mode,
        resource_dir: dir.to_owned(),
    })
}

/// Jupyter data directories in lookup order (see the module docs).
fn data_dirs() -> Vec<PathBuf> {
    let env: HashMap<String, String> = std::env::vars().collect();
    data_dirs_from(&env)
}

fn data_dirs_from(env: &HashMap<String, String>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut push = |dir: PathBuf| {
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    };
    if let Some(path) = env.get("JUPYTER_PATH") {
        std::env::split_paths(path)
            .filter(|p| p.is_absolute())
            .for_each(&mut push);
    }
    if let Some(dir) = env.get("JUPYTER_DATA_DIR") {
        push(PathBuf::from(dir));
    } else if let Some(dir) = env.get("XDG_DATA_HOME") {
        push(PathBuf::from(dir).join("jupyter"));
    } else if let Some(home) = env.get("HOME") {
        push(PathBuf::from(home).join(".local/share/jupyter"));
    }
    if let Some(path) = env.get("PATH") {
        for bin in std::env::split_paths(path).filter(|p| p.is_absolute()) {
            if let Some(prefix) = bin.parent() {
                push(prefix.join("share/jupyter"));
            }
        }
    }
    push(PathBuf::from("/usr/local/share/jupyter"));
    push(PathBuf::from("/usr/share/jupyter"));
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_kernel(root: &Path, name: &str, json: &str) {
        let dir = root.join("kernels").join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("kernel.json"), json).expect("write kernel.json");
    }

    #[test]
    fn languages_are_normalised() {
        assert_eq!(normalize_language(None), "python");
        assert_eq!(normalize_language(Some("  ")), "python");
        assert_eq!(normalize_language(Some(" JS ")), "javascript");
        assert_eq!(normalize_language(Some("ts")), "typescript");
        assert_eq!(normalize_language(Some("Bash")), "bash");
    }

    #[test]
    fn preferred_names_win_and_first_directory_wins() {
        let first = tempfile::tempdir().expect("tempdir");
        let second = tempfile::tempdir().expect("tempdir");
        write_kernel(
            first.path(),
            "jslab",
            r#"{"argv":["tslab","kernel","--config-path","{connection_file}","--js"],"language":"javascript"}"#,
        );
        write_kernel(
            first.path(),
            "python3",
            r#"{"argv":["python","-m","ipykernel_launcher","-f","{connection_file}"],"language":"python"}"#,
        );
        write_kernel(
            second.path(),
            "python3",
            r#"{"argv":["/other/python"],"language":"python","interrupt_mode":"message"}"#,
        );
        write_kernel(second.path(), "broken", "{not json");
        write_kernel(
            second.path(),
            "julia-1.10",
            r#"{"argv":["julia"],"language":"julia"}"#,
        );
        let catalog =
            KernelCatalog::from_dirs(&[first.path().to_owned(), second.path().to_owned()]);

        let python = catalog.for_language("python").expect("python kernel");
        assert_eq!(python.argv[0], "python");
        assert_eq!(python.interrupt_mode, InterruptMode::Signal);
        assert_eq!(
            catalog.for_language("javascript").map(|s| s.name.as_str()),
            Some("jslab")
        );
        assert_eq!(
            catalog.for_language("julia").map(|s| s.name.as_str()),
            Some("julia-1.10")
        );
        assert!(catalog.for_language("typescript").is_none());
        assert!(catalog.for_language("broken").is_none());
        assert_eq!(catalog.languages(), vec!["python", "javascript", "julia"]);
    }

    #[test]
    fn data_dirs_follow_jupyter_order() {
        let env: HashMap<String, String> = [
            ("JUPYTER_PATH", "/a:relative:/b"),
            ("HOME", "/home/user"),
            ("PATH", "/venv/bin:/usr/bin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let dirs = data_dirs_from(&env);
        let expected: Vec<PathBuf> = [
            "/a",
            "/b",
            "/home/user/.local/share/jupyter",
            "/venv/share/jupyter",
            "/usr/share/jupyter",
            "/usr/local/share/jupyter",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(dirs, expected);
    }
}
