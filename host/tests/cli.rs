//! The `wagg` binary as a user runs it.

use std::process::Command;

use wagg_artifacts::{BUILTINS, IMPORTS, MISBEHAVE, OTHERWORLD};

fn wagg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wagg"))
        .args(args)
        .env("WAGG_LOG", "warn")
        .output()
        .expect("wagg runs")
}

#[test]
fn module_validate_accepts_the_strategies_and_refuses_the_rest_with_reasons() {
    for g in BUILTINS.iter().chain([&MISBEHAVE]) {
        let out = wagg(&["module", "validate", g.path]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {stdout} {}",
            g.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("wagg:aggregator/module@0.1.0"), "{stdout}");
        assert!(
            stdout.contains("exports: wagg:aggregator/aggregator@0.1.0"),
            "{stdout}"
        );
    }
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), b"\x00\x01garbage").unwrap();
    let cases = [
        (IMPORTS.path, "imports `wagg:evil/env@0.1.0`"),
        (
            OTHERWORLD.path,
            "does not export `wagg:aggregator/aggregator@0.1.0`",
        ),
        (garbage.path().to_str().unwrap(), "not a WebAssembly binary"),
        (env!("CARGO_MANIFEST_PATH"), "not a WebAssembly binary"),
    ];
    for (path, reason) in cases {
        let out = wagg(&["module", "validate", path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{path} accepted");
        assert!(stderr.contains(reason), "{path}: {stderr}");
    }
}

#[test]
fn demo_runs_and_its_file_sink_totals_equal_what_it_generated() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("points.jsonl");
    let out = wagg(&[
        "demo",
        "--duration",
        "3s",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok: totals exact"), "{stdout}");
    // The check in the binary compared the file with the generator; make
    // sure the file really holds points.
    let lines = std::fs::read_to_string(&out_file).unwrap().lines().count();
    assert!(lines > 100, "{lines} points");
}

#[test]
fn config_example_is_valid_and_a_bad_config_names_its_field() {
    let out = wagg(&["config", "example"]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &out.stdout).unwrap();
    assert!(
        wagg(&["config", "check", good.to_str().unwrap()])
            .status
            .success()
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[router]\nshards = 4\nshard_keys = \"zone\"\n").unwrap();
    let out = wagg(&["config", "check", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shard_keys"));
}
