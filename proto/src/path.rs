//! Lexical paths: `.` and `name/..` resolved without touching the file system, the one rule
//! every part of Kiln applies to the paths a user writes (job files, store URLs).

use std::path::{Component, Path, PathBuf};

/// `p` with `.` components and `name/..` pairs removed, without touching the file system.
/// A `..` at the root stays at the root (`/..` is `/`); a leading `..` of a relative path is
/// kept (`../x` stays `../x`); an empty result is `.`.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// `base/rel`, [`normalize`]d: `jobs/../runs/x` reads `runs/x` in messages.
pub fn lexical_join(base: &Path, rel: &Path) -> PathBuf {
    normalize(&base.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_dot_dot_are_resolved_lexically() {
        let n = |p: &str| normalize(Path::new(p));
        assert_eq!(n("/tmp/x/../y"), PathBuf::from("/tmp/y"));
        assert_eq!(n("/a/./b/"), PathBuf::from("/a/b"));
        assert_eq!(n("/.."), PathBuf::from("/"));
        assert_eq!(n("/../../c"), PathBuf::from("/c"));
        assert_eq!(n("../x"), PathBuf::from("../x"));
        assert_eq!(n("a/../../x"), PathBuf::from("../x"));
        assert_eq!(n("a/.."), PathBuf::from("."));
        assert_eq!(n(""), PathBuf::from("."));
    }

    #[test]
    fn lexical_join_drops_dot_and_dot_dot() {
        assert_eq!(
            lexical_join(Path::new("jobs"), Path::new("../runs/./x")),
            PathBuf::from("runs/x")
        );
        assert_eq!(
            lexical_join(Path::new("/a/b"), Path::new("../../../c")),
            PathBuf::from("/c")
        );
        assert_eq!(
            lexical_join(Path::new(""), Path::new("x")),
            PathBuf::from("x")
        );
        assert_eq!(
            lexical_join(Path::new(".."), Path::new("../x")),
            PathBuf::from("../../x")
        );
    }
}
