//! The Hub-like test server (`tests/servers/hub_server.py`), started and stopped by the
//! tests: loopback only, two ports (the Hub and its "storage"), gone when the test
//! drops it (its stdin closes and it is killed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct Hub {
    child: Child,
    pub port: u16,
    pub storage_port: u16,
}

impl Hub {
    /// Serves `repos` (`(org/name, dir)`), `files` under `/files/`, and `extra` flags.
    pub fn start(repos: &[(&str, &Path)], files: Option<&Path>, extra: &[&str]) -> Hub {
        let mut cmd = Command::new(super::python());
        cmd.arg(super::root().join("tests/servers/hub_server.py"));
        for (name, dir) in repos {
            cmd.arg("--repo")
                .arg(format!("{name}={}", dir.to_str().unwrap()));
        }
        if let Some(f) = files {
            cmd.arg("--files").arg(f);
        }
        cmd.args(extra);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut it = line.split_whitespace().map(|p| p.parse::<u16>().unwrap());
        let (port, storage_port) = (it.next().unwrap(), it.next().unwrap());
        Hub {
            child,
            port,
            storage_port,
        }
    }

    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A plain file URL under `/files/`.
    pub fn file_url(&self, rel: &str) -> String {
        format!("http://127.0.0.1:{}/files/{rel}", self.port)
    }

    fn request(&self, method: &str, path: &str, body: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }

    /// Adds a fault (see the server's doc).
    pub fn fault(&self, json: &str) {
        self.request("POST", "/_control", json);
    }

    /// The server's counters.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.request("GET", "/_stats", "")).unwrap()
    }

    /// The commit `main` of `repo` resolves to.
    pub fn commit(&self, repo: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.request(
            "GET",
            &format!("/api/models/{repo}/revision/main"),
            "",
        ))
        .unwrap();
        v["sha"].as_str().unwrap().to_string()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `Authorization` header of the form moto expects (it checks no signature, but
/// refuses some unsigned reads, `*.json` among them).
const MOTO_AUTH: &str = "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00\r\n";

/// An S3-compatible server (moto, installed in the test venv), on loopback.
pub struct S3 {
    child: Child,
    pub endpoint: String,
}

impl S3 {
    pub fn start() -> S3 {
        let bin = super::python().with_file_name("moto_server");
        let mut child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Werkzeug says where it listens on stderr (or stdout).
        let (tx, rx) = std::sync::mpsc::channel();
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(|l| l.ok()) {
                    if let Some(at) = line.find("http://127.0.0.1:") {
                        let _ = tx.send(line[at..].trim().to_string());
                    }
                }
            });
        }
        let endpoint = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("moto_server did not start");
        S3 { child, endpoint }
    }

    /// Makes `bucket` and uploads each `(prefix, dir)` with boto3.
    pub fn put(&self, bucket: &str, dirs: &[(&str, &Path)]) {
        let mut c = Command::new(super::python());
        c.arg(super::root().join("tests/servers/s3_put.py"))
            .arg(&self.endpoint)
            .arg(bucket);
        for (p, d) in dirs {
            c.arg(format!("{p}={}", d.to_str().unwrap()));
        }
        assert!(c.status().unwrap().success());
    }

    /// A plain HTTP/1.0 GET of `path`, unsigned (moto checks no signatures): the status
    /// and the body.
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let mut s = TcpStream::connect(addr.as_str()).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{MOTO_AUTH}\r\n").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&out[..at]).into_owned();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, out[at + 4..].to_vec())
    }

    /// A plain unsigned HTTP/1.0 PUT of `body` as the object at `path`.
    pub fn put_object(&self, path: &str, body: &[u8]) {
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let mut s = TcpStream::connect(addr.as_str()).unwrap();
        write!(
            s,
            "PUT {path} HTTP/1.0\r\nHost: {addr}\r\n{MOTO_AUTH}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert!(out.starts_with(b"HTTP/1.0 200") || out.starts_with(b"HTTP/1.1 200"));
    }

    /// The text of every `<tag>` element of `xml`.
    fn elements(xml: &str, tag: &str) -> Vec<String> {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        xml.split(open.as_str())
            .skip(1)
            .filter_map(|p| p.split_once(close.as_str()).map(|(v, _)| v.to_string()))
            .collect()
    }

    /// The keys of `bucket` below `prefix`, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (st, body) = self.get(&format!(
            "/{bucket}?list-type=2&max-keys=1000&prefix={prefix}"
        ));
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        let mut k = Self::elements(&String::from_utf8_lossy(&body), "Key");
        k.sort();
        k
    }

    /// The keys of the multipart uploads of `bucket` still in progress.
    pub fn uploads(&self, bucket: &str) -> Vec<String> {
        let (st, body) = self.get(&format!("/{bucket}?uploads"));
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        Self::elements(&String::from_utf8_lossy(&body), "Key")
    }

    /// Downloads every object of `bucket` below `prefix` into `dir`, keys made relative
    /// to `prefix`.
    pub fn download(&self, bucket: &str, prefix: &str, dir: &Path) {
        for key in self.keys(bucket, prefix) {
            let (st, body) = self.get(&format!("/{bucket}/{key}"));
            assert_eq!(st, 200, "{key}");
            let to = dir.join(key.strip_prefix(prefix).unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::write(to, body).unwrap();
        }
    }

    /// Upload parts stored so far for the multipart upload in progress of `key` in
    /// `bucket` (0 when there is none).
    pub fn upload_parts(&self, bucket: &str, key: &str) -> usize {
        let (st, body) = self.get(&format!("/{bucket}?uploads"));
        assert_eq!(st, 200);
        let xml = String::from_utf8_lossy(&body).into_owned();
        let Some(id) = Self::elements(&xml, "UploadId").into_iter().next() else {
            return 0;
        };
        let (_, parts) = self.get(&format!("/{bucket}/{key}?uploadId={id}"));
        Self::elements(&String::from_utf8_lossy(&parts), "PartNumber").len()
    }

    /// Stops the server now (a store that goes away).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The environment object_store's S3 client reads.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
