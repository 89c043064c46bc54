//! Templates that ship with SoulBox, defined as Dockerfiles in the repository's `templates/`
//! directory and compiled into the binary, so `soulbox serve` and `soulbox template build
//! <name>` need no checkout. Their names are reserved: only their own Dockerfile builds them.

/// A shipped template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shipped {
    pub name: &'static str,
    pub dockerfile: &'static str,
}

/// Every shipped template.
pub const SHIPPED: &[Shipped] = &[
    Shipped {
        name: "base",
        dockerfile: include_str!("../../../templates/base/Dockerfile"),
    },
    Shipped {
        name: "code-interpreter-v1",
        dockerfile: include_str!("../../../templates/code-interpreter-v1/Dockerfile"),
    },
];

/// The shipped template called `name`.
pub fn shipped(name: &str) -> Option<&'static Shipped> {
    SHIPPED.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_dockerfiles_parse() {
        for s in SHIPPED {
            crate::dockerfile::parse(s.dockerfile).unwrap_or_else(|e| panic!("{}: {e}", s.name));
        }
        assert!(shipped("base").is_some());
        assert!(shipped("nope").is_none());
    }

    #[test]
    fn legacy_base_installs_what_the_base_dockerfile_does() {
        let df = shipped(crate::BASE)
            .map(|s| s.dockerfile)
            .unwrap_or_default();
        for p in crate::BASE_PACKAGES {
            assert!(
                df.split_whitespace().any(|w| w == *p),
                "{p} is missing from templates/base/Dockerfile"
            );
        }
        assert!(df.contains(&format!(
            "--uid 1000 --user-group --shell /bin/bash {}",
            crate::DEFAULT_USER
        )));
    }
}
