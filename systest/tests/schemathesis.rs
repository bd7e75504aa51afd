//! The OpenAPI document against the running server, by schemathesis (a property-based API
//! tester): the real binaries, Postgres and broker, `schemathesis run` against the ingress's own
//! `/openapi.json`, every phase (the document's examples, coverage, fuzzing, and the stateful
//! phase that follows the links from a created reservation to its read, confirm and cancel),
//! with the admin token on every request.
//!
//! It fails on any 5xx but admission's declared 503 refusals, on any request the document allows
//! being refused (`positive_data_acceptance`: 400, 413, 415 or 422 to a schema-valid request),
//! and on any answer the document does not describe (status code, content type, headers, body
//! schema). Bounded by examples per operation and by time.
//!
//! Needs `FLASH_SCHEMATHESIS`, the schemathesis executable (`scripts/test` installs a pinned one
//! and sets it); its configuration and hooks are in `systest/schemathesis/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use systest::{Options, Stack, ADMIN_TOKEN};

/// Test cases per operation and phase.
const MAX_EXAMPLES: &str = "30";
/// Time budget of schemathesis itself; the process is killed if it runs much longer.
const MAX_TIME_S: u64 = 100;

fn schemathesis() -> PathBuf {
    match std::env::var_os("FLASH_SCHEMATHESIS") {
        Some(path) if Path::new(&path).is_file() => PathBuf::from(path),
        Some(path) => panic!(
            "FLASH_SCHEMATHESIS={} is not a file: run scripts/test, which installs schemathesis",
            Path::new(&path).display()
        ),
        None => panic!(
            "FLASH_SCHEMATHESIS is not set: it names the schemathesis executable; scripts/test \
             installs a pinned one (scripts/lib.sh, ensure_schemathesis) and sets it"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_as_its_openapi_document_says() {
    let bin = schemathesis();
    let stack = Stack::start("schemathesis", Options::default())
        .await
        .unwrap();
    // The SKU of the document's examples, with stock and limits no generated reservation
    // reaches, so that reservations are granted and the stateful phase can follow them.
    stack
        .put_sku("tee-1", 1_000_000_000_000, 1_000_000, 300.0)
        .await
        .unwrap();

    let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/schemathesis");
    let reports = std::env::temp_dir().join(format!("flash-schemathesis-{}", stack.name));
    std::fs::create_dir_all(&reports).unwrap();
    // To files, not pipes: a long report would fill a pipe nobody reads while waiting below.
    let (out_path, err_path) = (reports.join("stdout.txt"), reports.join("stderr.txt"));
    let mut child = Command::new(&bin)
        .current_dir(folder)
        .args(["--config-file", "schemathesis.toml", "run"])
        .arg(format!("{}/openapi.json", stack.base))
        .args(["--url", &stack.base])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,positive_data_acceptance",
        ])
        .args(["--mode", "all"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--max-time", &MAX_TIME_S.to_string()])
        // One worker: with two, hypothesis parses lambdas with `ast.parse` from two threads at
        // once, which CPython 3.11 can fail with "SystemError: AST constructor recursion depth
        // mismatch" (seen once in CI, on POST /v1/admin/skus/{sku}/resume).
        .args(["--workers", "1", "--seed", "1", "--no-color"])
        .args(["--request-timeout", "10"])
        // A live stream never ends: every request to it would time out. Its answers are
        // tested in stock_stream.rs; its 404s are the same code as GET /v1/skus/{sku}.
        .args(["--exclude-path-regex", "/events$"])
        .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .arg("--report-dir")
        .arg(&reports)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    // A hard bound above schemathesis's own: a hung run fails instead of hanging the suite.
    let deadline = Instant::now() + Duration::from_secs(MAX_TIME_S + 60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "schemathesis did not finish within {} s (output in {})",
                MAX_TIME_S + 60,
                reports.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.success(),
        "schemathesis found problems (exit {:?}):\n{stdout}\n{stderr}",
        status.code()
    );
    // A run that tested nothing would also exit 0.
    assert!(
        stdout.contains("passed") && !stdout.contains("No operations"),
        "schemathesis ran no test:\n{stdout}\n{stderr}"
    );
}
