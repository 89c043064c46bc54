//! Code the service runs in kernels on the user's behalf: the IPython start-up code and the
//! per-request environment variable set/restore snippets.
//!
//! Snippets run as separate *silent* executions (no execution count, no output to the client),
//! so they never shift line numbers in the user's tracebacks. Names and values are embedded as
//! language literals (JSON strings for Python/JavaScript, single-quoted words for bash), never
//! spliced in raw; names are restricted to `[A-Za-z_][A-Za-z0-9_]*`.

use std::collections::BTreeMap;

/// Registers the `e2b/data` and `e2b/chart` formatters, PIL display hooks and plain tracebacks.
pub const IPYTHON_STARTUP: &str = include_str!("../python/startup.py");

/// How per-request environment variables are set in a kernel's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvFlavour {
    Python,
    JavaScript,
    TypeScript,
    Bash,
}

impl EnvFlavour {
    /// The flavour for a (normalised) context language, if env vars are supported there.
    pub fn for_language(language: &str) -> Option<Self> {
        match language {
            "python" => Some(EnvFlavour::Python),
            "javascript" => Some(EnvFlavour::JavaScript),
            "typescript" => Some(EnvFlavour::TypeScript),
            "bash" => Some(EnvFlavour::Bash),
            _ => None,
        }
    }
}

/// Why a set of env vars cannot be applied.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error(
        "invalid environment variable name {0:?}: use letters, digits and '_', not starting with a digit"
    )]
    InvalidName(String),
    #[error("the value of environment variable {0} contains a NUL byte")]
    NulInValue(String),
    #[error("env_vars are not supported for language {0:?}")]
    Unsupported(String),
}

/// Checks names and values before anything is sent to a kernel.
pub fn validate_env(
    language: &str,
    env: &BTreeMap<String, String>,
) -> Result<EnvFlavour, EnvError> {
    let flavour =
        EnvFlavour::for_language(language).ok_or_else(|| EnvError::Unsupported(language.into()))?;
    for (name, value) in env {
        let mut chars = name.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(EnvError::InvalidName(name.clone()));
        }
        if value.contains('\0') {
            return Err(EnvError::NulInValue(name.clone()));
        }
    }
    Ok(flavour)
}

/// Sets `env`, remembering the previous values inside the kernel for [`restore_env`].
pub fn set_env(flavour: EnvFlavour, env: &BTreeMap<String, String>) -> String {
    match flavour {
        EnvFlavour::Python => format!(
            "def __soulbox_env(new):\n    import os\n    saved = {{k: os.environ.get(k) for k in new}}\n    os.environ.update(new)\n    return saved\n__soulbox_env_saved = __soulbox_env({})\ndel __soulbox_env\n",
            json_object(env)
        ),
        EnvFlavour::JavaScript | EnvFlavour::TypeScript => {
            let global = js_global(flavour);
            format!(
                "{global}.__soulboxEnvSaved = {{}};\nfor (const k of Object.keys({new})) {{ {global}.__soulboxEnvSaved[k] = process.env[k]; }}\nObject.assign(process.env, {new});\n",
                new = json_object(env)
            )
        }
        EnvFlavour::Bash => env
            .iter()
            .map(|(name, value)| {
                format!(
                    "if [ -n \"${{{name}+x}}\" ]; then __soulbox_had_{name}=1; __soulbox_old_{name}=\"${name}\"; else __soulbox_had_{name}=0; fi; export {name}={}\n",
                    bash_quote(value)
                )
            })
            .collect(),
    }
}

/// Puts back what [`set_env`] replaced (unsetting variables that did not exist before).
pub fn restore_env(flavour: EnvFlavour, env: &BTreeMap<String, String>) -> String {
    match flavour {
        EnvFlavour::Python => "def __soulbox_env(saved):\n    import os\n    for k, v in saved.items():\n        if v is None:\n            os.environ.pop(k, None)\n        else:\n            os.environ[k] = v\n__soulbox_env(globals().pop('__soulbox_env_saved', {}))\ndel __soulbox_env\n".to_owned(),
        EnvFlavour::JavaScript | EnvFlavour::TypeScript => {
            let global = js_global(flavour);
            format!(
                "for (const [k, v] of Object.entries({global}.__soulboxEnvSaved ?? {{}})) {{ if (v === undefined) {{ delete process.env[k]; }} else {{ process.env[k] = v; }} }}\ndelete {global}.__soulboxEnvSaved;\n"
            )
        }
        EnvFlavour::Bash => env
            .keys()
            .map(|name| {
                format!(
                    "if [ \"$__soulbox_had_{name}\" = 1 ]; then export {name}=\"$__soulbox_old_{name}\"; else unset {name}; fi; unset __soulbox_had_{name} __soulbox_old_{name}\n"
                )
            })
            .collect(),
    }
}

/// TypeScript type-checks cells; an `any` cast lets the snippet add a property to globalThis.
fn js_global(flavour: EnvFlavour) -> &'static str {
    if flavour == EnvFlavour::TypeScript {
        "(globalThis as any)"
    } else {
        "globalThis"
    }
}

/// A JSON object of strings is also a valid Python dict literal and JavaScript object literal.
fn json_object(env: &BTreeMap<String, String>) -> String {
    serde_json::to_string(env).unwrap_or_else(|_| "{}".to_owned())
}

fn bash_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn names_and_values_are_validated() {
        let ok = env(&[("FOO", "bar"), ("_x1", "it's \"quoted\"\n")]);
        assert_eq!(validate_env("python", &ok), Ok(EnvFlavour::Python));
        assert_eq!(
            validate_env("js", &ok),
            Err(EnvError::Unsupported("js".into()))
        );
        for bad in ["1A", "A-B", "", "A B", "Ä"] {
            assert_eq!(
                validate_env("bash", &env(&[(bad, "v")])),
                Err(EnvError::InvalidName(bad.into()))
            );
        }
        assert_eq!(
            validate_env("bash", &env(&[("A", "a\0b")])),
            Err(EnvError::NulInValue("A".into()))
        );
    }

    #[test]
    fn bash_values_are_single_quoted() {
        assert_eq!(bash_quote("it's $HOME"), r"'it'\''s $HOME'");
        let code = set_env(EnvFlavour::Bash, &env(&[("FOO", "a'b")]));
        assert!(code.contains(r"export FOO='a'\''b'"), "{code}");
        let restore = restore_env(EnvFlavour::Bash, &env(&[("FOO", "a'b")]));
        assert!(restore.contains("unset FOO;"), "{restore}");
    }

    #[test]
    fn python_and_js_embed_json_literals() {
        let vars = env(&[("FOO", "x\"y\\z")]);
        let py = set_env(EnvFlavour::Python, &vars);
        assert!(py.contains(r#"__soulbox_env({"FOO":"x\"y\\z"})"#), "{py}");
        let ts = set_env(EnvFlavour::TypeScript, &vars);
        assert!(
            ts.starts_with("(globalThis as any).__soulboxEnvSaved"),
            "{ts}"
        );
        let js = restore_env(EnvFlavour::JavaScript, &vars);
        assert!(js.contains("delete globalThis.__soulboxEnvSaved"), "{js}");
    }
}
