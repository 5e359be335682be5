//! Golden tests for `configuration` (spec §4.6): the expected files are the original's
//! `mirror_test.go` outputs, compared byte for byte over the whole config directory.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use spegel::auth::BasicAuth;
use spegel::host_config::{HostConfigError, write_mirror_configuration};

struct Case {
    name: &'static str,
    mirrored_registries: &'static [&'static str],
    mirror_targets: &'static [&'static str],
    resolve_tags: bool,
    prepend_existing: bool,
    create_config_dir: bool,
    auth: Option<BasicAuth>,
    existing: &'static [(&'static str, &'static str)],
    expected: &'static [(&'static str, &'static str)],
}

impl Default for Case {
    fn default() -> Self {
        Case {
            name: "",
            mirrored_registries: &[],
            mirror_targets: &["http://127.0.0.1:5000"],
            resolve_tags: true,
            prepend_existing: false,
            create_config_dir: true,
            auth: None,
            existing: &[],
            expected: &[],
        }
    }
}

const DOCKER_RESOLVE: &str = "server = 'https://registry-1.docker.io'

[host.'http://127.0.0.1:5000']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'";

const FOO_RESOLVE: &str = "server = 'http://foo.bar:5000'

[host.'http://127.0.0.1:5000']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'";

const EXISTING_DOCKER: &str = "server = 'https://registry-1.docker.io'

[host.'http://example.com:30020']
capabilities = ['pull', 'resolve']
client = ['/etc/certs/xxx/client.cert', '/etc/certs/xxx/client.key']

[host.'http://example.com:30021']
client = ['/etc/certs/xxx/client.cert', '/etc/certs/xxx/client.key']
capabilities = ['pull', 'resolve']

[host.'http://bar.com:30020']
capabilities = ['pull', 'resolve']
client = ['/etc/certs/xxx/client.cert', '/etc/certs/xxx/client.key']";

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Every regular file under `root`, keyed by its relative path.
fn files(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, fs::read_to_string(&path).unwrap());
            }
        }
    }
    out
}

fn write_files(root: &Path, entries: &[(&str, &str)]) {
    for (rel, contents) in entries {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }
}

fn run(case: &Case) {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("etc").join("containerd").join("certs.d");
    if case.create_config_dir {
        fs::create_dir_all(&config).unwrap();
    }
    write_files(&config, case.existing);
    write_mirror_configuration(
        &config,
        &strings(case.mirrored_registries),
        &strings(case.mirror_targets),
        case.resolve_tags,
        case.prepend_existing,
        case.auth.as_ref(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    assert!(config.join("_backup").is_dir(), "{}", case.name);
    let expected: BTreeMap<String, String> = case
        .expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let actual = files(&config);
    for (path, contents) in &expected {
        match actual.get(path) {
            Some(got) => assert_eq!(got, contents, "{}: {path}", case.name),
            None => panic!("{}: missing {path}", case.name),
        }
    }
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "{}",
        case.name
    );
}

#[test]
fn multiple_mirror_targets() {
    run(&Case {
        name: "multiple mirror targets",
        mirrored_registries: &["http://foo.bar:5000"],
        mirror_targets: &[
            "http://127.0.0.1:5000",
            "http://127.0.0.2:5000",
            "http://127.0.0.1:5001",
        ],
        create_config_dir: false,
        expected: &[(
            "foo.bar:5000/hosts.toml",
            "server = 'http://foo.bar:5000'

[host.'http://127.0.0.1:5000']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'

[host.'http://127.0.0.2:5000']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'

[host.'http://127.0.0.1:5001']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'",
        )],
        ..Case::default()
    });
}

#[test]
fn empty_mirrored_registries_defaults_to_default() {
    let expected: &[(&str, &str)] = &[(
        "_default/hosts.toml",
        "[host.'http://127.0.0.1:5000']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'",
    )];
    run(&Case {
        name: "empty mirrored registries",
        create_config_dir: false,
        expected,
        ..Case::default()
    });
    for wildcard in ["_default", "*"] {
        let registries: &'static [&'static str] = if wildcard == "*" {
            &["*"]
        } else {
            &["_default"]
        };
        run(&Case {
            name: "default is explicitly set",
            mirrored_registries: registries,
            expected,
            ..Case::default()
        });
    }
}

#[test]
fn resolve_tags_disabled() {
    run(&Case {
        name: "resolve tags disabled",
        mirrored_registries: &["https://docker.io", "http://foo.bar:5000"],
        resolve_tags: false,
        expected: &[
            (
                "docker.io/hosts.toml",
                "server = 'https://registry-1.docker.io'

[host.'http://127.0.0.1:5000']
capabilities = ['pull']
dial_timeout = '200ms'",
            ),
            (
                "foo.bar:5000/hosts.toml",
                "server = 'http://foo.bar:5000'

[host.'http://127.0.0.1:5000']
capabilities = ['pull']
dial_timeout = '200ms'",
            ),
        ],
        ..Case::default()
    });
}

#[test]
fn config_path_created_or_existing() {
    for create_config_dir in [false, true] {
        run(&Case {
            name: "config path directory",
            mirrored_registries: &["https://docker.io", "http://foo.bar:5000"],
            create_config_dir,
            expected: &[
                ("docker.io/hosts.toml", DOCKER_RESOLVE),
                ("foo.bar:5000/hosts.toml", FOO_RESOLVE),
            ],
            ..Case::default()
        });
    }
}

#[test]
fn existing_configuration_is_backed_up() {
    run(&Case {
        name: "config path directory contains configuration",
        mirrored_registries: &["https://docker.io", "http://foo.bar:5000"],
        existing: &[
            ("docker.io/hosts.toml", "hello = 'world'"),
            ("ghcr.io/hosts.toml", "foo = 'bar'"),
        ],
        expected: &[
            ("_backup/docker.io/hosts.toml", "hello = 'world'"),
            ("_backup/ghcr.io/hosts.toml", "foo = 'bar'"),
            ("docker.io/hosts.toml", DOCKER_RESOLVE),
            ("foo.bar:5000/hosts.toml", FOO_RESOLVE),
        ],
        ..Case::default()
    });
}

#[test]
fn existing_backup_is_kept_and_rest_cleared() {
    run(&Case {
        name: "config path directory contains backup",
        mirrored_registries: &["https://docker.io", "http://foo.bar:5000"],
        existing: &[
            ("_backup/docker.io/hosts.toml", "hello = 'world'"),
            ("_backup/ghcr.io/hosts.toml", "foo = 'bar'"),
            ("test.txt", "test"),
            ("foo", "bar"),
        ],
        expected: &[
            ("_backup/docker.io/hosts.toml", "hello = 'world'"),
            ("_backup/ghcr.io/hosts.toml", "foo = 'bar'"),
            ("docker.io/hosts.toml", DOCKER_RESOLVE),
            ("foo.bar:5000/hosts.toml", FOO_RESOLVE),
        ],
        ..Case::default()
    });
}

#[test]
fn prepend_to_existing_configuration() {
    run(&Case {
        name: "prepend to existing configuration",
        mirrored_registries: &["https://docker.io", "http://foo.bar:5000"],
        prepend_existing: true,
        existing: &[
            ("docker.io/hosts.toml", EXISTING_DOCKER),
            ("docker.io/hello.txt", "Hello World"),
            ("docker.io/nested/cert.tls", "Foo Bar"),
        ],
        expected: &[
            ("_backup/docker.io/hosts.toml", EXISTING_DOCKER),
            ("_backup/docker.io/hello.txt", "Hello World"),
            ("_backup/docker.io/nested/cert.tls", "Foo Bar"),
            (
                "docker.io/hosts.toml",
                "server = 'https://registry-1.docker.io'

[host.'http://127.0.0.1:5000']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'

[host.'http://example.com:30020']
capabilities = ['pull', 'resolve']
client = ['/etc/certs/xxx/client.cert', '/etc/certs/xxx/client.key']

[host.'http://example.com:30021']
capabilities = ['pull', 'resolve']
client = ['/etc/certs/xxx/client.cert', '/etc/certs/xxx/client.key']

[host.'http://bar.com:30020']
capabilities = ['pull', 'resolve']
client = ['/etc/certs/xxx/client.cert', '/etc/certs/xxx/client.key']",
            ),
            ("docker.io/hello.txt", "Hello World"),
            ("docker.io/nested/cert.tls", "Foo Bar"),
            ("foo.bar:5000/hosts.toml", FOO_RESOLVE),
        ],
        ..Case::default()
    });
}

#[test]
fn prepend_existing_disabled() {
    run(&Case {
        name: "prepend existing disabled",
        mirrored_registries: &["https://docker.io", "http://foo.bar:5000"],
        existing: &[
            ("docker.io/hosts.toml", EXISTING_DOCKER),
            ("docker.io/hello.txt", "Hello World"),
        ],
        expected: &[
            ("_backup/docker.io/hosts.toml", EXISTING_DOCKER),
            ("_backup/docker.io/hello.txt", "Hello World"),
            ("docker.io/hosts.toml", DOCKER_RESOLVE),
            ("foo.bar:5000/hosts.toml", FOO_RESOLVE),
        ],
        ..Case::default()
    });
}

#[test]
fn prepend_without_host_entries_copies_nothing() {
    // Side files only follow when there are host entries to keep, as in the original.
    run(&Case {
        name: "prepend without host entries",
        mirrored_registries: &["https://docker.io"],
        prepend_existing: true,
        existing: &[
            (
                "docker.io/hosts.toml",
                "server = 'https://registry-1.docker.io'",
            ),
            ("docker.io/ca.crt", "cert"),
        ],
        expected: &[
            (
                "_backup/docker.io/hosts.toml",
                "server = 'https://registry-1.docker.io'",
            ),
            ("_backup/docker.io/ca.crt", "cert"),
            ("docker.io/hosts.toml", DOCKER_RESOLVE),
        ],
        ..Case::default()
    });
}

#[test]
fn with_basic_authentication() {
    run(&Case {
        name: "with basic authentication",
        mirrored_registries: &["http://foo.bar:5000"],
        mirror_targets: &["http://127.0.0.1:5000", "http://127.0.0.1:5001"],
        create_config_dir: false,
        auth: Some(BasicAuth {
            username: "hello".into(),
            password: "world".into(),
        }),
        expected: &[(
            "foo.bar:5000/hosts.toml",
            "server = 'http://foo.bar:5000'

[host.'http://127.0.0.1:5000']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'
[host.'http://127.0.0.1:5000'.header]
Authorization = 'Basic aGVsbG86d29ybGQ='

[host.'http://127.0.0.1:5001']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'
[host.'http://127.0.0.1:5001'.header]
Authorization = 'Basic aGVsbG86d29ybGQ='",
        )],
        ..Case::default()
    });
}

#[test]
fn additional_mirror_targets_follow_ours_in_order_and_first_is_ipv6_bracketed() {
    run(&Case {
        name: "additional targets",
        mirrored_registries: &["https://ghcr.io"],
        mirror_targets: &[
            "http://fd00::1:30020",
            "https://mirror-b.example:443",
            "http://mirror-a.example:8080",
            "http://[fd00::2]:5000",
        ],
        expected: &[(
            "ghcr.io/hosts.toml",
            "server = 'https://ghcr.io'

[host.'http://[fd00::1]:30020']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'

[host.'https://mirror-b.example:443']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'

[host.'http://mirror-a.example:8080']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'

[host.'http://[fd00::2]:5000']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'",
        )],
        ..Case::default()
    });
}

#[test]
fn rerun_keeps_original_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("certs.d");
    write_files(&config, &[("docker.io/hosts.toml", "hello = 'world'")]);
    let registries = strings(&["https://docker.io"]);
    for targets in [["http://127.0.0.1:5000"], ["http://127.0.0.1:6000"]] {
        write_mirror_configuration(&config, &registries, &strings(&targets), true, false, None)
            .unwrap();
    }
    let actual = files(&config);
    assert_eq!(actual["_backup/docker.io/hosts.toml"], "hello = 'world'");
    assert!(actual["docker.io/hosts.toml"].contains("http://127.0.0.1:6000"));
    assert!(!actual["docker.io/hosts.toml"].contains("http://127.0.0.1:5000"));
    assert_eq!(actual.len(), 2, "{actual:?}");
}

#[test]
fn prepend_rerun_is_stable() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("certs.d");
    write_files(
        &config,
        &[
            ("docker.io/hosts.toml", EXISTING_DOCKER),
            ("docker.io/nested/deeper/key.pem", "key"),
        ],
    );
    let registries = strings(&["https://docker.io"]);
    let targets = strings(&["http://127.0.0.1:5000"]);
    write_mirror_configuration(&config, &registries, &targets, true, true, None).unwrap();
    let first = files(&config);
    write_mirror_configuration(&config, &registries, &targets, true, true, None).unwrap();
    assert_eq!(files(&config), first);
    assert_eq!(first["docker.io/nested/deeper/key.pem"], "key");
    // Our entry comes first, the original ones after it, and the server line only once.
    let hosts = &first["docker.io/hosts.toml"];
    assert_eq!(hosts.matches("server = ").count(), 1);
    assert!(
        hosts.find("127.0.0.1:5000").unwrap() < hosts.find("example.com:30020").unwrap(),
        "{hosts}"
    );
}

#[cfg(unix)]
#[test]
fn written_files_have_expected_modes() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("certs.d");
    write_mirror_configuration(
        &config,
        &[],
        &strings(&["http://127.0.0.1:5000"]),
        true,
        false,
        None,
    )
    .unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // The umask may only remove bits.
    assert_eq!(mode(&config.join("_default/hosts.toml")) & !0o644, 0);
    assert_eq!(mode(&config.join("_default")) & !0o755, 0);
}

#[test]
fn invalid_urls_fail_before_touching_the_directory() {
    let cases: &[(&[&str], &[&str], &str)] = &[
        (
            &["ftp://docker.io"],
            &["http://127.0.0.1:5000"],
            "invalid registry url scheme must be http or https: ftp://docker.io",
        ),
        (
            &["https://docker.io/foo/bar"],
            &["http://127.0.0.1:5000"],
            "invalid registry url path has to be empty: https://docker.io/foo/bar",
        ),
        (
            &["https://docker.io?foo=bar"],
            &["http://127.0.0.1:5000"],
            "invalid registry url query has to be empty: https://docker.io?foo=bar",
        ),
        (
            &["https://foo:bar@docker.io"],
            &["http://127.0.0.1:5000"],
            "invalid registry url user has to be empty: https://foo:bar@docker.io",
        ),
        (
            &["*", "_default"],
            &["http://127.0.0.1:5000"],
            "registries should not contain two wildcards",
        ),
        (
            &["https://docker.io"],
            &["ftp://127.0.0.1:5000"],
            "invalid registry url scheme must be http or https: ftp://127.0.0.1:5000",
        ),
        (
            &["https://docker.io"],
            &["_default"],
            "wildcard registries are not allowed",
        ),
        (
            &["https://docker.io"],
            &[],
            "at least one mirror target is required",
        ),
    ];
    for (registries, targets, message) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("certs.d");
        write_files(&config, &[("docker.io/hosts.toml", "hello = 'world'")]);
        let before = files(&config);
        let err = write_mirror_configuration(
            &config,
            &strings(registries),
            &strings(targets),
            true,
            false,
            None,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), *message);
        assert!(
            !matches!(err, HostConfigError::Fs(_)),
            "validation error expected: {err:?}"
        );
        assert_eq!(files(&config), before, "{message}");
        assert!(!config.join("_backup").exists());
    }
}

#[test]
fn unparsable_existing_hosts_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("certs.d");
    write_files(&config, &[("docker.io/hosts.toml", "[host.'broken'\n")]);
    let err = write_mirror_configuration(
        &config,
        &strings(&["https://docker.io"]),
        &strings(&["http://127.0.0.1:5000"]),
        true,
        true,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(err, HostConfigError::ExistingHosts { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("_backup/docker.io/hosts.toml"),
        "{err}"
    );
}

#[tokio::test]
async fn run_configuration_reads_auth_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let auth_dir = tmp.path().join("auth");
    write_files(&auth_dir, &[("username", "hello"), ("password", "world")]);
    let args = spegel::config::ConfigurationArgs {
        containerd_registry_config_path: tmp.path().join("certs.d"),
        mirrored_registries: vec![],
        mirror_targets: strings(&["http://127.0.0.1:5000"]),
        resolve_tags: true,
        prepend_existing: false,
    };
    spegel::host_config::run_configuration_with_auth_dir(&args, &auth_dir)
        .await
        .unwrap();
    let hosts = fs::read_to_string(tmp.path().join("certs.d/_default/hosts.toml")).unwrap();
    assert_eq!(
        hosts,
        "[host.'http://127.0.0.1:5000']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'
[host.'http://127.0.0.1:5000'.header]
Authorization = 'Basic aGVsbG86d29ybGQ='"
    );
}
