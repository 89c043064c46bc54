//! The Dockerfile subset SoulBox builds: syntax only (lines, continuations, instructions,
//! JSON and shell forms, flags, quoting). Variables are expanded later, at build time, by
//! [`expand_words`], because `ENV PATH=/x:$PATH` needs the parent template's environment.
//!
//! Written here rather than taken from a crate: `dockerfile-parser` (the one Rust crate) treats
//! `ADD`, `WORKDIR` and `USER` as opaque, needs pest + regex + snafu 0.6, and the subset we need
//! is small. Supported: `FROM` (one stage), `RUN`, `COPY`, `ADD` (local files only), `ENV`,
//! `ARG`, `WORKDIR`, `USER`, `LABEL`, `CMD`, `ENTRYPOINT`; `EXPOSE` and `MAINTAINER` are
//! accepted and ignored (they mean nothing for a sandbox). Anything else is an error naming
//! its line.

use std::collections::BTreeMap;

/// A syntax or semantic error, with the 1-based line it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        line,
        message: message.into(),
    })
}

/// What a template starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// An empty root filesystem.
    Scratch,
    /// Debian's archive via mmdebstrap (`debian:bookworm`, `debian:trixie`).
    Debian(String),
    /// Another SoulBox template (name, `name:tag` or id).
    Template(String),
}

/// Debian suites `FROM debian:<suite>` accepts (`debian:12`/`13` are aliases).
pub const DEBIAN_SUITES: &[&str] = &["bookworm", "trixie"];

impl Base {
    /// Interprets an image reference: `scratch`, `debian:<suite>`, else a template name.
    /// Other registry images cannot be pulled here; `is_registry_image` tells them apart.
    pub fn parse(image: &str) -> Result<Base, String> {
        if image == "scratch" {
            return Ok(Base::Scratch);
        }
        let bare = image.strip_prefix("docker.io/").unwrap_or(image);
        let bare = bare.strip_prefix("library/").unwrap_or(bare);
        if let Some(tag) = bare.strip_prefix("debian:") {
            let suite = match tag {
                "12" | "bookworm" | "bookworm-slim" => "bookworm",
                "13" | "trixie" | "trixie-slim" | "stable" | "latest" => "trixie",
                other => {
                    return Err(format!(
                        "image '{image}': Debian suite '{other}' is not available \
                         (supported: {})",
                        DEBIAN_SUITES.join(", ")
                    ));
                }
            };
            return Ok(Base::Debian(suite.to_owned()));
        }
        if bare == "debian" {
            return Ok(Base::Debian("trixie".to_owned()));
        }
        // E2B's default image for SDK templates is its base image: ours is the `base` template.
        if bare == "e2bdev/base" || bare.starts_with("e2bdev/base:") {
            return Ok(Base::Template("base".to_owned()));
        }
        Ok(Base::Template(image.to_owned()))
    }
}

/// One instruction with its arguments still raw (variables unexpanded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line where the instruction starts.
    pub line: usize,
    pub kind: InstructionKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstructionKind {
    /// Shell form (run by `/bin/sh -c`) or exec form.
    Run(Command),
    /// `COPY`/`ADD`: raw source and destination words, raw `--chown`, `--chmod`.
    Copy {
        add: bool,
        srcs: Vec<String>,
        dest: String,
        chown: Option<String>,
        chmod: Option<String>,
    },
    /// Raw `key=value` words (or one legacy `key value`).
    Env(Vec<(String, String)>),
    /// `ARG name[=default]`.
    Arg(String, Option<String>),
    Workdir(String),
    User(String),
    Label(Vec<(String, String)>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Shell(String),
    Exec(Vec<String>),
}

impl Command {
    /// As a shell command line (exec form words quoted).
    pub fn to_shell(&self) -> String {
        match self {
            Command::Shell(s) => s.clone(),
            Command::Exec(words) => words
                .iter()
                .map(|w| shlex::try_quote(w).map_or_else(|_| w.clone(), |q| q.into_owned()))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// A parsed Dockerfile: the base (ARGs before `FROM` applied), the instructions after it, and
/// the start command from `ENTRYPOINT`/`CMD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub base: Base,
    pub from_line: usize,
    pub instructions: Vec<Instruction>,
    pub start_cmd: Option<String>,
}

/// Parses a Dockerfile.
pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    let escape = escape_directive(text);
    let mut pre_from_args: BTreeMap<String, String> = BTreeMap::new();
    let mut base: Option<(Base, usize)> = None;
    let mut instructions = Vec::new();
    let mut entrypoint: Option<Command> = None;
    let mut cmd: Option<Command> = None;
    for (line, logical) in logical_lines(text, escape)? {
        let trimmed = logical.trim_start();
        let (word, rest) = match trimmed.find(char::is_whitespace) {
            Some(i) => (&trimmed[..i], trimmed[i..].trim()),
            None => (trimmed, ""),
        };
        let keyword = word.to_ascii_uppercase();
        if base.is_none() && keyword != "FROM" && keyword != "ARG" {
            return err(
                line,
                format!("{word} before FROM: a Dockerfile starts with FROM"),
            );
        }
        if rest.is_empty() && !matches!(keyword.as_str(), "EXPOSE" | "MAINTAINER") {
            return err(line, format!("{keyword} needs arguments"));
        }
        if rest.starts_with("<<") && matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
            return err(line, "heredocs (<<EOF) are not supported");
        }
        let kind = match keyword.as_str() {
            "FROM" => {
                if base.is_some() {
                    return err(line, "multi-stage builds (a second FROM) are not supported");
                }
                let (flags, words) = split_flags(line, rest, escape)?;
                if let Some((name, _)) = flags.iter().find(|(n, _)| n != "platform") {
                    return err(line, format!("FROM flag --{name} is not supported"));
                }
                let image = match words.as_slice() {
                    [image] => image,
                    [image, as_kw, _] if as_kw.eq_ignore_ascii_case("as") => image,
                    _ => return err(line, "expected FROM <image> [AS <name>]"),
                };
                let image = expand(image, &pre_from_args, escape)
                    .map_err(|m| ParseError { line, message: m })?;
                let parsed = Base::parse(&image).map_err(|m| ParseError { line, message: m })?;
                base = Some((parsed, line));
                continue;
            }
            "ARG" => {
                let words = split_words(line, rest, escape)?;
                let [word] = words.as_slice() else {
                    return err(line, "expected ARG <name>[=<default>]");
                };
                let (name, default) = match word.split_once('=') {
                    Some((n, d)) => (n.to_owned(), Some(d.to_owned())),
                    None => (word.clone(), None),
                };
                if !valid_name(&name) {
                    return err(line, format!("invalid ARG name '{name}'"));
                }
                if base.is_none() {
                    let value = match &default {
                        Some(d) => expand(d, &pre_from_args, escape)
                            .map_err(|m| ParseError { line, message: m })?,
                        None => String::new(),
                    };
                    pre_from_args.insert(name, value);
                    continue;
                }
                InstructionKind::Arg(name, default)
            }
            "RUN" => {
                let (flags, _) = split_flags(line, rest, escape)?;
                if let Some((name, _)) = flags.first() {
                    return err(line, format!("RUN --{name} is not supported"));
                }
                InstructionKind::Run(command(line, rest)?)
            }
            "COPY" | "ADD" => copy_instruction(line, &keyword, rest, escape)?,
            "ENV" => InstructionKind::Env(pairs(line, rest, escape, true)?),
            "LABEL" => InstructionKind::Label(pairs(line, rest, escape, false)?),
            "WORKDIR" => InstructionKind::Workdir(rest.to_owned()),
            "USER" => {
                let words = split_words(line, rest, escape)?;
                let [user] = words.as_slice() else {
                    return err(line, "expected USER <user>[:<group>]");
                };
                InstructionKind::User(user.clone())
            }
            "CMD" => {
                cmd = Some(command(line, rest)?);
                continue;
            }
            "ENTRYPOINT" => {
                entrypoint = Some(command(line, rest)?);
                continue;
            }
            "EXPOSE" | "MAINTAINER" => continue,
            other => {
                return err(
                    line,
                    format!(
                        "unsupported instruction {other} (supported: FROM, RUN, COPY, ADD, ENV, \
                         ARG, WORKDIR, USER, LABEL, CMD, ENTRYPOINT)"
                    ),
                );
            }
        };
        instructions.push(Instruction { line, kind });
    }
    let Some((base, from_line)) = base else {
        return err(1, "no FROM instruction");
    };
    let start_cmd = match (entrypoint, cmd) {
        (Some(Command::Exec(mut e)), Some(Command::Exec(c))) => {
            e.extend(c);
            Some(Command::Exec(e).to_shell())
        }
        (Some(e), _) => Some(e.to_shell()),
        (None, Some(c)) => Some(c.to_shell()),
        (None, None) => None,
    };
    Ok(Dockerfile {
        base,
        from_line,
        instructions,
        start_cmd,
    })
}

/// `# escape=` parser directive on the first lines (before anything else); `\` by default.
fn escape_directive(text: &str) -> char {
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix('#') else {
            break;
        };
        if let Some((key, value)) = rest.split_once('=')
            && key.trim().eq_ignore_ascii_case("escape")
            && value.trim() == "`"
        {
            return '`';
        }
    }
    '\\'
}

/// Joins continuation lines; drops comments and blank lines. Yields (first line, text).
fn logical_lines(text: &str, escape: char) -> Result<Vec<(usize, String)>, ParseError> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue;
        }
        let (body, continues) = match raw.trim_end().strip_suffix(escape) {
            Some(body) => (body, true),
            None => (raw, false),
        };
        match &mut current {
            Some((_, acc)) => {
                acc.push(' ');
                acc.push_str(body.trim_start());
            }
            None => current = Some((number, body.to_owned())),
        }
        if !continues && let Some(done) = current.take() {
            out.push(done);
        }
    }
    if let Some((line, _)) = current {
        return err(line, "the last instruction ends with a line continuation");
    }
    Ok(out)
}

/// JSON array (exec form) when the text is one, else shell form.
fn command(line: usize, rest: &str) -> Result<Command, ParseError> {
    // Docker runs text that only looks like JSON with the shell, as we do.
    if rest.starts_with('[')
        && let Ok(words) = serde_json::from_str::<Vec<String>>(rest)
    {
        if words.is_empty() {
            return err(line, "empty command");
        }
        return Ok(Command::Exec(words));
    }
    Ok(Command::Shell(rest.to_owned()))
}

fn copy_instruction(
    line: usize,
    keyword: &str,
    rest: &str,
    escape: char,
) -> Result<InstructionKind, ParseError> {
    let (flags, words) = split_flags(line, rest, escape)?;
    let mut chown = None;
    let mut chmod = None;
    for (name, value) in flags {
        match name.as_str() {
            "chown" => chown = Some(value),
            "chmod" => chmod = Some(value),
            "from" => return err(line, "COPY --from (multi-stage builds) is not supported"),
            other => return err(line, format!("{keyword} --{other} is not supported")),
        }
    }
    let body = rest_after_flags(rest);
    let words = if body.starts_with('[') {
        serde_json::from_str::<Vec<String>>(body).unwrap_or(words)
    } else {
        words
    };
    let Some((dest, srcs)) = words.split_last() else {
        return err(line, format!("{keyword} needs a source and a destination"));
    };
    if srcs.is_empty() {
        return err(line, format!("{keyword} needs a source and a destination"));
    }
    for src in srcs {
        if src.contains("://") {
            return err(
                line,
                format!("{keyword} of a URL ({src}) is not supported: only local files"),
            );
        }
    }
    Ok(InstructionKind::Copy {
        add: keyword == "ADD",
        srcs: srcs.to_vec(),
        dest: dest.clone(),
        chown,
        chmod,
    })
}

/// The text after leading `--flag=value` words.
fn rest_after_flags(rest: &str) -> &str {
    let mut s = rest.trim_start();
    while s.starts_with("--") {
        match s.find(char::is_whitespace) {
            Some(i) => s = s[i..].trim_start(),
            None => return "",
        }
    }
    s
}

/// Leading `--name=value` flags, then the remaining words.
#[allow(clippy::type_complexity)]
fn split_flags(
    line: usize,
    rest: &str,
    escape: char,
) -> Result<(Vec<(String, String)>, Vec<String>), ParseError> {
    let words = split_words(line, rest, escape)?;
    let mut flags = Vec::new();
    let mut iter = words.into_iter().peekable();
    while let Some(w) = iter.next_if(|w| w.starts_with("--")) {
        let (name, value) = w[2..].split_once('=').unwrap_or((&w[2..], ""));
        flags.push((name.to_ascii_lowercase(), value.to_owned()));
    }
    Ok((flags, iter.collect()))
}

/// Splits on unquoted whitespace; quotes and escapes are KEPT (they matter to expansion).
fn split_words(line: usize, s: &str, escape: char) -> Result<Vec<String>, ParseError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            (_, c) if c == escape && quote != Some('\'') => {
                cur.push(c);
                if let Some(next) = chars.next() {
                    cur.push(next);
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                cur.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                cur.push(c);
            }
            (_, c) => cur.push(c),
        }
    }
    if quote.is_some() {
        return err(line, "unterminated quote");
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    Ok(words)
}

/// `k=v k2="v 2"` pairs, or (ENV only) the legacy `key value with spaces`.
fn pairs(
    line: usize,
    rest: &str,
    escape: char,
    legacy: bool,
) -> Result<Vec<(String, String)>, ParseError> {
    let words = split_words(line, rest, escape)?;
    let first_has_eq = words.first().is_some_and(|w| w.contains('='));
    if !first_has_eq {
        if legacy && let Some((key, value)) = rest.split_once(char::is_whitespace) {
            if !valid_name(key) {
                return err(line, format!("invalid variable name '{key}'"));
            }
            return Ok(vec![(key.to_owned(), value.trim().to_owned())]);
        }
        return err(line, "expected key=value pairs");
    }
    let mut out = Vec::new();
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return err(line, format!("expected key=value, got '{w}'"));
        };
        if legacy && !valid_name(k) {
            return err(line, format!("invalid variable name '{k}'"));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// Environment and argument names: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Expands one raw word the way Docker does: quotes removed, `$VAR`, `${VAR}`,
/// `${VAR:-default}` and `${VAR:+alternative}` substituted (not inside single quotes), the
/// escape character escaping the next one. Unset variables expand to nothing.
pub fn expand(word: &str, vars: &BTreeMap<String, String>, escape: char) -> Result<String, String> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        match (quote, c) {
            (Some('\''), '\'') | (Some('"'), '"') => quote = None,
            (Some('\''), c) => out.push(c),
            (None, '\'' | '"') => quote = Some(c),
            (_, c) if c == escape => {
                i += 1;
                if let Some(&next) = chars.get(i) {
                    out.push(next);
                }
            }
            (_, '$') => {
                let (value, used) = variable(&chars[i + 1..], vars, escape)?;
                out.push_str(&value);
                i += used;
            }
            (_, c) => out.push(c),
        }
        i += 1;
    }
    if quote.is_some() {
        return Err(format!("unterminated quote in '{word}'"));
    }
    Ok(out)
}

/// Expands each raw word (see [`expand`]).
pub fn expand_words(
    words: &[String],
    vars: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    words.iter().map(|w| expand(w, vars, '\\')).collect()
}

/// A `$…` reference starting after the `$`: (value, characters consumed after `$`).
fn variable(
    rest: &[char],
    vars: &BTreeMap<String, String>,
    escape: char,
) -> Result<(String, usize), String> {
    let lookup = |name: &str| vars.get(name).cloned().unwrap_or_default();
    if rest.first() == Some(&'{') {
        let Some(close) = rest.iter().position(|&c| c == '}') else {
            return Err("missing '}' in ${…}".into());
        };
        let inner: String = rest[1..close].iter().collect();
        let value = if let Some((name, default)) = inner.split_once(":-") {
            let v = lookup(name);
            if v.is_empty() {
                expand(default, vars, escape)?
            } else {
                v
            }
        } else if let Some((name, alt)) = inner.split_once(":+") {
            if lookup(name).is_empty() {
                String::new()
            } else {
                expand(alt, vars, escape)?
            }
        } else if valid_name(&inner) {
            lookup(&inner)
        } else {
            return Err(format!("unsupported substitution ${{{inner}}}"));
        };
        return Ok((value, close + 1));
    }
    let len = rest
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
        .count();
    if len == 0 {
        return Ok(("$".into(), 0));
    }
    let name: String = rest[..len].iter().collect();
    Ok((lookup(&name), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_the_subset() {
        let df = parse(
            "# escape=\\\n\
             ARG SUITE=bookworm\n\
             FROM debian:${SUITE} AS build\n\
             # a comment\n\
             ENV A=1 B=\"two words\"\n\
             ENV LEGACY some value\n\
             RUN apt-get update && \\\n    # inner comment\n    apt-get install -y curl\n\
             COPY --chown=user:user --chmod=755 a.sh b/ /opt/\n\
             ADD [\"x y.txt\", \"/x\"]\n\
             WORKDIR /app\n\
             USER user\n\
             LABEL k=v\n\
             EXPOSE 8080\n\
             ENTRYPOINT [\"python3\", \"-m\"]\n\
             CMD [\"http.server\", \"8000\"]\n",
        )
        .expect("parse");
        assert_eq!(df.base, Base::Debian("bookworm".into()));
        assert_eq!(df.from_line, 3);
        assert_eq!(df.start_cmd.as_deref(), Some("python3 -m http.server 8000"));
        let kinds: Vec<_> = df.instructions.iter().map(|i| (i.line, &i.kind)).collect();
        assert_eq!(
            kinds[0],
            (
                5,
                &InstructionKind::Env(vec![
                    ("A".into(), "1".into()),
                    ("B".into(), "\"two words\"".into())
                ])
            )
        );
        assert_eq!(
            kinds[1].1,
            &InstructionKind::Env(vec![("LEGACY".into(), "some value".into())])
        );
        assert_eq!(
            kinds[2],
            (
                7,
                &InstructionKind::Run(Command::Shell(
                    "apt-get update &&  apt-get install -y curl".into()
                ))
            )
        );
        assert_eq!(
            kinds[3].1,
            &InstructionKind::Copy {
                add: false,
                srcs: vec!["a.sh".into(), "b/".into()],
                dest: "/opt/".into(),
                chown: Some("user:user".into()),
                chmod: Some("755".into()),
            }
        );
        assert_eq!(
            kinds[4].1,
            &InstructionKind::Copy {
                add: true,
                srcs: vec!["x y.txt".into()],
                dest: "/x".into(),
                chown: None,
                chmod: None,
            }
        );
        assert_eq!(kinds.len(), 8);
    }

    #[test]
    fn bad_dockerfiles_name_their_line() {
        let cases = [
            (
                "FROM base\nHEALTHCHECK CMD true\n",
                2,
                "unsupported instruction",
            ),
            ("FROM base\nFROM base\n", 2, "multi-stage"),
            ("RUN true\n", 1, "before FROM"),
            ("FROM base\nRUN\n", 2, "needs arguments"),
            ("FROM base\nENV A=\"x\n", 2, "unterminated quote"),
            ("FROM base\nCOPY onlyone\n", 2, "source and a destination"),
            ("FROM base\nADD https://x/y /y\n", 2, "URL"),
            ("FROM base\nCOPY --from=a x /y\n", 2, "--from"),
            ("FROM base\nRUN <<EOF\n", 2, "heredocs"),
            ("FROM base\nRUN echo \\\n", 2, "continuation"),
            ("FROM debian:buster\n", 1, "not available"),
            ("# only a comment\n", 1, "no FROM"),
        ];
        for (text, line, needle) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn expansion_follows_docker() {
        let v = vars(&[("PATH", "/usr/bin"), ("EMPTY", ""), ("N", "x")]);
        let cases = [
            ("/opt/bin:$PATH", "/opt/bin:/usr/bin"),
            ("${PATH}/x", "/usr/bin/x"),
            ("'$PATH'", "$PATH"),
            ("\"a $N b\"", "a x b"),
            ("\\$N", "$N"),
            ("${EMPTY:-def}", "def"),
            ("${N:-def}", "x"),
            ("${N:+alt}", "alt"),
            ("${EMPTY:+alt}", ""),
            ("$UNSET-y", "-y"),
            ("cost$", "cost$"),
        ];
        for (raw, want) in cases {
            assert_eq!(expand(raw, &v, '\\').as_deref(), Ok(want), "{raw}");
        }
        assert!(expand("${N", &v, '\\').is_err());
        assert!(expand("${N/x/y}", &v, '\\').is_err());
    }

    #[test]
    fn bases() {
        assert_eq!(Base::parse("scratch"), Ok(Base::Scratch));
        assert_eq!(
            Base::parse("docker.io/library/debian:12"),
            Ok(Base::Debian("bookworm".into()))
        );
        assert_eq!(
            Base::parse("e2bdev/base"),
            Ok(Base::Template("base".into()))
        );
        assert_eq!(
            Base::parse("code-interpreter-v1"),
            Ok(Base::Template("code-interpreter-v1".into()))
        );
        assert!(Base::parse("debian:sid").is_err());
    }
}
