//! The ECS task definitions in `deploy/aws/`, checked as `aws ecs register-task-definition` and hikkoshi would
//! take them: `deploy/aws/validate.py` holds each against botocore's model of the ECS API (from PyPI, installed
//! by `.ci/prepare` in `/opt/hikkoshi/py`, or `HIKKOSHI_PY_DIR`) and has this hikkoshi binary parse each
//! command. The broken copies prove the check can fail, and that it names what is wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/aws")
}

/// The shipped task definitions, by name.
fn shipped() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("reading deploy/aws")
        .map(|e| e.expect("reading deploy/aws").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "deploy/aws holds no task definitions: {files:?}"
    );
    files
}

/// Runs the validator on `files` with this build's hikkoshi; botocore missing fails the test (never skips it).
fn validate(files: &[PathBuf]) -> (Output, String) {
    let py = std::env::var("HIKKOSHI_PY_DIR").unwrap_or_else(|_| "/opt/hikkoshi/py".into());
    let out = Command::new("python3")
        .arg(deploy_dir().join("validate.py"))
        .arg("--hikkoshi")
        .arg(env!("CARGO_BIN_EXE_hikkoshi"))
        .args(files)
        .env("PYTHONPATH", &py)
        .output()
        .expect("running python3 deploy/aws/validate.py");
    let text = format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("reading a task definition"))
        .expect("a task definition is JSON")
}

/// Writes `td`, changed by `edit`, as `name` in `dir`.
fn broken_copy(dir: &Path, name: &str, td: &Value, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let mut td = td.clone();
    edit(&mut td);
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(&td).unwrap()).unwrap();
    path
}

/// Asserts the validator refuses `file` with a line that names it and contains every one of `expected`.
fn assert_refused(file: &Path, expected: &[&str]) {
    let (out, text) = validate(&[file.to_path_buf()]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let name = file.display().to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with(&name) && expected.iter().all(|e| l.contains(e))),
        "no error line for {name} names {expected:?}:\n{text}"
    );
}

#[test]
fn the_shipped_task_definitions_pass_the_ecs_model_and_parse_as_hikkoshi_commands() {
    let files = shipped();
    let (out, text) = validate(&files);
    assert!(out.status.success(), "{text}");
    for f in &files {
        assert!(
            text.contains(&format!("{}: ok", f.display())),
            "{} was not checked:\n{text}",
            f.display()
        );
    }
}

#[test]
fn each_broken_copy_is_refused_with_its_error_named() {
    let follow = read(&deploy_dir().join("follow.json"));
    let dir = tempfile::tempdir().unwrap();

    let misspelled = broken_copy(dir.path(), "misspelled-key.json", &follow, |td| {
        let c = td["containerDefinitions"][0].as_object_mut().unwrap();
        let health = c.remove("healthCheck").unwrap();
        c.insert("healthcheck".into(), health);
    });
    assert_refused(
        &misspelled,
        &[
            "Unknown parameter in containerDefinitions[0]",
            "\"healthcheck\"",
        ],
    );

    let wrong_type = broken_copy(dir.path(), "wrong-type.json", &follow, |td| {
        td["containerDefinitions"][0]["stopTimeout"] = json!("120");
    });
    assert_refused(
        &wrong_type,
        &["Invalid type for parameter containerDefinitions[0].stopTimeout"],
    );

    let secret_in_environment =
        broken_copy(dir.path(), "secret-in-environment.json", &follow, |td| {
            let c = &mut td["containerDefinitions"][0];
            let secrets: Vec<Value> = c["secrets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["name"] != "HIKKOSHI_SOURCE")
                .cloned()
                .collect();
            c["secrets"] = Value::Array(secrets);
            c["environment"] = json!([{
                "name": "HIKKOSHI_SOURCE",
                "value": "postgresql://migrator:hunter2@10.0.1.23:5432/redash"
            }]);
        });
    assert_refused(
        &secret_in_environment,
        &["environment", "HIKKOSHI_SOURCE is a secret"],
    );

    let misspelled_flag = broken_copy(dir.path(), "misspelled-flag.json", &follow, |td| {
        let command = td["containerDefinitions"][0]["command"]
            .as_array_mut()
            .unwrap();
        let at = command.iter().position(|a| a == "--follow").unwrap();
        command[at] = json!("--folow");
    });
    assert_refused(
        &misspelled_flag,
        &[
            "containerDefinitions[0].command does not parse as a hikkoshi command line",
            "--folow",
        ],
    );
}
