use super::*;
use crate::limits::{MAX_SPEC_BYTES, MAX_TIMEOUT_MINUTES};

const EXAMPLE: &str = r#"
name: build
runs-on: [linux, x64]
timeout-minutes: 10
env: { CARGO_TERM_COLOR: always }
steps:
  - name: hello
    run: echo "hello from $(uname -r)"
"#;

const FULL: &str = r#"
name: test suite
runs-on: linux
env:
  VERSION: 1.10
  DEBUG: yes
  MODE: '007'
steps:
  - run: |
      cargo build
      cargo test
  - name: lint
    run: cargo clippy
    working-directory: crates/core
    env: { RUSTFLAGS: -Dwarnings }
    timeout-minutes: 5
"#;

fn spec_with(steps_yaml: &str) -> String {
    format!("name: x\nruns-on: linux\nsteps:\n{steps_yaml}")
}

#[track_caller]
fn syntax_error(text: &str) -> (String, String) {
    match JobSpec::from_yaml(text) {
        Err(SpecError::Syntax { path, message, .. }) => (path, message),
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[track_caller]
fn violations(text: &str) -> Violations {
    match JobSpec::from_yaml(text) {
        Err(SpecError::Invalid(violations)) => violations,
        other => panic!("expected violations, got {other:?}"),
    }
}

#[test]
fn design_example_parses() {
    let spec = JobSpec::from_yaml(EXAMPLE).unwrap();
    assert_eq!(spec.name, "build");
    assert_eq!(spec.runs_on, ["linux", "x64"]);
    assert_eq!(spec.timeout_minutes, Some(10));
    assert_eq!(spec.env["CARGO_TERM_COLOR"], "always");
    assert_eq!(spec.steps[0].run, "echo \"hello from $(uname -r)\"");
}

#[test]
fn full_spec_parses_with_scalars_kept_as_written() {
    let spec = JobSpec::from_yaml(FULL).unwrap();
    assert_eq!(spec.runs_on, ["linux"]);
    assert_eq!(spec.effective_timeout_minutes(), 60);
    // Env values are strings exactly as written, not re-rendered numbers/bools.
    assert_eq!(spec.env["VERSION"], "1.10");
    assert_eq!(spec.env["DEBUG"], "yes");
    assert_eq!(spec.env["MODE"], "007");
    assert_eq!(spec.steps[0].run, "cargo build\ncargo test\n");
    let lint = &spec.steps[1];
    assert_eq!(lint.working_directory.as_deref(), Some("crates/core"));
    assert_eq!(lint.env["RUSTFLAGS"], "-Dwarnings");
    assert_eq!(lint.timeout_minutes, Some(5));
}

#[test]
fn json_and_yaml_give_the_same_spec() {
    let spec = JobSpec::from_yaml(FULL).unwrap();
    let json = serde_json::to_string(&spec).unwrap();
    assert!(json.contains("\"runs-on\":[\"linux\"]"), "{json}");
    assert_eq!(JobSpec::from_json(&json).unwrap(), spec);
}

#[test]
fn to_job_applies_defaults_and_joins_secrets() {
    let spec = JobSpec::from_yaml(FULL).unwrap();
    let secrets = Secrets(BTreeMap::from([("API_KEY".into(), "s3cr3t".into())]));
    let job = spec.to_job(JobId("j1".into()), secrets.clone()).unwrap();
    assert_eq!(job.id, JobId("j1".into()));
    assert_eq!(job.timeout_secs, 3600);
    assert_eq!(job.steps[0].name, "Run cargo build");
    assert_eq!(job.steps[0].timeout_secs, None);
    assert_eq!(job.steps[1].name, "lint");
    assert_eq!(job.steps[1].timeout_secs, Some(300));
    assert_eq!(job.secrets, secrets);
    assert_eq!(job.env, spec.env);

    let bad_secrets = Secrets(BTreeMap::from([("bad-name".into(), "v".into())]));
    let err = spec.to_job(JobId("j1".into()), bad_secrets).unwrap_err();
    assert!(
        err.contains("secrets[\"bad-name\"]", &Problem::BadEnvName),
        "{err}"
    );
    let err = spec
        .to_job(JobId("../j".into()), Secrets::default())
        .unwrap_err();
    assert!(err.contains("id", &Problem::BadIdentifier), "{err}");
}

#[test]
fn default_step_name_is_cut_on_a_char_boundary() {
    let run = "é".repeat(limits::MAX_NAME_LEN);
    let name = default_step_name(&run);
    assert!(name.len() <= limits::MAX_NAME_LEN);
    assert!(name.starts_with("Run é"));
    assert_eq!(default_step_name("\n\n  make  \nmore"), "Run make");
}

#[test]
fn unknown_fields_are_rejected_with_their_path() {
    let (path, message) = syntax_error(&spec_with("  - run: a\n    uses: actions/checkout@v4\n"));
    assert_eq!(path, "steps[0].uses");
    assert!(message.contains("unknown field `uses`"), "{message}");
    assert!(message.contains("line 5"), "{message}");

    let (path, _) = syntax_error("name: x\nruns-on: l\ntimeout-minute: 5\nsteps:\n  - run: a\n");
    assert_eq!(path, "timeout-minute");

    let json = r#"{"name":"x","runs-on":"l","steps":[{"run":"a","shell":"bash"}]}"#;
    match JobSpec::from_json(json) {
        Err(SpecError::Syntax {
            format: "JSON",
            path,
            ..
        }) => assert_eq!(path, "steps[0].shell"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn shape_errors_name_the_field() {
    let cases = [
        (
            spec_with("  - run: a\n    timeout-minutes: -3\n"),
            "steps[0].timeout-minutes",
        ),
        (
            spec_with("  - run: a\n    timeout-minutes: 99999999999\n"),
            "steps[0].timeout-minutes",
        ),
        (spec_with("  - name: only a name\n"), "steps[0]"),
        (
            "name: x\nruns-on: {a: b}\nsteps:\n  - run: a\n".into(),
            "runs-on",
        ),
        (
            "name: x\nruns-on: l\nenv: {E: null}\nsteps:\n  - run: a\n".into(),
            "env.E",
        ),
        ("name: x\nruns-on: l\nsteps: run\n".into(), "steps"),
        ("runs-on: l\nsteps:\n  - run: a\n".into(), "."),
        (
            "name: x\nname: y\nruns-on: l\nsteps:\n  - run: a\n".into(),
            ".",
        ),
        ("".into(), "."),
        ("name: [x\n".into(), "name"),
        ("a: &a [*a]\n".into(), "a"),
        (format!("{EXAMPLE}---\n{EXAMPLE}"), "."),
    ];
    for (text, expected_path) in cases {
        let (path, message) = syntax_error(&text);
        assert_eq!(path, expected_path, "{text:?}: {message}");
    }
    assert!(
        syntax_error("runs-on: l\nsteps:\n  - run: a\n")
            .1
            .contains("name")
    );
    match JobSpec::from_json(r#"{"name":"x","runs-on":"l","steps":[{"run":"a"}]} junk"#) {
        Err(SpecError::Syntax { path, .. }) => assert_eq!(path, "."),
        other => panic!("{other:?}"),
    }
}

#[test]
fn rule_violations_are_all_reported_with_paths() {
    let text = r#"
name: ""
runs-on: []
timeout-minutes: 0
env: { "1BAD": x, "A-B": y }
steps:
  - run: "   "
  - run: ok
    working-directory: ""
    timeout-minutes: 99999
  - run: ok
    name: ""
    env: { "WITH SPACE": z }
"#;
    let err = violations(text);
    let expected = [
        ("name", Problem::Empty),
        ("runs-on", Problem::Empty),
        ("timeout-minutes", Problem::Zero),
        ("env[\"1BAD\"]", Problem::BadEnvName),
        ("env[\"A-B\"]", Problem::BadEnvName),
        ("steps[0].run", Problem::Empty),
        ("steps[1].working-directory", Problem::Empty),
        (
            "steps[1].timeout-minutes",
            Problem::TooBig {
                value: 99999,
                max: u64::from(MAX_TIMEOUT_MINUTES),
            },
        ),
        ("steps[2].name", Problem::Empty),
        ("steps[2].env[\"WITH SPACE\"]", Problem::BadEnvName),
    ];
    for (path, problem) in &expected {
        assert!(
            err.contains(path, problem),
            "missing {path}: {problem} in {err}"
        );
    }
    assert_eq!(err.list().len(), expected.len(), "{err}");
}

#[test]
fn each_rule_alone_is_enforced() {
    let cases: Vec<(String, &str, Problem)> = vec![
        (
            "name: x\nruns-on: l\nsteps: []\n".into(),
            "steps",
            Problem::Empty,
        ),
        (spec_with("  - run: ''\n"), "steps[0].run", Problem::Empty),
        (
            "name: x\nruns-on: l\ntimeout-minutes: 2000\nsteps:\n  - run: a\n".into(),
            "timeout-minutes",
            Problem::TooBig {
                value: 2000,
                max: 1440,
            },
        ),
        (
            spec_with("  - run: a\n    timeout-minutes: 0\n"),
            "steps[0].timeout-minutes",
            Problem::Zero,
        ),
        (
            "name: x\nruns-on: l\ntimeout-minutes: 5\nsteps:\n  - run: a\n    timeout-minutes: 6\n"
                .into(),
            "steps[0].timeout-minutes",
            Problem::ExceedsJobTimeout {
                job_limit: "5 minutes".into(),
            },
        ),
        (
            "name: x\nruns-on: [ok, 'a b']\nsteps:\n  - run: a\n".into(),
            "runs-on[1]",
            Problem::BadIdentifier,
        ),
        (
            "name: x\nruns-on: ''\nsteps:\n  - run: a\n".into(),
            "runs-on[0]",
            Problem::Empty,
        ),
        (
            spec_with("  - run: \"a\\0b\"\n"),
            "steps[0].run",
            Problem::ContainsNul,
        ),
        (
            spec_with(&format!(
                "  - run: {}\n",
                "x".repeat(limits::MAX_RUN_LEN + 1)
            )),
            "steps[0].run",
            Problem::TooLong {
                len: limits::MAX_RUN_LEN + 1,
                max: limits::MAX_RUN_LEN,
            },
        ),
        (
            spec_with(&"  - run: a\n".repeat(limits::MAX_STEPS + 1)),
            "steps",
            Problem::TooMany {
                count: limits::MAX_STEPS + 1,
                max: limits::MAX_STEPS,
            },
        ),
    ];
    for (text, path, problem) in cases {
        let err = violations(&text);
        assert_eq!(err.list().len(), 1, "{err}");
        assert!(
            err.contains(path, &problem),
            "expected {path}: {problem}, got {err}"
        );
    }
}

#[test]
fn spec_too_big_for_one_frame_is_rejected() {
    // 20 steps of the largest script (YAML aliases keep the document small):
    // each step is valid, the whole job is not.
    let script = "x".repeat(limits::MAX_RUN_LEN);
    let text = spec_with(&format!(
        "  - run: &s {script}\n{}",
        "  - run: *s\n".repeat(19)
    ));
    assert!(text.len() < MAX_SPEC_BYTES);
    let err = violations(&text);
    assert_eq!(err.list()[0].path, "job", "{err}");
}

#[test]
fn oversized_document_is_rejected_before_parsing() {
    let text = format!("# {}\n", "x".repeat(MAX_SPEC_BYTES));
    assert!(matches!(
        JobSpec::from_yaml(&text),
        Err(SpecError::TooLarge {
            max: MAX_SPEC_BYTES,
            ..
        })
    ));
    assert!(matches!(
        JobSpec::from_json(&text),
        Err(SpecError::TooLarge { .. })
    ));
}

#[test]
fn too_many_labels_is_a_syntax_error_at_runs_on() {
    let labels = (0..40)
        .map(|i| format!("l{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let (path, message) = syntax_error(&format!(
        "name: x\nruns-on: [{labels}]\nsteps:\n  - run: a\n"
    ));
    assert_eq!(path, "runs-on", "{message}");
}

#[test]
fn alias_bomb_is_refused_by_the_budget() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = i - 1;
        text.push_str(&format!(
            "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
        ));
    }
    // Whatever the parser says, it must say it quickly and not expand 10^12 nodes.
    let started = std::time::Instant::now();
    assert!(JobSpec::from_yaml(&text).is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
