//! Compiles the eBPF programs in `src/bpf/*.bpf.c` with clang into `$OUT_DIR`, where
//! `src/probes.rs` embeds them. No vmlinux.h: the programs use only UAPI headers.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const PACKAGES: &str = "install the Debian packages `clang` and `libbpf-dev` (and `linux-libc-dev`), \
     e.g. with `cargo xtask deps` or `apt-get install clang libbpf-dev linux-libc-dev`";

fn main() {
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=src/bpf");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    let multiarch = match Command::new(&clang).arg("-print-multiarch").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Ok(out) => fail(&format!(
            "`{clang} -print-multiarch` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => fail(&format!(
            "cannot run `{clang}` ({e}); clang is needed to build the eBPF programs"
        )),
    };

    let dir = Path::new("src/bpf");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| fail(&format!("reading {}: {e}", dir.display())))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".c").to_string())
            .unwrap_or_else(|| fail("unnamed source"));
        let obj = out_dir.join(format!("{name}.o"));
        let out = Command::new(&clang)
            .args(["-target", "bpfel", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-I/usr/include/{multiarch}"))
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output()
            .unwrap_or_else(|e| fail(&format!("running {clang}: {e}")));
        if !out.status.success() {
            fail(&format!(
                "compiling {} failed:\n{}",
                src.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
}

fn fail(why: &str) -> ! {
    // A plain exit: a panic's backtrace would bury the one line that says what to install.
    eprintln!("error: spegel-ebpf: {why}\nerror: spegel-ebpf: {PACKAGES}");
    std::process::exit(1);
}
