//! The real `keygate serve` process on free loopback ports with a fresh
//! data dir; its stderr is captured so tests can check what it logged.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running keygate.
pub struct Keygate {
    pub bin: PathBuf,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    child: Child,
    logs: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Keygate {
    /// Starts `bin serve` with a fresh data dir, ports chosen by the OS, and
    /// `extra` arguments (e.g. `--upstream-ca`, `--resolve`, `--allow-net`).
    pub fn start(bin: &Path, extra: &[String]) -> Keygate {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        Self::start_in(bin, dir, data_dir, extra, &[])
    }

    /// Like [`start`](Self::start) on an existing data dir (restart tests).
    pub fn start_with_data_dir(bin: &Path, data_dir: &Path, extra: &[String]) -> Keygate {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(bin, dir, data_dir.to_path_buf(), extra, &[])
    }

    /// Like [`start`](Self::start) with extra environment variables.
    pub fn start_with_env(bin: &Path, extra: &[String], env: &[(&str, &str)]) -> Keygate {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        Self::start_in(bin, dir, data_dir, extra, env)
    }

    /// Like [`start_with_data_dir`](Self::start_with_data_dir) with extra
    /// environment variables (e.g. `KEYGATE_MASTER_KEY_FILE`).
    pub fn start_with_data_dir_and_env(
        bin: &Path,
        data_dir: &Path,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Keygate {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(bin, dir, data_dir.to_path_buf(), extra, env)
    }

    fn start_in(
        bin: &Path,
        dir: tempfile::TempDir,
        data_dir: PathBuf,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Keygate {
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--proxy-listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .args(extra)
            .env("KEYGATE_DATA_DIR", &data_dir)
            .env("KEYGATE_LOG", "debug")
            .env_remove("KEYGATE_MASTER_KEY")
            .env_remove("KEYGATE_MASTER_KEY_FILE")
            .env_remove("KEYGATE_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn keygate serve");
        let logs = Arc::new(Mutex::new(String::new()));
        let addrs: Arc<Mutex<Option<(SocketAddr, SocketAddr)>>> = Arc::new(Mutex::new(None));
        let stderr = child.stderr.take().expect("stderr");
        let (l, a) = (logs.clone(), addrs.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(found) = parse_listen_line(&line) {
                    if let Ok(mut a) = a.lock() {
                        *a = Some(found);
                    }
                }
                if let Ok(mut l) = l.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let l = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut l) = l.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((proxy, admin)) = addrs.lock().ok().and_then(|a| *a) {
                return Keygate {
                    bin: bin.to_path_buf(),
                    proxy,
                    admin,
                    data_dir,
                    child,
                    logs,
                    _dir: dir,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "keygate serve exited early ({status}):\n{}",
                    logs.lock().map(|l| l.clone()).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "keygate serve did not start in time:\n{}",
                    logs.lock().map(|l| l.clone()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of `keygate serve` (to read /proc in tests).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("ca.pem")).expect("ca.pem")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin-token"))
            .expect("admin-token")
            .trim()
            .to_string()
    }

    /// A CLI command against this keygate (data dir and admin URL set).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("KEYGATE_DATA_DIR", &self.data_dir)
            .env("KEYGATE_ADMIN_URL", self.admin_url())
            .env_remove("KEYGATE_ADMIN_TOKEN")
            .env_remove("KEYGATE_AGENT_TOKEN");
        cmd
    }

    /// Runs a CLI command, feeding `stdin`, and returns its output.
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn keygate CLI");
        if let Some(mut s) = child.stdin.take() {
            if let Some(bytes) = stdin {
                s.write_all(bytes).expect("write stdin");
            }
        }
        child.wait_with_output().expect("wait CLI")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "keygate {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("keygate did not stop after SIGTERM:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Keygate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `keygate: proxy on http://A  admin API on http://B`
fn parse_listen_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.strip_prefix("keygate: proxy on http://")?;
    let (proxy, rest) = rest.split_once(' ')?;
    let admin = rest.trim().strip_prefix("admin API on http://")?;
    Some((proxy.parse().ok()?, admin.trim().parse().ok()?))
}
