//! Helpers for arenaflow's integration tests: the CLI binary, the repository root, the
//! shared data, and a real S3-compatible server.

use std::io::{BufRead, BufReader, Read, Write};

use datafusion::arrow::array::AsArray;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (plans and `../shared` paths are relative to it).
/// The first `n` rows of the real Kaggle sample, as `train.csv` of their own in `dir`.
pub fn small_train(dir: &Path, n: usize) -> PathBuf {
    let mut reader = csv::Reader::from_path(shared("data/lmsys-arena/train_sample.csv")).unwrap();
    let path = dir.join("train.csv");
    let mut writer = csv::Writer::from_path(&path).unwrap();
    writer.write_record(reader.headers().unwrap()).unwrap();
    for record in reader.records().take(n) {
        writer.write_record(&record.unwrap()).unwrap();
    }
    writer.flush().unwrap();
    path
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn shared(relative: &str) -> PathBuf {
    repo_root().join("../shared").join(relative)
}

/// The `arenaflow` binary of this build. `cargo test --workspace` builds it (the engine
/// has integration tests); when only this crate is tested it is built on first use.
pub fn arenaflow_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile folder");
    let bin = dir.join(format!("arenaflow{}", std::env::consts::EXE_SUFFIX));
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        if bin.exists() {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "arenaflow-engine", "--bin", "arenaflow"])
            .current_dir(repo_root())
            .status()
            .expect("run cargo build for the arenaflow binary");
        assert!(status.success(), "building the arenaflow binary failed");
    });
    bin
}

/// Runs `arenaflow ARGS` in the repository root.
pub fn arenaflow(args: &[&str]) -> Output {
    arenaflow_with_env(args, &[])
}

pub fn arenaflow_with_env(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = Command::new(arenaflow_bin());
    command.args(args).current_dir(repo_root());
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run arenaflow")
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A moto S3 server on a free loopback port, stopped on drop. The server comes from
/// PyPI's `moto[server]` (`scripts/test.sh` installs it); `MOTO_SERVER` names the program.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
}

impl S3Server {
    pub fn start() -> Self {
        let program = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} ({e}): install it with `pip install 'moto[server]'` or run scripts/test.sh, which does"));
        let server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{program} did not start listening on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// The AWS variables that point object_store at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// A connection to the server. A server under load may refuse one for a moment after
    /// it first listened: refusals are retried for 10 s.
    fn connect(&self) -> TcpStream {
        let host = self.endpoint.trim_start_matches("http://");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(host) {
                Ok(stream) => return stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect to the S3 server at {host}: {e}"),
            }
        }
    }

    /// One raw HTTP request (`Connection: close`) and the whole response. A server under
    /// load may reset a connection it has just accepted: the request (a PUT or a HEAD, both
    /// idempotent) is sent again on an I/O error for 10 s.
    fn request(&self, head: &str, body: &[u8]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let attempt = (|| -> std::io::Result<String> {
                let mut stream = self.connect();
                stream.write_all(head.as_bytes())?;
                stream.write_all(body)?;
                let mut response = String::new();
                stream.read_to_string(&mut response)?;
                Ok(response)
            })();
            match attempt {
                Ok(response) if !response.is_empty() => return response,
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(_) => panic!("the S3 server at {} answered nothing", self.endpoint),
                Err(e) => panic!("the S3 server at {}: {e}", self.endpoint),
            }
        }
    }

    /// A raw S3 PUT (create a bucket with `key` empty, or upload an object).
    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        let host = self.endpoint.trim_start_matches("http://");
        let path = if key.is_empty() {
            format!("/{bucket}")
        } else {
            format!("/{bucket}/{key}")
        };
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let response = self.request(&head, body);
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "S3 PUT {path} failed: {}",
            response.lines().next().unwrap_or_default()
        );
    }

    /// Whether an object exists (a raw anonymous HEAD: moto answers 403 for an object it
    /// holds and 404 for one it does not).
    pub fn exists(&self, bucket: &str, key: &str) -> bool {
        let host = self.endpoint.trim_start_matches("http://");
        let head =
            format!("HEAD /{bucket}/{key} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let response = self.request(&head, &[]);
        let status = response.lines().next().unwrap_or_default().to_string();
        match status.split_whitespace().nth(1) {
            Some("404") => false,
            Some("200" | "403") => true,
            _ => panic!("S3 HEAD {key}: {status}"),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Parquet file itself, or every `.parquet` file under a folder, sorted by path.
pub fn parquet_files(path: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                out.push(path);
            }
        }
    }
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    walk(path, &mut files);
    files.sort();
    files
}

/// Every record batch of one Parquet file.
pub fn parquet_batches(path: &Path) -> Vec<datafusion::arrow::record_batch::RecordBatch> {
    datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(path).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Writes `batches` (at least one, one schema) as the Parquet file `path`.
pub fn write_parquet(path: &Path, batches: &[datafusion::arrow::record_batch::RecordBatch]) {
    let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batches[0].schema(),
        None,
    )
    .unwrap();
    for batch in batches {
        writer.write(batch).unwrap();
    }
    writer.close().unwrap();
}

/// The `id` and `logits` (3 x f32) of every row of a Parquet file, in file order.
pub fn read_logits(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for batch in parquet_batches(path) {
        let ids = batch
            .column_by_name("id")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let logits = batch
            .column_by_name("logits")
            .unwrap()
            .as_fixed_size_list()
            .clone();
        for r in 0..batch.num_rows() {
            let row = logits.value(r);
            out.push((
                ids.value(r).to_string(),
                row.as_primitive::<datafusion::arrow::datatypes::Float32Type>()
                    .values()
                    .to_vec(),
            ));
        }
    }
    out
}

/// Runs arenaflow with `args` and the test pause `pause` (an `ARENAFLOW_TEST_PAUSE_*`
/// variable and its value) until it prints `marker`, then kills it with SIGKILL.
pub fn kill_at_pause(args: &[String], pause: (&str, usize), marker: &str) {
    let mut child = Command::new(arenaflow_bin())
        .args(args)
        .current_dir(repo_root())
        .env(pause.0, pause.1.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains(marker) {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.contains(marker)), "{seen:?}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}
