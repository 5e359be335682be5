//! Enforces the module layering documented in `lib.rs` by reading the `crate::…` paths of every
//! source file: lower layers never import higher ones (so no import cycles), nothing below the
//! registry imports it, and the registry reaches the mirror only through its trait.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Top-level modules, lowest layer first. A module may import only modules before it.
const LAYERS: &[&str] = &[
    "net",
    "metrics",
    "telemetry",
    "http",
    "oci",
    "activity",
    "auth",
    "store",
    "routing",
    "advertise",
    "mirror",
    "registry",
    "admin",
    "config",
    "host_config",
    "cleanup",
    "app",
];

/// Modules that must never import `registry`.
const BELOW_REGISTRY: &[&str] = &["http", "oci", "store", "routing", "advertise", "mirror"];

/// What `registry` may take from `mirror`: the trait object it is given and its request type.
const REGISTRY_FROM_MIRROR: &[&str] = &["mirror::Mirror", "mirror::MirrorRequest"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Code without `//` comments (doc links name modules without importing them).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands one use tree (`a::b`, `a::{b, c::{d}}`) at the start of `s` into full paths.
fn expand(s: &str) -> Vec<String> {
    fn tree(chars: &[char], i: &mut usize, prefix: &str, out: &mut Vec<String>) {
        let mut path = prefix.to_string();
        loop {
            while *i < chars.len() && chars[*i].is_whitespace() {
                *i += 1;
            }
            if *i < chars.len() && chars[*i] == '{' {
                *i += 1;
                loop {
                    while *i < chars.len() && (chars[*i].is_whitespace() || chars[*i] == ',') {
                        *i += 1;
                    }
                    if *i >= chars.len() || chars[*i] == '}' {
                        *i += 1;
                        return;
                    }
                    tree(chars, i, &path, out);
                }
            }
            let start = *i;
            while *i < chars.len() && (chars[*i].is_alphanumeric() || chars[*i] == '_') {
                *i += 1;
            }
            let ident: String = chars[start..*i].iter().collect();
            if ident.is_empty() {
                if !path.is_empty() {
                    out.push(path);
                }
                return;
            }
            path = if path.is_empty() {
                ident
            } else {
                format!("{path}::{ident}")
            };
            if chars[*i..].starts_with(&[':', ':']) {
                *i += 2;
                continue;
            }
            out.push(path);
            return;
        }
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    tree(&chars, &mut 0, "", &mut out);
    out
}

/// Every `crate::` path in `text`.
fn crate_paths(text: &str) -> Vec<String> {
    let code = code(text);
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // `spegel::…` or `my_crate::…` are not this crate's paths.
            code[..*i]
                .chars()
                .last()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'))
        })
        .flat_map(|(i, m)| expand(&code[i + m.len()..]))
        .collect()
}

/// For each top-level module, every `crate::` path it uses.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&root).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if ["lib", "main", "layering"].contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        out.entry(module).or_default().extend(crate_paths(&text));
    }
    out
}

fn top(path: &str) -> &str {
    path.split("::").next().unwrap_or(path)
}

#[test]
fn parser_sees_grouped_and_nested_imports() {
    let paths = crate_paths(
        "use crate::{\n    http::{Body, Response},\n    registry::Registry, // crate::app\n};\n\
         let x = crate::metrics::global(); spegel::crate::nothing;",
    );
    assert_eq!(
        paths,
        [
            "http::Body",
            "http::Response",
            "registry::Registry",
            "metrics::global"
        ]
    );
}

#[test]
fn modules_only_import_lower_layers() {
    let imports = imports();
    let mut problems = Vec::new();
    for (module, paths) in &imports {
        let Some(level) = LAYERS.iter().position(|l| l == module) else {
            problems.push(format!("{module} is not in LAYERS"));
            continue;
        };
        for dep in paths.iter().map(|p| top(p)).collect::<BTreeSet<_>>() {
            if dep == module {
                continue;
            }
            match LAYERS.iter().position(|l| *l == dep) {
                Some(d) if d < level => {}
                Some(_) => problems.push(format!("{module} imports higher layer {dep}")),
                None => problems.push(format!("{module} imports unknown module {dep}")),
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    // Every listed layer exists, so the order above is not vacuous.
    for layer in LAYERS {
        assert!(imports.contains_key(*layer), "no module {layer}");
    }
}

#[test]
fn nothing_below_the_registry_imports_it() {
    let imports = imports();
    for module in BELOW_REGISTRY {
        let bad: Vec<_> = imports[*module]
            .iter()
            .filter(|p| top(p) == "registry")
            .collect();
        assert!(bad.is_empty(), "{module} imports {bad:?}");
    }
    let from_mirror: Vec<_> = imports["registry"]
        .iter()
        .filter(|p| top(p) == "mirror")
        .filter(|p| !REGISTRY_FROM_MIRROR.contains(&p.as_str()))
        .collect();
    assert!(
        from_mirror.is_empty(),
        "registry must use the mirror only through its trait: {from_mirror:?}"
    );
}
