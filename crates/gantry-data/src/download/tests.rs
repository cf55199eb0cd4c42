//! Download tests against a tiny HTTP/1.1 server on 127.0.0.1.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::*;
use crate::idx::{write_idx_images, write_idx_labels};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    path: String,
    range: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Honours `Range: bytes=N-` with 206.
    Ranges,
    /// Always answers 200 with the whole file.
    IgnoreRange,
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(files: HashMap<String, Vec<u8>>, mode: Mode) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let _ = serve(conn, &files, mode, &seen);
                    }
                }
            })
        };
        Server {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Stops accepting; afterwards connections to the port are refused.
    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr); // wakes the accept loop
            thread.join().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    mut conn: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    mode: Mode,
    seen: &Mutex<Vec<Seen>>,
) -> io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_owned();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().to_owned());
        }
    }
    seen.lock().unwrap().push(Seen {
        path: path.clone(),
        range: range.clone(),
    });

    let Some(body) = files.get(&path) else {
        return respond(&mut conn, "404 Not Found", &[], b"no such file");
    };
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok());
    match (mode, start) {
        (Mode::Ranges, Some(start)) if start >= body.len() => {
            respond(&mut conn, "416 Range Not Satisfiable", &[], b"")
        }
        (Mode::Ranges, Some(start)) => {
            let header = format!(
                "Content-Range: bytes {start}-{}/{}",
                body.len() - 1,
                body.len()
            );
            respond(&mut conn, "206 Partial Content", &[&header], &body[start..])
        }
        _ => respond(&mut conn, "200 OK", &[], body),
    }
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[&str], body: &[u8]) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()
}

/// A base URL nobody listens on: port 1 (tcpmux), which nothing on a test machine serves.
/// Not a port freed by a listener just dropped: the kernel hands such a port to the next
/// `bind(:0)`, often another test's server running in parallel, which then answers.
fn dead_url() -> String {
    "http://127.0.0.1:1/".to_owned()
}

fn md5_hex(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

/// Three 2×2 images with labels, as gzip IDX files.
struct Fixture {
    images: Vec<u8>,
    labels: Vec<u8>,
    images_md5: String,
    labels_md5: String,
}

impl Fixture {
    fn new() -> Fixture {
        let mut images = Vec::new();
        write_idx_images(&mut images, &(0..12).collect::<Vec<u8>>(), 3, 2, 2, true).unwrap();
        let mut labels = Vec::new();
        write_idx_labels(&mut labels, &[4, 5, 6], true).unwrap();
        Fixture {
            images_md5: md5_hex(&images),
            labels_md5: md5_hex(&labels),
            images,
            labels,
        }
    }

    fn files(&self) -> HashMap<String, Vec<u8>> {
        HashMap::from([
            ("imgs.gz".to_owned(), self.images.clone()),
            ("lbls.gz".to_owned(), self.labels.clone()),
        ])
    }

    fn images_file(&self) -> RemoteFile<'_> {
        RemoteFile {
            name: "imgs.gz",
            md5: &self.images_md5,
        }
    }

    fn labels_file(&self) -> RemoteFile<'_> {
        RemoteFile {
            name: "lbls.gz",
            md5: &self.labels_md5,
        }
    }

    fn load(&self, dir: &Path, mirrors: &[String]) -> Result<Dataset, DataError> {
        load_files("tiny", self.images_file(), self.labels_file(), dir, mirrors)
    }
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn fresh_download_then_offline_from_the_cache() {
    let fx = Fixture::new();
    let cache = tempfile::tempdir().unwrap();
    let mut server = Server::start(fx.files(), Mode::Ranges);

    let d = fx.load(cache.path(), &[server.url()]).unwrap();
    assert_eq!((d.name(), d.len(), d.image_shape()), ("tiny", 3, (1, 2, 2)));
    assert_eq!(d.labels(), Some(&[4u8, 5, 6][..]));
    assert_eq!(d.image(2), &[8, 9, 10, 11]);
    assert_eq!(dir_entries(cache.path()), ["imgs.gz", "lbls.gz"]);
    assert_eq!(fs::read(cache.path().join("imgs.gz")).unwrap(), fx.images);
    let paths: Vec<String> = server.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["imgs.gz", "lbls.gz"]);

    server.stop();
    let again = fx.load(cache.path(), &[server.url()]).unwrap();
    assert_eq!(again, d);
    assert_eq!(server.seen().len(), 2, "the cache hit made requests");
}

#[test]
fn partial_download_is_resumed_with_a_range_request() {
    let fx = Fixture::new();
    let cache = tempfile::tempdir().unwrap();
    fs::write(cache.path().join("imgs.gz.part"), &fx.images[..20]).unwrap();
    let server = Server::start(fx.files(), Mode::Ranges);

    let path = fetch_file(fx.images_file(), cache.path(), &[server.url()]).unwrap();
    assert_eq!(fs::read(path).unwrap(), fx.images);
    assert_eq!(
        server.seen(),
        [Seen {
            path: "imgs.gz".into(),
            range: Some("bytes=20-".into())
        }]
    );
    assert_eq!(dir_entries(cache.path()), ["imgs.gz"]);
}

#[test]
fn server_ignoring_range_restarts_from_zero() {
    let fx = Fixture::new();
    let cache = tempfile::tempdir().unwrap();
    // Garbage in the part: appending the 200 body to it would break the MD5.
    fs::write(cache.path().join("imgs.gz.part"), [0xaa; 20]).unwrap();
    let server = Server::start(fx.files(), Mode::IgnoreRange);

    let path = fetch_file(fx.images_file(), cache.path(), &[server.url()]).unwrap();
    assert_eq!(fs::read(path).unwrap(), fx.images);
    // One request: the 200 was recognised, not repaired by a retry.
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].range.as_deref(), Some("bytes=20-"));
}

#[test]
fn stale_part_that_resumes_wrongly_is_redownloaded_whole() {
    let fx = Fixture::new();
    let cache = tempfile::tempdir().unwrap();
    fs::write(cache.path().join("imgs.gz.part"), [0xaa; 20]).unwrap();
    let server = Server::start(fx.files(), Mode::Ranges);

    let path = fetch_file(fx.images_file(), cache.path(), &[server.url()]).unwrap();
    assert_eq!(fs::read(path).unwrap(), fx.images);
    let ranges: Vec<Option<String>> = server.seen().into_iter().map(|s| s.range).collect();
    assert_eq!(ranges, [Some("bytes=20-".to_owned()), None]);
}

#[test]
fn part_longer_than_the_file_is_restarted() {
    let fx = Fixture::new();
    let cache = tempfile::tempdir().unwrap();
    let mut long = fx.images.clone();
    long.extend_from_slice(b"junk");
    fs::write(cache.path().join("imgs.gz.part"), &long).unwrap();
    let server = Server::start(fx.files(), Mode::Ranges);

    let path = fetch_file(fx.images_file(), cache.path(), &[server.url()]).unwrap();
    assert_eq!(fs::read(path).unwrap(), fx.images);
    let ranges: Vec<Option<String>> = server.seen().into_iter().map(|s| s.range).collect();
    assert_eq!(ranges, [Some(format!("bytes={}-", long.len())), None]);
}

#[test]
fn corrupted_download_is_rejected_and_not_cached() {
    let fx = Fixture::new();
    let cache = tempfile::tempdir().unwrap();
    let mut files = fx.files();
    let bad = files.get_mut("imgs.gz").unwrap();
    bad[10] ^= 0x01;
    let bad_md5 = md5_hex(bad);
    let server = Server::start(files, Mode::Ranges);

    let err = fetch_file(fx.images_file(), cache.path(), &[server.url()]).unwrap_err();
    let DataError::AllMirrorsFailed { file, failures } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(file, "imgs.gz");
    assert_eq!(failures.len(), 1);
    assert!(
        matches!(&failures[0].1, DataError::Md5Mismatch { expected, actual, .. }
            if *expected == fx.images_md5 && *actual == bad_md5),
        "{failures:?}"
    );
    let msg = err.to_string();
    for needle in ["imgs.gz", &fx.images_md5, &bad_md5, &server.url()] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    assert!(
        dir_entries(cache.path()).is_empty(),
        "{:?}",
        dir_entries(cache.path())
    );
}

#[test]
fn cached_file_with_wrong_md5_is_downloaded_again() {
    let fx = Fixture::new();
    let cache = tempfile::tempdir().unwrap();
    fs::write(cache.path().join("imgs.gz"), b"not the file").unwrap();
    let server = Server::start(fx.files(), Mode::Ranges);

    let path = fetch_file(fx.images_file(), cache.path(), &[server.url()]).unwrap();
    assert_eq!(fs::read(path).unwrap(), fx.images);
    assert_eq!(server.seen().len(), 1);
}

#[test]
fn first_mirror_down_second_works() {
    let fx = Fixture::new();
    let cache = tempfile::tempdir().unwrap();
    let server = Server::start(fx.files(), Mode::Ranges);

    let d = fx.load(cache.path(), &[dead_url(), server.url()]).unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(server.seen().len(), 2);
}

#[test]
fn all_mirrors_failing_lists_each_failure() {
    let fx = Fixture::new();
    let cache = tempfile::tempdir().unwrap();
    let server = Server::start(HashMap::new(), Mode::Ranges); // serves only 404s
    let dead = dead_url();

    let err = fx
        .load(cache.path(), &[dead.clone(), server.url()])
        .unwrap_err();
    let DataError::AllMirrorsFailed { failures, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(failures[0].0, dead);
    assert!(
        matches!(failures[0].1, DataError::Http { .. }),
        "{failures:?}"
    );
    assert_eq!(failures[1].0, server.url());
    assert!(
        failures[1].1.to_string().contains("HTTP status 404"),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.starts_with("imgs.gz: all 2 mirror(s) failed:"), "{msg}");
    assert!(msg.contains(&dead) && msg.contains(&server.url()), "{msg}");
}

#[test]
fn load_remote_caches_per_data_set_and_names_the_split() {
    let cache = tempfile::tempdir().unwrap();
    let err = load_remote(
        Remote::FashionMnist,
        Split::Test,
        cache.path(),
        &[dead_url()],
    )
    .unwrap_err();
    assert!(
        matches!(&err, DataError::AllMirrorsFailed { file, .. } if file == "t10k-images-idx3-ubyte.gz"),
        "{err:?}"
    );
    assert!(cache.path().join("fashion-mnist").is_dir());

    let (images, labels) = Remote::Mnist.split_files(Split::Train);
    assert_eq!(images.md5, "f68b3c2dcbeaaa9fbdd348bbdeb94873");
    assert_eq!(labels.name, "train-labels-idx1-ubyte.gz");
    assert_eq!(Remote::Mnist.default_mirrors().len(), 2);
}
