//! Builds every guest component with a nested `cargo build --target
//! wasm32-wasip2` and copies the `.wasm` files into `OUT_DIR`, so a plain
//! `cargo build`/`cargo test` of the host always embeds guests built from
//! the current sources.
//!
//! The nested build has its own target directory (`target/wasm-guests`):
//! sharing the outer one would block on the lock the outer cargo holds.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest packages and the file stem of the component each produces.
const GUESTS: &[(&str, &str)] = &[
    ("wagg-hashmap", "wagg_hashmap"),
    ("wagg-btree", "wagg_btree"),
    ("wagg-sorted", "wagg_sorted"),
    ("wagg-leaky", "wagg_leaky"),
    ("wagg-misbehave", "wagg_misbehave"),
    ("wagg-imports", "wagg_imports"),
    ("wagg-otherworld", "wagg_otherworld"),
];

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "guest";

/// Every guest's stack, in bytes. The linker's default of 1 MiB is a fixed
/// cost inside each module's memory limit; the guests recurse nowhere
/// (except the stack-overflow fixture, which is meant to run out).
const STACK_SIZE: u32 = 128 * 1024;

/// Variables the outer cargo (or clippy, or a wrapper) sets that would
/// change what the nested build does or where it writes.
const REMOVE_EXACT: &[&str] = &[
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_WRAPPER",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_CRATE_NAME",
    "CARGO_RUSTC_CURRENT_DIR",
    "RUSTC_LINKER",
    "RUSTDOC",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "OPT_LEVEL",
    "PROFILE",
    "DEBUG",
    "NUM_JOBS",
    "CLIPPY_ARGS",
    "CLIPPY_CONF_DIR",
    "__CARGO_FIX_PLZ",
];
const REMOVE_PREFIXES: &[&str] = &["CARGO_CFG_", "CARGO_FEATURE_", "CARGO_PKG_", "DEP_"];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guests_dir = manifest_dir
        .parent()
        .expect("artifacts lives in guest-aggregators/");
    let root = guests_dir
        .parent()
        .expect("guest-aggregators lives in the workspace root");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());

    rerun_if_changed(root, guests_dir);
    check_target_installed(&rustc);

    let target_dir = root.join("target").join("wasm-guests");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--profile",
            PROFILE,
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    for (package, _) in GUESTS {
        cmd.args(["-p", package]);
    }
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if REMOVE_EXACT.contains(&key) || REMOVE_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key);
        }
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("-Clink-arg=-zstack-size={STACK_SIZE}"),
    );

    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run {cargo:?} for the nested guest build: {e}"));
    if !status.success() {
        panic!(
            "the nested guest build failed ({status}); its errors are above. \
             To reproduce: cargo build --profile {PROFILE} --target {TARGET} \
             --target-dir target/wasm-guests -p wagg-hashmap ..."
        );
    }

    let built = target_dir.join(TARGET).join(PROFILE);
    for (package, stem) in GUESTS {
        let from = built.join(format!("{stem}.wasm"));
        let to = out_dir.join(format!("{stem}.wasm"));
        if let Err(e) = std::fs::copy(&from, &to) {
            panic!(
                "{package}: cannot copy {} to {}: {e}",
                from.display(),
                to.display()
            );
        }
    }
}

/// Reruns on changes to guest sources, the WIT contract and the lock file,
/// but not on this crate's own files or any `target/` (which the nested
/// build writes, and which would make every build rerun).
fn rerun_if_changed(root: &Path, guests_dir: &Path) {
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );
    // The root manifest holds the guest profile and the workspace deps.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.toml").display()
    );
    for dir in [
        "sdk",
        "hashmap",
        "btree",
        "sorted",
        "leaky",
        "fixtures/misbehave",
        "fixtures/imports",
        "fixtures/otherworld",
    ] {
        let crate_dir = guests_dir.join(dir);
        println!("cargo:rerun-if-changed={}", crate_dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            crate_dir.join("Cargo.toml").display()
        );
    }
}

/// Fails early, with the fix, when the wasm target's standard library is
/// missing (rustup does not install targets from rust-toolchain.toml when
/// `RUSTUP_AUTO_INSTALL=0`), instead of cargo's "can't find crate for
/// `core`".
fn check_target_installed(rustc: &std::ffi::OsStr) {
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return; // Let the nested build report whatever is wrong.
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let lib = Path::new(&sysroot).join("lib").join("rustlib").join(TARGET);
    if !lib.exists() {
        panic!(
            "the {TARGET} target is not installed for the toolchain at {sysroot}: \
             run `rustup target add {TARGET}` and build again"
        );
    }
}
