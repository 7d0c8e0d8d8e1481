//! Clients from the served `/openapi.json`, against a live `sluice up`: a
//! Python client generated with openapi-python-client (pinned in
//! scripts/client-requirements.txt, installed by scripts/setup.sh into
//! `.tools/client-venv`) runs the README's HTTP tour, and schemathesis
//! (scripts/schemathesis-requirements.txt, `.tools/schemathesis-venv`)
//! fuzzes every operation for a bounded number of examples.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn venv_bin(name: &str) -> PathBuf {
    tool("client-venv", name)
}

fn tool(venv: &str, name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.tools")
        .join(venv)
        .join("bin")
        .join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/setup.sh",
        bin.display()
    );
    bin
}

#[test]
fn a_generated_python_client_runs_the_http_tour() {
    let home = tempfile::tempdir().unwrap();
    let _up = support::start_up(BIN, home.path(), |_| {});
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.path().join("endpoint.json")).unwrap()).unwrap();
    let addr = endpoint["http_addr"].as_str().unwrap().to_owned();
    let token = std::fs::read_to_string(home.path().join("token")).unwrap();
    let (status, doc) = support::http(&addr, "GET", "/openapi.json", "", "");
    assert_eq!(status, 200, "{doc}");

    let work = tempfile::tempdir().unwrap();
    let spec = work.path().join("openapi.json");
    std::fs::write(&spec, doc).unwrap();
    let out = work.path().join("sluice_client");
    let bin_dir = venv_bin("python").parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let generated = Command::new(venv_bin("openapi-python-client"))
        .args(["generate", "--meta", "none", "--path"])
        .arg(&spec)
        .arg("--output-path")
        .arg(&out)
        .env("PATH", &path)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&generated.stdout).into_owned()
        + &String::from_utf8_lossy(&generated.stderr);
    assert!(generated.status.success(), "generation failed: {log}");
    assert!(
        !log.contains("Warning"),
        "every operation must generate cleanly: {log}"
    );

    let tour = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/tour.py");
    let ran = Command::new(venv_bin("python"))
        .arg(&tour)
        .arg(format!("http://{addr}"))
        .arg(token.trim())
        .env("PYTHONPATH", work.path())
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&ran.stdout).into_owned() + &String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "the tour failed: {log}");
    assert!(log.contains("tour ok"), "{log}");
}

/// schemathesis against the live API, every operation but the endless
/// live feed, bounded (fixed seed, 25 examples each, one worker): no 5xx,
/// no status code, content type or response the document does not
/// describe.
#[test]
fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    let home = tempfile::tempdir().unwrap();
    let _up = support::start_up(BIN, home.path(), |_| {});
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.path().join("endpoint.json")).unwrap()).unwrap();
    let addr = endpoint["http_addr"].as_str().unwrap().to_owned();
    let token = std::fs::read_to_string(home.path().join("token")).unwrap();
    let out = Command::new(tool("schemathesis-venv", "schemathesis"))
        .arg("run")
        .arg(format!("http://{addr}/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {}", token.trim())])
        .args(["--max-examples", "25", "--seed", "1", "-n", "1"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--exclude-path", "/v1/events/live"])
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(home.path())
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "schemathesis: {log}");
    // Every operation but the live feed was exercised, not skipped.
    let tested: usize = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(tested >= 20, "only {tested} operations tested: {log}");
}
