//! `configuration`: writes containerd `hosts.toml` mirror configuration.
//!
//! Output is byte-compatible with the original so that nodes switching implementation see no
//! diff: the template layout, the `docker.io` server rewrite, the `_default` wildcard and the
//! re-serialisation of pre-existing host entries (go-toml v2 style: literal strings, sorted keys,
//! sub-tables after keys) all match.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::auth::{self, AuthError, BasicAuth};

/// Directory inside the config path holding the configuration found before the first run.
pub const BACKUP_DIR: &str = "_backup";

/// Registry names meaning "every registry"; both map to containerd's `_default` directory.
pub const WILDCARD_REGISTRIES: [&str; 2] = ["_default", "*"];

const HOSTS_FILE: &str = "hosts.toml";

/// A filesystem operation that failed, with the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {cause}", path.display())]
pub struct FsError {
    /// What was being done, e.g. `"create directory"`.
    pub action: &'static str,
    /// Path the operation failed on.
    pub path: PathBuf,
    /// Underlying I/O error.
    pub cause: io::Error,
}

impl FsError {
    fn new(action: &'static str, path: &Path, cause: io::Error) -> Self {
        FsError {
            action,
            path: path.to_path_buf(),
            cause,
        }
    }
}

/// Reasons writing the mirror configuration can fail.
#[derive(Debug, thiserror::Error)]
pub enum HostConfigError {
    /// A registry or mirror target URL is unusable; the message lists every problem.
    #[error("{0}")]
    InvalidUrl(String),
    /// A wildcard was given where only URLs are allowed (mirror targets).
    #[error("wildcard registries are not allowed")]
    WildcardNotAllowed,
    /// Both `_default` and `*` (or one of them twice) were given.
    #[error("registries should not contain two wildcards")]
    TwoWildcards,
    /// No mirror target was given.
    #[error("at least one mirror target is required")]
    NoMirrorTargets,
    /// A filesystem operation failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// An existing `hosts.toml` to prepend could not be parsed.
    #[error("parse existing host configuration {}: {cause}", path.display())]
    ExistingHosts {
        /// The unparsable file.
        path: PathBuf,
        /// Why it was refused.
        cause: Box<ExistingHostsError>,
    },
    /// Basic-auth credentials could not be loaded.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// A validated registry or mirror URL (`scheme://host[:port]`) or the wildcard registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    // Empty for the wildcard.
    scheme: String,
    host: String,
}

impl RegistryUrl {
    fn wildcard() -> Self {
        RegistryUrl {
            scheme: String::new(),
            host: WILDCARD_REGISTRIES[0].to_string(),
        }
    }

    /// Whether this stands for every registry.
    pub fn is_wildcard(&self) -> bool {
        self.scheme.is_empty()
    }

    /// The host with optional port, i.e. the directory name under the config path.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Lower-cased scheme; empty for the wildcard.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }
}

impl fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_wildcard() {
            f.write_str(&self.host)
        } else {
            write!(f, "{}://{}", self.scheme, self.host)
        }
    }
}

/// Parses registry URLs; an empty list with `allow_wildcard` means the wildcard alone.
///
/// Each URL must be `http`/`https` with a host, and no path, query, fragment or userinfo.
pub fn parse_registries(
    registries: &[String],
    allow_wildcard: bool,
) -> Result<Vec<RegistryUrl>, HostConfigError> {
    if registries.is_empty() && allow_wildcard {
        return Ok(vec![RegistryUrl::wildcard()]);
    }
    let mut parsed = Vec::with_capacity(registries.len());
    let mut has_wildcard = false;
    for registry in registries {
        if WILDCARD_REGISTRIES.contains(&registry.as_str()) {
            if !allow_wildcard {
                return Err(HostConfigError::WildcardNotAllowed);
            }
            if has_wildcard {
                return Err(HostConfigError::TwoWildcards);
            }
            has_wildcard = true;
            parsed.push(RegistryUrl::wildcard());
            continue;
        }
        parsed.push(parse_registry_url(registry)?);
    }
    Ok(parsed)
}

/// Parses one registry URL, reporting every problem found (like the original's joined errors).
pub fn parse_registry_url(raw: &str) -> Result<RegistryUrl, HostConfigError> {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err(HostConfigError::InvalidUrl(format!(
            "invalid registry url scheme must be http or https: {raw}"
        )));
    };
    let scheme = scheme.to_ascii_lowercase();
    let mut problems = Vec::new();
    if scheme != "http" && scheme != "https" {
        problems.push(format!(
            "invalid registry url scheme must be http or https: {raw}"
        ));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (before_fragment, fragment) = match tail.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (tail, None),
    };
    let (path, query) = match before_fragment.split_once('?') {
        Some((path, query)) => (path, query),
        None => (before_fragment, ""),
    };
    if !path.is_empty() {
        problems.push(format!("invalid registry url path has to be empty: {raw}"));
    }
    if !query.is_empty() {
        problems.push(format!("invalid registry url query has to be empty: {raw}"));
    }
    if fragment.is_some_and(|f| !f.is_empty()) {
        problems.push(format!(
            "invalid registry url fragment has to be empty: {raw}"
        ));
    }
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => {
            problems.push(format!("invalid registry url user has to be empty: {raw}"));
            host
        }
        None => authority,
    };
    if !valid_host(host) {
        problems.push(format!(
            "invalid registry url host must be a hostname or IP address with an optional port: {raw}"
        ));
    }
    if !problems.is_empty() {
        return Err(HostConfigError::InvalidUrl(problems.join("; ")));
    }
    Ok(RegistryUrl {
        scheme,
        host: host.to_string(),
    })
}

// Strict on purpose: the host ends up inside a TOML literal string and as a directory name.
fn valid_host(host: &str) -> bool {
    let (name_ok, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return false,
            },
        };
        (ip.parse::<std::net::Ipv6Addr>().is_ok(), port)
    } else {
        let (name, port) = match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        };
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        (ok, port)
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
    });
    name_ok && port_ok
}

/// Wraps an unbracketed IPv6 host in brackets: `http://fd00::1:30020` ⇒ `http://[fd00::1]:30020`.
///
/// Applies when the host part has at least two `:` and no `[`; the last `:` starts the port
/// unless the whole host is an IPv6 address (then there is no port).
pub fn encapsulate_ipv6_host(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else {
        return raw.to_string();
    };
    let (prefix, rest) = raw.split_at(scheme_end + 3);
    let host_end = rest.find('/').unwrap_or(rest.len());
    let (host, suffix) = rest.split_at(host_end);
    if host.matches(':').count() < 2 || host.contains('[') {
        return raw.to_string();
    }
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        return format!("{prefix}[{host}]{suffix}");
    }
    let Some(last_colon) = host.rfind(':') else {
        return raw.to_string();
    };
    let (ip, port) = host.split_at(last_colon);
    format!("{prefix}[{ip}]{port}{suffix}")
}

/// Writes containerd mirror configuration (spec §4.6) under `config_path`.
///
/// Validates all URLs first, backs up the existing configuration once into `_backup`, clears
/// everything else, then writes one `<host>/hosts.toml` per mirrored registry listing the
/// mirror targets in order. With `prepend_existing` the backed-up host entries for the same
/// registry follow ours, and their side files (certificates) are copied back.
pub fn write_mirror_configuration(
    config_path: &Path,
    mirrored_registries: &[String],
    mirror_targets: &[String],
    resolve_tags: bool,
    prepend_existing: bool,
    auth: Option<&BasicAuth>,
) -> Result<(), HostConfigError> {
    let registries = parse_registries(mirrored_registries, true)?;
    let mut targets_raw = mirror_targets.to_vec();
    let Some(first) = targets_raw.first_mut() else {
        return Err(HostConfigError::NoMirrorTargets);
    };
    // Only the first target is templated from the node IP by the chart; later ones are user input.
    *first = encapsulate_ipv6_host(first);
    let targets = parse_registries(&targets_raw, false)?;

    create_dir_all(config_path)?;
    backup_config(config_path)?;
    clear_config(config_path)?;

    let capabilities = if resolve_tags {
        "['pull', 'resolve']"
    } else {
        "['pull']"
    };
    let authorization = auth.map(BasicAuth::header_value);
    for registry in &registries {
        let mut contents =
            templated_hosts(registry, &targets, capabilities, authorization.as_deref());
        if prepend_existing {
            let existing = existing_hosts(config_path, registry)?;
            if !existing.is_empty() {
                copy_side_files(
                    &config_path.join(BACKUP_DIR).join(registry.host()),
                    &config_path.join(registry.host()),
                )?;
                contents.push_str("\n\n");
                contents.push_str(&existing);
                tracing::info!(registry = %registry, "prepending to existing containerd mirror configuration");
            }
        }
        let dir = config_path.join(registry.host());
        create_dir_all(&dir)?;
        let file = dir.join(HOSTS_FILE);
        write_file(&file, contents.as_bytes())?;
        tracing::info!(registry = %registry, path = %file.display(), "added containerd mirror configuration");
    }
    Ok(())
}

/// Entry point of the `configuration` subcommand: loads basic auth from [`auth::DEFAULT_DIR`].
pub async fn run_configuration(
    args: &crate::config::ConfigurationArgs,
) -> Result<(), HostConfigError> {
    run_configuration_with_auth_dir(args, Path::new(auth::DEFAULT_DIR)).await
}

/// Like [`run_configuration`] with credentials read from `auth_dir`.
pub async fn run_configuration_with_auth_dir(
    args: &crate::config::ConfigurationArgs,
    auth_dir: &Path,
) -> Result<(), HostConfigError> {
    let auth = BasicAuth::load(auth_dir)?;
    // Blocking file I/O is fine here: this one-shot command has nothing else to run.
    write_mirror_configuration(
        &args.containerd_registry_config_path,
        &args.mirrored_registries,
        &args.mirror_targets,
        args.resolve_tags,
        args.prepend_existing,
        auth.as_ref(),
    )
}

fn templated_hosts(
    registry: &RegistryUrl,
    targets: &[RegistryUrl],
    capabilities: &str,
    authorization: Option<&str>,
) -> String {
    let mut out = String::new();
    if !registry.is_wildcard() {
        let server = registry.to_string();
        let server = if server == "https://docker.io" {
            "https://registry-1.docker.io".to_string()
        } else {
            server
        };
        out.push_str(&format!("server = '{server}'"));
    }
    out.push('\n');
    for target in targets {
        out.push_str(&format!(
            "\n[host.'{target}']\ncapabilities = {capabilities}\ndial_timeout = '200ms'"
        ));
        if let Some(authorization) = authorization {
            out.push_str(&format!(
                "\n[host.'{target}'.header]\nAuthorization = '{authorization}'"
            ));
        }
        out.push('\n');
    }
    out.trim().to_string()
}

/// Re-serialises the `[host.'…']` tables of the backed-up `hosts.toml` of `registry`.
fn existing_hosts(config_path: &Path, registry: &RegistryUrl) -> Result<String, HostConfigError> {
    let path = config_path
        .join(BACKUP_DIR)
        .join(registry.host())
        .join(HOSTS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(FsError::new("read", &path, e).into()),
    };
    reencode_existing_hosts(&text).map_err(|e| HostConfigError::ExistingHosts {
        path: path.clone(),
        cause: Box::new(e),
    })
}

/// Deepest table nesting accepted in an existing `hosts.toml` (a real one has `host.'…'.header`).
const MAX_EXISTING_NESTING: usize = 8;

/// Why an existing `hosts.toml` cannot be prepended.
#[derive(Debug, thiserror::Error)]
pub enum ExistingHostsError {
    /// Not TOML.
    #[error(transparent)]
    Parse(#[from] toml_edit::TomlError),
    /// Tables nested deeper than any containerd setting; re-encoding such a file as headers
    /// grows it quadratically and the result no longer parses.
    #[error("tables nested {depth} deep (at most {MAX_EXISTING_NESTING})")]
    TooDeep {
        /// Nesting found.
        depth: usize,
    },
}

fn nesting(item: &toml_edit::Item) -> usize {
    fn value_depth(value: &toml_edit::Value) -> usize {
        match value {
            toml_edit::Value::Array(a) => 1 + a.iter().map(value_depth).max().unwrap_or(0),
            toml_edit::Value::InlineTable(t) => {
                1 + t.iter().map(|(_, v)| value_depth(v)).max().unwrap_or(0)
            }
            _ => 0,
        }
    }
    match item {
        toml_edit::Item::None => 0,
        toml_edit::Item::Value(v) => value_depth(v),
        toml_edit::Item::Table(t) => 1 + t.iter().map(|(_, i)| nesting(i)).max().unwrap_or(0),
        toml_edit::Item::ArrayOfTables(a) => {
            1 + a
                .iter()
                .flat_map(|t| t.iter().map(|(_, i)| nesting(i)))
                .max()
                .unwrap_or(0)
        }
    }
}

/// Re-serialises the `[host.'…']` tables of a `hosts.toml` text, as `--prepend-existing` does.
pub fn reencode_existing_hosts(text: &str) -> Result<String, ExistingHostsError> {
    let doc: toml_edit::DocumentMut = text.parse()?;
    let depth = nesting(doc.as_item());
    if depth > MAX_EXISTING_NESTING {
        return Err(ExistingHostsError::TooDeep { depth });
    }
    let Some(hosts) = doc.get("host").and_then(toml_edit::Item::as_table) else {
        return Ok(String::new());
    };
    // Only hosts with their own `[host.'…']` header count, in header order (as the original).
    let mut ordered: Vec<(usize, &str, &toml_edit::Table)> = hosts
        .iter()
        .filter_map(|(key, item)| {
            let table = item.as_table()?;
            if table.is_implicit() || table.is_dotted() {
                return None;
            }
            Some((table.position()?, key, table))
        })
        .collect();
    ordered.sort_by_key(|(position, _, _)| *position);
    let chunks: Vec<String> = ordered
        .into_iter()
        .map(|(_, key, table)| {
            let mut out = String::new();
            let mut path = vec!["host".to_string(), key.to_string()];
            go_toml::encode_table(&mut out, &mut path, &go_toml::from_table(table), true);
            out
        })
        .collect();
    Ok(chunks.join("\n").trim().to_string())
}

fn copy_side_files(src_root: &Path, dst_root: &Path) -> Result<(), HostConfigError> {
    let mut pending = vec![PathBuf::new()];
    while let Some(relative_dir) = pending.pop() {
        let dir = src_root.join(&relative_dir);
        for entry in read_dir_sorted(&dir)? {
            let relative = relative_dir.join(&entry.name);
            let src = src_root.join(&relative);
            if entry.file_type.is_dir() {
                pending.push(relative);
                continue;
            }
            if entry.name == HOSTS_FILE {
                continue;
            }
            if entry.file_type.is_symlink() && src.is_dir() {
                tracing::warn!(path = %src.display(), "not copying symlinked directory");
                continue;
            }
            let dst = dst_root.join(&relative);
            if let Some(parent) = dst.parent() {
                create_dir_all(parent)?;
            }
            // fs::copy keeps the permission bits, so private keys stay private.
            fs::copy(&src, &dst).map_err(|e| FsError::new("copy", &src, e))?;
        }
    }
    Ok(())
}

fn backup_config(config_path: &Path) -> Result<(), FsError> {
    let backup = config_path.join(BACKUP_DIR);
    if dir_exists(&backup)? {
        return Ok(());
    }
    let entries = read_dir_sorted(config_path)?;
    create_dir_all(&backup)?;
    for entry in entries {
        let from = config_path.join(&entry.name);
        let to = backup.join(&entry.name);
        fs::rename(&from, &to).map_err(|e| FsError::new("move", &from, e))?;
        tracing::info!(path = %from.display(), "backing up containerd host configuration");
    }
    Ok(())
}

/// Removes everything in `config_path` except the backup directory.
pub(crate) fn clear_config(config_path: &Path) -> Result<(), FsError> {
    for entry in read_dir_sorted(config_path)? {
        if entry.name == BACKUP_DIR {
            continue;
        }
        let path = config_path.join(&entry.name);
        let result = if entry.file_type.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(|e| FsError::new("remove", &path, e))?;
    }
    Ok(())
}

/// Whether `path` is an existing directory; a missing path is not an error.
pub(crate) fn dir_exists(path: &Path) -> Result<bool, FsError> {
    match fs::metadata(path) {
        Ok(meta) => Ok(meta.is_dir()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(FsError::new("stat", path, e)),
    }
}

/// A directory entry's name and type (not following symlinks).
pub(crate) struct DirEntry {
    pub(crate) name: std::ffi::OsString,
    pub(crate) file_type: fs::FileType,
}

/// Lists a directory sorted by name, so moves and logs are deterministic.
pub(crate) fn read_dir_sorted(dir: &Path) -> Result<Vec<DirEntry>, FsError> {
    let list = |e| FsError::new("list", dir, e);
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(list)? {
        let entry = entry.map_err(list)?;
        let file_type = entry
            .file_type()
            .map_err(|e| FsError::new("stat", &entry.path(), e))?;
        entries.push(DirEntry {
            name: entry.file_name(),
            file_type,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

fn create_dir_all(path: &Path) -> Result<(), FsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| FsError::new("create directory", path, e))
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), FsError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| FsError::new("create", path, e))?;
    file.write_all(contents)
        .map_err(|e| FsError::new("write", path, e))
}

/// TOML output in the style of go-toml v2's `Marshal` of `map[string]any`, which the original
/// uses to re-serialise existing host entries.
mod go_toml {
    use std::collections::BTreeMap;

    /// A decoded TOML value, with inline tables, standard tables and dotted keys unified.
    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Value {
        Str(String),
        Int(i64),
        Float(f64),
        Bool(bool),
        Datetime(String),
        Array(Vec<Value>),
        Table(BTreeMap<String, Value>),
    }

    pub(super) fn from_table(table: &toml_edit::Table) -> BTreeMap<String, Value> {
        table
            .iter()
            .filter_map(|(key, item)| from_item(item).map(|v| (key.to_string(), v)))
            .collect()
    }

    fn from_item(item: &toml_edit::Item) -> Option<Value> {
        match item {
            toml_edit::Item::None => None,
            toml_edit::Item::Value(v) => Some(from_value(v)),
            toml_edit::Item::Table(t) => Some(Value::Table(from_table(t))),
            toml_edit::Item::ArrayOfTables(a) => Some(Value::Array(
                a.iter().map(|t| Value::Table(from_table(t))).collect(),
            )),
        }
    }

    fn from_value(value: &toml_edit::Value) -> Value {
        match value {
            toml_edit::Value::String(s) => Value::Str(s.value().clone()),
            toml_edit::Value::Integer(i) => Value::Int(*i.value()),
            toml_edit::Value::Float(f) => Value::Float(*f.value()),
            toml_edit::Value::Boolean(b) => Value::Bool(*b.value()),
            toml_edit::Value::Datetime(d) => Value::Datetime(format_datetime(d.value())),
            toml_edit::Value::Array(a) => Value::Array(a.iter().map(from_value).collect()),
            toml_edit::Value::InlineTable(t) => Value::Table(
                t.iter()
                    .map(|(k, v)| (k.to_string(), from_value(v)))
                    .collect(),
            ),
        }
    }

    // Go formats a zero offset as `Z` (RFC 3339 layout).
    fn format_datetime(dt: &toml_edit::Datetime) -> String {
        let mut dt = *dt;
        if let Some(toml_edit::Offset::Custom { minutes: 0 }) = dt.offset {
            dt.offset = Some(toml_edit::Offset::Z);
        }
        dt.to_string()
    }

    fn is_table_like(value: &Value) -> bool {
        match value {
            Value::Table(_) => true,
            Value::Array(items) => {
                !items.is_empty() && items.iter().all(|v| matches!(v, Value::Table(_)))
            }
            _ => false,
        }
    }

    /// Writes `[path]` (if `header`), the sorted key/values, then the sorted sub-tables.
    pub(super) fn encode_table(
        out: &mut String,
        path: &mut Vec<String>,
        table: &BTreeMap<String, Value>,
        header: bool,
    ) {
        if header {
            out.push('[');
            encode_path(out, path);
            out.push_str("]\n");
        }
        let mut has_kv = false;
        for (key, value) in table.iter().filter(|(_, v)| !is_table_like(v)) {
            has_kv = true;
            encode_key(out, key);
            out.push_str(" = ");
            encode_value(out, value);
            out.push('\n');
        }
        let mut first = true;
        for (key, value) in table.iter().filter(|(_, v)| is_table_like(v)) {
            if !first || has_kv {
                out.push('\n');
            }
            first = false;
            path.push(key.clone());
            match value {
                Value::Table(t) => encode_table(out, path, t, true),
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if i != 0 {
                            out.push('\n');
                        }
                        out.push_str("[[");
                        encode_path(out, path);
                        out.push_str("]]\n");
                        if let Value::Table(t) = item {
                            encode_table(out, path, t, false);
                        }
                    }
                }
                _ => {}
            }
            path.pop();
        }
    }

    fn encode_path(out: &mut String, path: &[String]) {
        for (i, key) in path.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            encode_key(out, key);
        }
    }

    // Values inside a key/value: tables become inline tables.
    fn encode_value(out: &mut String, value: &Value) {
        match value {
            Value::Str(s) => encode_string(out, s),
            Value::Int(i) => out.push_str(&i.to_string()),
            Value::Float(f) => out.push_str(&format_float(*f)),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Datetime(d) => out.push_str(d),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    encode_value(out, item);
                }
                out.push(']');
            }
            Value::Table(t) => {
                out.push('{');
                for (i, (key, item)) in t.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    encode_key(out, key);
                    out.push_str(" = ");
                    encode_value(out, item);
                }
                out.push('}');
            }
        }
    }

    fn format_float(f: f64) -> String {
        if f.is_nan() {
            "nan".to_string()
        } else if f.is_infinite() {
            if f > 0.0 { "inf" } else { "-inf" }.to_string()
        } else if f.trunc() == f {
            format!("{f:.1}")
        } else {
            // Rust's shortest round-trip form never uses an exponent, like Go's 'f', -1.
            format!("{f}")
        }
    }

    fn invalid_ascii(b: u8) -> bool {
        matches!(b, 0x00..=0x08 | 0x0b | 0x0c | 0x0e..=0x1f | 0x7f)
    }

    fn needs_quoting(s: &str) -> bool {
        s.bytes()
            .any(|b| b == b'\'' || b == b'\r' || b == b'\n' || invalid_ascii(b))
    }

    fn encode_string(out: &mut String, s: &str) {
        if needs_quoting(s) {
            encode_quoted(out, s);
        } else {
            out.push('\'');
            out.push_str(s);
            out.push('\'');
        }
    }

    fn encode_quoted(out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{0}'..='\u{1f}' | '\u{7f}' => out.push_str(&format!("\\u{:04X}", c as u32)),
                _ => out.push(c),
            }
        }
        out.push('"');
    }

    fn encode_key(out: &mut String, key: &str) {
        if key.is_empty() {
            out.push_str("''");
            return;
        }
        if key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            out.push_str(key);
        } else if needs_quoting(key) {
            encode_quoted(out, key);
        } else {
            out.push('\'');
            out.push_str(key);
            out.push('\'');
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn reencode(text: &str) -> String {
            let doc: toml_edit::DocumentMut = text.parse().unwrap();
            let mut out = String::new();
            encode_table(
                &mut out,
                &mut Vec::new(),
                &from_table(doc.as_table()),
                false,
            );
            out
        }

        #[test]
        fn scalars_and_strings() {
            assert_eq!(
                reencode("b = 1.5\na = \"it's\"\nc = 2.0\nd = 0x10\ne = \"tab\\there\"\nf = true"),
                "a = \"it's\"\nb = 1.5\nc = 2.0\nd = 16\ne = 'tab\there'\nf = true\n"
            );
            assert_eq!(
                reencode("s = \"a\\nb\\u0001\\\\\"\n"),
                "s = \"a\\nb\\u0001\\\\\"\n"
            );
            assert_eq!(
                reencode("x = inf\ny = nan\nz = -inf"),
                "x = inf\ny = nan\nz = -inf\n"
            );
        }

        #[test]
        fn keys_are_quoted_only_when_needed() {
            assert_eq!(
                reencode("\"a.b\" = 1\n\"it's\" = 2\nplain-key_1 = 3\n\"\" = 4"),
                "'' = 4\n'a.b' = 1\n\"it's\" = 2\nplain-key_1 = 3\n"
            );
        }

        #[test]
        fn tables_after_keys_and_arrays_of_tables() {
            let text = "z = 1\n[t]\nb = [1, 2]\n[t.sub]\nk = 'v'\n[[arr]]\nx = 1\n[[arr]]\nx = 2\n";
            assert_eq!(
                reencode(text),
                "z = 1\n\n[[arr]]\nx = 1\n\n[[arr]]\nx = 2\n\n[t]\nb = [1, 2]\n\n[t.sub]\nk = 'v'\n"
            );
        }

        #[test]
        fn inline_tables_become_tables_unless_mixed_in_arrays() {
            assert_eq!(
                reencode("a = {y = 1, x = 'v'}\nb = [1, {k = 2}]\nc = []"),
                "b = [1, {k = 2}]\nc = []\n\n[a]\nx = 'v'\ny = 1\n"
            );
        }

        #[test]
        fn datetimes() {
            assert_eq!(
                reencode("a = 1979-05-27T07:32:00+00:00\nb = 1979-05-27"),
                "a = 1979-05-27T07:32:00Z\nb = 1979-05-27\n"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parse_registries_wildcards() {
        let parsed = parse_registries(
            &strings(&["https://docker.io", "_default", "http://localhost:9090"]),
            true,
        )
        .unwrap();
        let shown: Vec<String> = parsed.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["https://docker.io", "_default", "http://localhost:9090"]
        );
        assert!(parsed[1].is_wildcard());
        assert_eq!(parsed[2].host(), "localhost:9090");

        let empty = parse_registries(&[], true).unwrap();
        assert_eq!(empty.len(), 1);
        assert!(empty[0].is_wildcard());
        assert!(parse_registries(&[], false).unwrap().is_empty());

        let err = parse_registries(&strings(&["*", "_default"]), true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "registries should not contain two wildcards"
        );
        let err = parse_registries(&strings(&["*"]), false).unwrap_err();
        assert_eq!(err.to_string(), "wildcard registries are not allowed");
    }

    #[test]
    fn registry_url_validation_messages() {
        let cases = [
            (
                "ftp://docker.io",
                "invalid registry url scheme must be http or https: ftp://docker.io",
            ),
            (
                "https://docker.io/foo/bar",
                "invalid registry url path has to be empty: https://docker.io/foo/bar",
            ),
            (
                "https://docker.io/",
                "invalid registry url path has to be empty: https://docker.io/",
            ),
            (
                "https://docker.io?foo=bar",
                "invalid registry url query has to be empty: https://docker.io?foo=bar",
            ),
            (
                "https://foo@docker.io",
                "invalid registry url user has to be empty: https://foo@docker.io",
            ),
            (
                "docker.io",
                "invalid registry url scheme must be http or https: docker.io",
            ),
            (
                "https://docker.io#frag",
                "invalid registry url fragment has to be empty: https://docker.io#frag",
            ),
        ];
        for (input, expected) in cases {
            let err = parse_registry_url(input).unwrap_err();
            assert_eq!(err.to_string(), expected, "{input}");
        }
        let err = parse_registry_url("ftp://user:pw@docker.io/x?y=z").unwrap_err();
        let msg = err.to_string();
        for part in ["scheme", "path", "query", "user"] {
            assert!(msg.contains(part), "{msg} should mention {part}");
        }
        for bad_host in [
            "http://",
            "http://foo bar",
            "http://foo:",
            "http://foo:99999",
            "http://foo:ab",
            "http://fd00::1:5000",
            "http://[zz::1]:5000",
            "http://it's",
        ] {
            let err = parse_registry_url(bad_host).unwrap_err();
            assert!(err.to_string().contains("host"), "{bad_host}: {err}");
        }
    }

    #[test]
    fn registry_url_accepts_hosts_and_lowercases_scheme() {
        let u = parse_registry_url("HTTPS://docker.io").unwrap();
        assert_eq!(u.to_string(), "https://docker.io");
        let u = parse_registry_url("http://[fd00::1]:30020").unwrap();
        assert_eq!(u.host(), "[fd00::1]:30020");
        let u = parse_registry_url("http://my_registry.local").unwrap();
        assert_eq!(u.host(), "my_registry.local");
    }

    #[test]
    fn ipv6_encapsulation() {
        assert_eq!(
            encapsulate_ipv6_host("http://fc00:f853:ccd:e793::2:30020"),
            "http://[fc00:f853:ccd:e793::2]:30020"
        );
        assert_eq!(
            encapsulate_ipv6_host("http://fd00::1:30020"),
            "http://[fd00::1]:30020"
        );
        assert_eq!(
            encapsulate_ipv6_host("http://[fd00::1]:30020"),
            "http://[fd00::1]:30020"
        );
        assert_eq!(
            encapsulate_ipv6_host("http://10.0.0.1:30020"),
            "http://10.0.0.1:30020"
        );
        assert_eq!(encapsulate_ipv6_host("fd00::1:30020"), "fd00::1:30020");
        // A bare IPv6 address has no port to split off.
        assert_eq!(encapsulate_ipv6_host("http://fd00::1"), "http://[fd00::1]");
    }

    #[test]
    fn existing_hosts_matches_original() {
        let dir = tempfile::tempdir().unwrap();
        let registry = parse_registry_url("https://ghcr.io").unwrap();
        assert_eq!(existing_hosts(dir.path(), &registry).unwrap(), "");

        let toml_hosts = r#"server = "https://registry-1.docker.io"
[host."https://mirror.registry"]
  capabilities = ["pull"]
  ca = "/etc/certs/mirror.pem"
  skip_verify = false
  [host."https://mirror.registry".header]
    x-custom-2 = ["value1", "value2"]

[host]

[host."https://mirror-bak.registry/us"]
  capabilities = ["pull"]
  skip_verify = true

[host."http://mirror.registry"]
  capabilities = ["pull"]

[host."https://test-3.registry"]
  client = ["/etc/certs/client-1.pem", "/etc/certs/client-2.pem"]

[host."https://test-2.registry".header]
  x-custom-2 = ["foo"]

[host."https://test-1.registry"]
  capabilities = ["pull", "resolve", "push"]
  ca = ["/etc/certs/test-1-ca.pem", "/etc/certs/special.pem"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"],["/etc/certs/client.pem", ""]]

[host."https://test-2.registry"]
  client = "/etc/certs/client.pem"

[host."https://non-compliant-mirror.registry/v2/upstream"]
  capabilities = ["pull"]
  override_path = true"#;
        let backup = dir.path().join(BACKUP_DIR).join("ghcr.io");
        fs::create_dir_all(&backup).unwrap();
        fs::write(backup.join(HOSTS_FILE), toml_hosts).unwrap();
        let expected = "[host.'https://mirror.registry']
ca = '/etc/certs/mirror.pem'
capabilities = ['pull']
skip_verify = false

[host.'https://mirror.registry'.header]
x-custom-2 = ['value1', 'value2']

[host.'https://mirror-bak.registry/us']
capabilities = ['pull']
skip_verify = true

[host.'http://mirror.registry']
capabilities = ['pull']

[host.'https://test-3.registry']
client = ['/etc/certs/client-1.pem', '/etc/certs/client-2.pem']

[host.'https://test-1.registry']
ca = ['/etc/certs/test-1-ca.pem', '/etc/certs/special.pem']
capabilities = ['pull', 'resolve', 'push']
client = [['/etc/certs/client.cert', '/etc/certs/client.key'], ['/etc/certs/client.pem', '']]

[host.'https://test-2.registry']
client = '/etc/certs/client.pem'

[host.'https://test-2.registry'.header]
x-custom-2 = ['foo']

[host.'https://non-compliant-mirror.registry/v2/upstream']
capabilities = ['pull']
override_path = true";
        assert_eq!(existing_hosts(dir.path(), &registry).unwrap(), expected);
    }

    #[test]
    fn existing_hosts_without_host_headers_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let registry = parse_registry_url("https://ghcr.io").unwrap();
        let backup = dir.path().join(BACKUP_DIR).join("ghcr.io");
        fs::create_dir_all(&backup).unwrap();
        // Hosts only reachable through dotted keys or deeper headers are ignored, as in Go.
        fs::write(
            backup.join(HOSTS_FILE),
            "server = 'x'\n[host]\n'a'.capabilities = ['pull']\n[host.'b'.header]\nk = 'v'\n",
        )
        .unwrap();
        assert_eq!(existing_hosts(dir.path(), &registry).unwrap(), "");
    }

    #[test]
    fn existing_hosts_invalid_toml_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let registry = parse_registry_url("https://ghcr.io").unwrap();
        let backup = dir.path().join(BACKUP_DIR).join("ghcr.io");
        fs::create_dir_all(&backup).unwrap();
        fs::write(backup.join(HOSTS_FILE), "[host.'a'\n").unwrap();
        let err = existing_hosts(dir.path(), &registry).unwrap_err();
        assert!(
            matches!(err, HostConfigError::ExistingHosts { .. }),
            "{err}"
        );
    }

    #[test]
    fn existing_hosts_nested_too_deep_is_refused() {
        // Found by the hosts_toml fuzz target: one long dotted key re-encoded as ~100 nested
        // headers, quadratic in size and unparsable the second time.
        let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        let text = format!(
            "[host.'http://a:5000']\ncapabilities = ['pull']\n{} = 1\n",
            keys.join(".")
        );
        let err = reencode_existing_hosts(&text).unwrap_err();
        assert!(
            matches!(err, ExistingHostsError::TooDeep { depth } if depth > MAX_EXISTING_NESTING),
            "{err}"
        );
        let fine = "[host.'http://a:5000']\ncapabilities = ['pull']\n\n[host.'http://a:5000'.header]\nx = ['y']\n";
        let once = reencode_existing_hosts(fine).unwrap();
        assert_eq!(reencode_existing_hosts(&once).unwrap(), once);
    }

    #[test]
    fn backup_config_moves_entries_once() {
        let dir = tempfile::tempdir().unwrap();
        backup_config(dir.path()).unwrap();
        assert!(dir_exists(&dir.path().join(BACKUP_DIR)).unwrap());
        assert!(
            read_dir_sorted(&dir.path().join(BACKUP_DIR))
                .unwrap()
                .is_empty()
        );

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("test.txt"), "Hello World").unwrap();
        backup_config(dir.path()).unwrap();
        let backed_up = read_dir_sorted(&dir.path().join(BACKUP_DIR)).unwrap();
        assert_eq!(backed_up.len(), 1);
        assert_eq!(backed_up[0].name, "test.txt");
    }
}
